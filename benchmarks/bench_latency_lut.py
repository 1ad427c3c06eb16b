"""How well the per-unit latency lookup table predicts measured latency, before and after calibration.

For a set of 12 SD-1.x candidates (BK-SDM presets, unit removals, depth, mid and stage removal,
config-built and surgery-built), compare the table's prediction (sum of unit latencies + the
base's fixed overhead) with each whole candidate measured on the same device, with the same
statistic; then the calibrated prediction, leave-one-out over the 12 and fitted on the first K (5)
for the other 7. Writes results/latency_lut_<device>_<dtype>_<res>px.{csv,json,md,png} and the
table itself, calibrated on all 12, in results/lut/.

    python benchmarks/bench_latency_lut.py --device cpu --resolution 128
    python benchmarks/bench_latency_lut.py --device cuda --dtype float16 --resolution 512
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import diffusers
import torch
from scipy.stats import kendalltau

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cost import build_table, estimate_cost
from hybridsd_nas.cost.calibrate import MIN_CANDIDATES, calibration_record, fit, leave_one_out, measure_points, summarize
from hybridsd_nas.cost.latency import check_device, device_label, parse_dtype
from hybridsd_nas.cost.lut import REPEATS, apply_calibration, base_key

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
    ap.add_argument("--lut-repeats", type=int, default=REPEATS, help="timed calls per unit and per whole forward")
    ap.add_argument("--k", type=int, default=MIN_CANDIDATES, help="candidates of the K-point calibration (the first K)")
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
    arch = describe("sd-v1")
    cands = candidates(arch)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    table, _ = build_table("sd-v1", cands, out=lut_path, device=str(dev), dtype=dt, resolution=args.resolution,
                           batch=args.batch_size, repeats=args.lut_repeats, arch=arch, progress=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    points = measure_points("sd-v1", cands, table, arch=arch, progress=True)
    t_measure = time.perf_counter() - t0
    builds = {c.label: estimate_cost("sd-v1", c, resolution=args.resolution, batch=args.batch_size, arch=arch) for c in cands}
    raw = [(p.uncalibrated_ms - p.measured_ms) / p.measured_ms * 100 for p in points]
    loo = leave_one_out(points)
    k = args.k
    cal_k = fit(points[:k])
    held = [(apply_calibration(cal_k, p.units_ms, p.n_units) - p.measured_ms) / p.measured_ms * 100 for p in points[k:]]
    cal_all = calibration_record(points, table.meta["statistic"])  # what `lut calibrate` would store from these
    table.set_calibration(base_key(arch), cal_all)
    rows = [{"candidate": p.candidate, "build": builds[p.candidate].build, "params_M": round(builds[p.candidate].params / 1e6, 2),
             "macs_G": round(builds[p.candidate].macs / 1e9, 2), "n_units": p.n_units, "units_ms": round(p.units_ms, 3),
             "measured_ms": round(p.measured_ms, 3), "table_ms": round(p.uncalibrated_ms, 3), "table_error_pct": round(e, 2),
             "loo_error_pct": round(lo, 2), f"k{k}_error_pct": (round(held[i - k], 2) if i >= k else None)}
            for i, (p, e, lo) in enumerate(zip(points, raw, loo))]
    m = [p.measured_ms for p in points]
    summary = {
        "device": label, "dtype": dname, "resolution": args.resolution, "batch": args.batch_size, "text_tokens": 77,
        "teacher": "sd-v1 (config only, random weights)", "candidates": len(rows), "statistic": table.meta["statistic"],
        "repeats": args.lut_repeats, "timing": table.meta["timing"],
        "table": summarize(raw), "leave_one_out": summarize(loo), f"k{k}_fit_on_first_{k}_held_out": summarize(held),
        "fit_all": {"terms": cal_all["terms"], "coef": cal_all["coef"]}, f"fit_k{k}": {"terms": cal_k["terms"], "coef": cal_k["coef"]},
        "kendall_tau_table": round(float(kendalltau(m, [p.uncalibrated_ms for p in points]).statistic), 4),
        "overhead_ms": round(next(iter(table.overhead.values()))["ms"], 3), "units_in_table": len(table.units),
        "build_seconds": round(t_build, 1), "measure_seconds": round(t_measure, 1),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    t, lo_s, h = summary["table"], summary["leave_one_out"], summary[f"k{k}_fit_on_first_{k}_held_out"]
    lines = [f"# Latency lookup table vs measured latency: {label}, {dname}, {args.resolution} px, batch {args.batch_size}", "",
             f"Made by `python benchmarks/bench_latency_lut.py --device {args.device} --resolution {args.resolution}`. SD-1.x "
             f"candidates (config only, random weights), 77 text tokens. Every figure is the {summary['statistic']} of "
             f"{args.lut_repeats} timed calls after at least 3 warm-ups, re-measured while the 10th-90th percentile spread "
             f"exceeds 1.5x: each unit standalone (the table), and each candidate's whole forward (measured). The table's "
             f"prediction is the sum of the candidate's units plus the teacher's overhead ({summary['overhead_ms']} ms); the "
             f"calibration fits `{cal_all['model']}` to whole candidates measured on the device (`hybridsd-nas lut calibrate`). "
             f"Load average before and after: {summary['load_average_before'][0]}, {summary['load_average_after'][0]}.", "",
             f"- Table alone: mean |error| {t['mean_abs_pct']}%, max {t['max_abs_pct']}%, Kendall tau {summary['kendall_tau_table']}.",
             f"- Calibrated, leave-one-out over the {len(rows)} (each fitted on the other {len(rows) - 1}): mean |error| "
             f"{lo_s['mean_abs_pct']}%, max {lo_s['max_abs_pct']}%.",
             f"- Calibrated on the first {k} only ({', '.join(r['candidate'] for r in rows[:k])}), on the other {len(rows) - k}: "
             f"mean |error| {h['mean_abs_pct']}%, max {h['max_abs_pct']}%.", "",
             "| candidate | build | params (M) | MACs (G) | units | measured ms | table ms | table error % | LOO error % | "
             f"K={k} error % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kk = r[f"k{k}_error_pct"]
        lines.append(f"| {r['candidate']} | {r['build']} | {r['params_M']} | {r['macs_G']} | {r['n_units']} | {r['measured_ms']} | "
                     f"{r['table_ms']} | {r['table_error_pct']} | {r['loo_error_pct']} | {'(fitted)' if kk is None else kk} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(m, [p.uncalibrated_ms for p in points], label="table (sum of units + overhead)", marker="o")
    ax.scatter(m, [p.measured_ms * (1 + e / 100) for p, e in zip(points, loo)], label="calibrated, leave-one-out", marker="x")
    for p in points:
        ax.annotate(p.candidate, (p.measured_ms, p.uncalibrated_ms), fontsize=6)
    lo, hi = min(m) * 0.8, max(m) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"measured latency (ms, {summary['statistic']} of {args.lut_repeats})")
    ax.set_ylabel("predicted (ms)")
    ax.legend(fontsize=7)
    ax.set_title(f"{label}, {dname}, {args.resolution} px, batch {args.batch_size}, SD-1.x candidates", fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
