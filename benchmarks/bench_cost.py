"""Seconds per full-size SD-1.x candidate: hybridsd_nas's weight-free cost engine vs thop and fvcore.

thop and fvcore run a real forward on real tensors (random weights, CPU); the engine builds the
candidate on the meta device and counts from shapes. Writes results/bench_cost.{json,md}.

    python benchmarks/bench_cost.py [--candidates identity,bk-sdm-base] [--resolution 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from hybridsd_nas.build import build_student
from hybridsd_nas.arch import candidate_preset, describe, plan
from hybridsd_nas.cost import estimate_cost, unet_inputs
from hybridsd_nas.cost.latency import device_label

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent.parent / "results"


class _Positional(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, s, t, e):
        return self.m(s, t, e, return_dict=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default="identity,bk-sdm-base")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "bench_cost"))
    args = ap.parse_args()
    from fvcore.nn import FlopCountAnalysis
    from thop import profile

    arch = describe("sd-v1")
    estimate_cost("sd-v1", "identity", resolution=64, arch=arch)  # warm imports
    rows = []
    for name in args.candidates.split(","):
        t0 = time.perf_counter()
        ours = estimate_cost("sd-v1", name, resolution=args.resolution, arch=arch)
        t_ours = time.perf_counter() - t0

        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = build_student(plan(arch, candidate_preset(name, arch)), device="cpu")
        t_build = time.perf_counter() - t0
        x = unet_inputs(model.config, args.resolution, 1, 77, device="cpu")
        args_ = (x["sample"], x["timestep"], x["encoder_hidden_states"])
        t0 = time.perf_counter()
        with torch.no_grad():
            thop_macs, _ = profile(_Positional(model), inputs=args_, verbose=False)
        t_thop = time.perf_counter() - t0
        t0 = time.perf_counter()
        fa = FlopCountAnalysis(_Positional(model), args_)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            fv_total = fa.total()
        by_op = fa.by_operator()
        t_fv = time.perf_counter() - t0
        fv_cl = by_op.get("conv", 0) + by_op.get("linear", 0) + by_op.get("addmm", 0)
        rows.append({
            "candidate": name,
            "engine_s": round(t_ours, 3),
            "thop_s": round(t_thop, 2),
            "fvcore_s": round(t_fv, 2),
            "real_model_build_s": round(t_build, 2),
            "thop_over_engine": round(t_thop / t_ours, 1),
            "fvcore_over_engine": round(t_fv / t_ours, 1),
            "engine_macs_conv_linear": ours.macs_conv_linear,
            "thop_macs": int(thop_macs),
            "engine_conv_plus_linear": ours["breakdown"]["conv"] + ours["breakdown"]["linear"],
            "fvcore_conv_plus_linear": int(fv_cl),
            "fvcore_total_reported": int(fv_total),
            "engine_macs_with_attention": ours.macs,
        })
        print(rows[-1], flush=True)
    meta = {"device": device_label(torch.device("cpu")), "torch": torch.__version__, "python": platform.python_version(),
            "resolution": args.resolution, "batch": 1, "text_tokens": 77, "dtype": "float32",
            "note": "engine: meta-device build + count, imports warm; thop/fvcore: one profiling forward of a model already built on CPU with random weights (build time listed apart)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Cost counting speed, full-size SD-1.x U-Net ({args.resolution} px, batch 1, 77 tokens)", "",
             f"Machine: {meta['device']}, torch {meta['torch']}, float32. {meta['note']}.", "",
             "| candidate | engine (s) | thop (s) | fvcore (s) | thop / engine | fvcore / engine | thop MACs == engine `macs_conv_linear` | fvcore conv+linear == engine conv+linear |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['engine_s']} | {r['thop_s']} | {r['fvcore_s']} | {r['thop_over_engine']}x | "
                     f"{r['fvcore_over_engine']}x | {r['thop_macs'] == r['engine_macs_conv_linear']} | "
                     f"{r['fvcore_conv_plus_linear'] == r['engine_conv_plus_linear']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
