"""How well the per-unit latency lookup table predicts measured latency.

For a set of SD-1.x candidates (BK-SDM presets, unit removals, depth, mid and stage removal,
config-built and surgery-built), compare the table's prediction (sum of unit latencies + the
base's fixed overhead) with the latency measured on the same device. Writes
results/latency_lut_<device>_<dtype>_<res>px.{csv,md,png} and the table itself.

    python benchmarks/bench_latency_lut.py --device cpu --resolution 128
    python benchmarks/bench_latency_lut.py --device cuda --dtype float16 --resolution 512
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cost import LatencyTable, estimate_cost
from hybridsd_nas.cost.latency import check_device, device_label, parse_dtype

RESULTS = Path(__file__).resolve().parent.parent / "results"


def candidates(arch) -> list[Candidate]:
    bk = candidate_preset("bk-sdm-base", arch)
    return [
        Candidate(name="sd-v1"),
        bk,
        candidate_preset("bk-sdm-small", arch),
        candidate_preset("bk-sdm-tiny", arch),
        Candidate(drop_mid=True, name="no-mid"),
        Candidate(drop_units=["down0.0.attn", "down0.1.attn"], name="no-attn-down0"),
        Candidate(drop_layers=["down0.1", "up3.1"], name="slim-stage0"),
        Candidate(drop_stages=1, drop_mid=True, name="no-stage3-no-mid"),
        Candidate(drop_layers=["down2.1", "down3.1", "up0.1", "up1.1"], name="slim-stages2-3"),
        Candidate(drop_layers=bk.drop_layers, drop_units=["up3.0.attn", "up3.2.attn"], name="bk-base-no-attn-up3"),
        Candidate(drop_units=["mid.0.attn", "mid.1.resnet", "down3.0.resnet"], name="unit-removals"),
        Candidate(drop_layers=["down1.1", "up2.1"], drop_units=["up1.2.attn"], name="slim-stage1"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--lut-repeats", type=int, default=10)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    dev = check_device(args.device)
    dt = parse_dtype(args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    dname = str(dt).replace("torch.", "")
    label = device_label(dev)
    out_dir = Path(args.out_dir)
    stem = out_dir / f"latency_lut_{label}_{dname}_{args.resolution}px"
    out_dir.mkdir(parents=True, exist_ok=True)
    lut_path = out_dir / "lut" / f"{label}-{dname}-{args.resolution}px-b{args.batch_size}.json"
    if lut_path.exists():
        lut_path.unlink()  # a fresh table: this benchmark measures building it too
    table = LatencyTable(str(dev), dt, args.resolution, args.batch_size, path=lut_path, warmup=3, repeats=args.lut_repeats)
    arch = describe("sd-v1")
    rows = []
    t_lut = 0.0
    for c in candidates(arch):
        t0 = time.perf_counter()
        pred = estimate_cost("sd-v1", c, resolution=args.resolution, batch=args.batch_size, latency="lut", lut=table, arch=arch)
        t_lut += time.perf_counter() - t0
        meas = estimate_cost("sd-v1", c, resolution=args.resolution, batch=args.batch_size, latency="measure",
                             device=str(dev), dtype=dt, repeats=args.repeats, arch=arch)
        err = (pred.latency_ms - meas.latency_ms) / meas.latency_ms * 100
        rows.append({"candidate": c.label, "build": pred.build, "params_M": round(pred.params / 1e6, 2),
                     "macs_G": round(pred.macs / 1e9, 2), "measured_ms": round(meas.latency_ms, 3),
                     "measured_p10_ms": round(meas.latency["p10_ms"], 3), "measured_p90_ms": round(meas.latency["p90_ms"], 3),
                     "predicted_ms": round(pred.latency_ms, 3), "error_pct": round(err, 2)})
        print(rows[-1], flush=True)
    from scipy.stats import kendalltau, spearmanr

    m = [r["measured_ms"] for r in rows]
    p = [r["predicted_ms"] for r in rows]
    abs_err = [abs(r["error_pct"]) for r in rows]
    summary = {
        "device": label, "dtype": dname, "resolution": args.resolution, "batch": args.batch_size, "text_tokens": 77,
        "candidates": len(rows), "repeats_measured": args.repeats, "repeats_per_unit": args.lut_repeats,
        "mean_abs_error_pct": round(sum(abs_err) / len(abs_err), 2), "max_abs_error_pct": round(max(abs_err), 2),
        "spearman": round(float(spearmanr(m, p).statistic), 4), "kendall_tau": round(float(kendalltau(m, p).statistic), 4),
        "overhead_ms": round(next(iter(table.overhead.values()))["ms"], 3), "units_in_table": len(table.units),
        "lut_seconds_incl_build": round(t_lut, 1), "torch": torch.__version__,
    }
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = [f"# Latency lookup table vs measured latency: {label}, {dname}, {args.resolution} px, batch {args.batch_size}", "",
             f"SD-1.x candidates, 77 text tokens, random weights. Measured: median of {args.repeats} forwards after at least 3 warm-up "
             f"forwards{' lasting at least 0.5 s' if dev.type != 'cpu' else ''}; "
             f"table: each unit timed standalone ({args.lut_repeats} repeats), plus the base's fixed overhead "
             f"({summary['overhead_ms']} ms). Mean |error| {summary['mean_abs_error_pct']}%, max {summary['max_abs_error_pct']}%, "
             f"Spearman {summary['spearman']}, Kendall tau {summary['kendall_tau']}.", "",
             "| candidate | build | params (M) | MACs (G) | measured ms (p10-p90) | predicted ms | error % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['build']} | {r['params_M']} | {r['macs_G']} | {r['measured_ms']} "
                     f"({r['measured_p10_ms']}-{r['measured_p90_ms']}) | {r['predicted_ms']} | {r['error_pct']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(m, p)
        for r in rows:
            ax.annotate(r["candidate"], (r["measured_ms"], r["predicted_ms"]), fontsize=6)
        lo, hi = min(m + p) * 0.9, max(m + p) * 1.1
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted by lookup table (ms)")
        ax.set_title(f"{label}\n{dname}, {args.resolution}px, batch {args.batch_size}", fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
