"""How far the predicted ``peak_memory_mb`` of a whole request is from the measured one.

For each case (a pipeline at a resolution) and candidate: the prediction (weights at the dtype of
the text encoder, the candidate's U-Net and the VAE decoder, plus the activation peak of the request
traced on the meta device) against a measurement on the device (the same models with random
weights, one request after a warm-up run: ``torch.cuda.max_memory_allocated`` increase on CUDA, the
process's peak RSS increase on a CPU), at the teacher's guidance (one image, two latents per U-Net
forward). ``sd15`` is a config-only pipeline of Stable Diffusion 1.5's shapes (U-Net preset
``sd-v1``, its published VAE and text encoder configs; random weights, nothing downloaded). Writes
results/peak_memory.{json,md} with the device, dtype, resolutions, batch and load average.

    python benchmarks/bench_peak_memory.py                                   # tiny at 32, 128, 256 px on this CPU
    python benchmarks/bench_peak_memory.py --device cuda --dtype float16 --cases tiny:32,sd15:512,sd15:768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cost.latency import check_device, device_label, parse_dtype
from hybridsd_nas.cost.pipeline import SD15_TEXT_CONFIG, SD15_VAE_CONFIG
from hybridsd_nas.cost.request import PipelineCost, default_request
from hybridsd_nas.sources import unet_preset

RESULTS = Path(__file__).resolve().parent.parent / "results"


def sd15_pipeline(root: Path) -> str:
    """A config-only pipeline directory of SD-1.5's shapes (no weights: prediction and random-weight measurement only)."""
    for name, cfg in (("unet", {"_class_name": "UNet2DConditionModel", **unet_preset("sd-v1")}),
                      ("vae", {"_class_name": "AutoencoderKL", **SD15_VAE_CONFIG}),
                      ("text_encoder", {"architectures": ["CLIPTextModel"], **SD15_TEXT_CONFIG})):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
    (root / "model_index.json").write_text("{}")
    return str(root)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, else float32")
    ap.add_argument("--cases", default="tiny:32,tiny:128,tiny:256", help="PIPELINE:RESOLUTION,...; PIPELINE tiny or sd15")
    ap.add_argument("--candidates", default="teacher,bk-sdm-small,bk-sdm-tiny")
    ap.add_argument("--out", default=str(RESULTS / "peak_memory"))
    args = ap.parse_args()
    dev = check_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    tmp = tempfile.TemporaryDirectory()
    teachers = {"tiny": "tiny", "sd15": sd15_pipeline(Path(tmp.name) / "sd15")}
    rows = []
    for case in args.cases.split(","):
        name, res = case.split(":")
        teacher = teachers[name]
        arch = describe(teacher)
        request = default_request(teacher, resolution=int(res))
        pc = PipelineCost(teacher, request, device=args.device, dtype=dtype, arch=arch)
        for cname in args.candidates.split(","):
            cand = Candidate() if cname == "teacher" else candidate_preset(cname, arch)
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            pred = pc.predict_memory([cand])
            t1 = time.perf_counter()
            meas = pc.measure_memory([cand])
            t2 = time.perf_counter()
            rows.append({"pipeline": name, "resolution": request.resolution, "candidate": cname,
                         "unet_batch": request.unet_batch, "images": request.images, "guidance": request.guidance,
                         "predicted_mb": round(pred["peak_memory_mb"], 3),
                         "weights_mb": {k: round(v, 3) for k, v in pred["weights_mb"].items()},
                         "activation_peak_mb": round(pred["activation_peak_mb"], 3),
                         "measured_mb": round(meas["peak_memory_mb"], 3),
                         "ratio": round(pred["peak_memory_mb"] / meas["peak_memory_mb"], 4),
                         "error_pct": round(100 * (pred["peak_memory_mb"] - meas["peak_memory_mb"]) / meas["peak_memory_mb"], 2),
                         "predict_s": round(t1 - t0, 2), "measure_s": round(t2 - t1, 2),
                         "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                         "measured_how": meas["method"]})
            print(rows[-1], flush=True)
    meta = {"device": device_label(dev), "device_type": dev.type, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "request": "the teacher's guidance (classifier-free: the U-Net runs on 2 latents), 1 image, one text encoding "
                       "of the prompt and the empty prompt, one U-Net forward, one decode",
            "predicted": "weights at the dtype (text encoder, U-Net, VAE decoder) + activation peak of the request traced on "
                         "the meta device (fused attention; on a CPU a convolution's scratch buffer)",
            "measured": rows[0]["measured_how"].removeprefix("measured: ") if rows else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    errs = [abs(r["error_pct"]) for r in rows]
    lines = [f"# Peak memory of a whole request: predicted vs measured ({meta['device']}, {meta['dtype']})", "",
             f"Device {meta['device']} ({meta['device_type']}), {meta['dtype']}, torch {meta['torch']}, {meta['cpu_count']} "
             f"CPUs; load average (1 min) {meta['loadavg_end'][0]} at the end, per row below. Request: {meta['request']}.", "",
             f"Predicted: {meta['predicted']}. Measured: {meta['measured']}.", "",
             f"Mean |error| {sum(errs) / max(len(errs), 1):.1f}%, max {max(errs, default=0):.1f}% over {len(rows)} rows "
             "(error = (predicted - measured) / measured).", "",
             "| pipeline | px | candidate | U-Net batch | weights MB (text enc / U-Net / decoder) | activation MB | predicted MB "
             "| measured MB | predicted / measured | error % | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weights_mb"]
        lines.append(f"| {r['pipeline']} | {r['resolution']} | {r['candidate']} | {r['unet_batch']} | {w['text_encoder']:.2f} / "
                     f"{w['unet']:.2f} / {w['decoder']:.2f} | {r['activation_peak_mb']:.2f} | {r['predicted_mb']:.2f} | "
                     f"{r['measured_mb']:.2f} | {r['ratio']:.3f} | {r['error_pct']:+.1f} | {r['loadavg_1min'][0]:.1f} |")
    lines += ["", "Rerun: `python benchmarks/bench_peak_memory.py` (this CPU); on a GPU `--device cuda --dtype float16 "
              "--cases tiny:32,sd15:512,sd15:768`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tmp.cleanup()


if __name__ == "__main__":
    main()
