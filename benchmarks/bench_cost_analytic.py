"""Seconds per full-size SD-1.x candidate: the closed-form cost model vs the traced count vs thop.

One run, one machine: every candidate preset and a seeded sample of each shipped space's candidates
on ``sd-v1`` at 512 px are costed in closed form (``estimate_cost(..., method="analytic")``, plan
included; the median of repeated calls) and by tracing (``method="traced"``: a meta-device build and
one counted forward), and every figure of the two is compared (params, both MAC conventions, the
breakdown, the per-block table). thop runs a real forward on CPU (random weights: thop reads shapes
only), on the first few candidates of each group; its integer is compared with
``macs_conv_linear``. Writes results/bench_cost_analytic.{json,md}.

    python benchmarks/bench_cost_analytic.py [--per-space 20] [--thop-per-group 2] [--resolution 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import diffusers
import torch

from hybridsd_nas.arch import CANDIDATE_PRESETS, candidate_preset, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.cost import analytic_count, estimate_cost, unet_inputs
from hybridsd_nas.cost.latency import device_label
from hybridsd_nas.spaces import list_spaces, load_space

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent.parent / "results"
TEACHER = "sd-v1"


class _Positional(torch.nn.Module):  # thop takes positional inputs only
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, s, t, e):
        return self.m(s, t, e, return_dict=False)[0]


def _figures(r) -> tuple:
    return r.params, r.macs, r.macs_conv_linear, r.breakdown, r.by_block


def _thop(arch, cand, resolution: int) -> tuple[int, float, float]:
    from thop import profile

    t0 = time.perf_counter()
    model = build_student(plan(arch, cand)).to_empty(device="cpu")  # the pruned shapes, without diffusers' slow init
    with torch.no_grad():
        for prm in model.parameters():  # plain values: uninitialised memory may hold NaN or denormals, which slow a CPU
            prm.normal_(0.0, 0.02)
    t_build = time.perf_counter() - t0
    x = unet_inputs(model.config, resolution, 1, 77, device="cpu")
    t0 = time.perf_counter()
    with torch.no_grad():
        macs, _ = profile(_Positional(model), inputs=(x["sample"], x["timestep"], x["encoder_hidden_states"]), verbose=False)
    return int(macs), time.perf_counter() - t0, t_build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--per-space", type=int, default=20, help="random candidates drawn per space (default: 20)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the spaces (default: 0)")
    ap.add_argument("--repeats", type=int, default=25, help="closed-form calls per candidate, median taken (default: 25)")
    ap.add_argument("--thop-per-group", type=int, default=2, help="candidates per group (presets, each space) thop profiles (default: 2)")
    ap.add_argument("--out", default=str(RESULTS / "bench_cost_analytic"))
    args = ap.parse_args()
    import thop

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    arch = describe(TEACHER)
    t_describe = time.perf_counter() - t0
    t0 = time.perf_counter()
    analytic_count(plan(arch, candidate_preset("identity", arch)), args.resolution)  # the base check, once per base
    t_first = time.perf_counter() - t0
    estimate_cost(TEACHER, "identity", resolution=64, arch=arch, method="traced")  # warm imports

    groups: dict[str, list] = {"presets": [candidate_preset(n, arch) for n in CANDIDATE_PRESETS.names()]}
    for name in list_spaces():
        pts = load_space(name).sample(arch, args.per_space, seed=args.seed)
        groups[name] = list({p.candidate.key: p.candidate for p in pts}.values())  # small spaces repeat: once each

    rows = []
    for group, cands in groups.items():
        for i, cand in enumerate(cands):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = estimate_cost(TEACHER, cand, resolution=args.resolution, arch=arch, by_block=True, method="analytic")
                times.append(time.perf_counter() - t0)
            p = plan(arch, cand)
            count_times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                analytic_count(p, args.resolution)
                count_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            t = estimate_cost(TEACHER, cand, resolution=args.resolution, arch=arch, by_block=True, method="traced")
            t_traced = time.perf_counter() - t0
            row = {"group": group, "candidate": cand.label, "key": cand.key, "analytic_ms": round(statistics.median(times) * 1e3, 3),
                   "analytic_count_only_ms": round(statistics.median(count_times) * 1e3, 3), "traced_s": round(t_traced, 3),
                   "exact": _figures(a) == _figures(t), "params": a.params, "macs": a.macs, "macs_conv_linear": a.macs_conv_linear}
            if i < args.thop_per_group:
                macs, t_thop, t_build = _thop(arch, cand, args.resolution)
                row.update({"thop_s": round(t_thop, 2), "thop_model_build_s": round(t_build, 2), "thop_equals_macs_conv_linear": macs == a.macs_conv_linear})
            rows.append(row)
            print(json.dumps(row), flush=True)

    def summary(sel: list[dict]) -> dict:
        an = [r["analytic_ms"] for r in sel]
        tr = [r["traced_s"] for r in sel]
        th = [r["thop_s"] for r in sel if "thop_s" in r]
        return {"n": len(sel), "exact": sum(r["exact"] for r in sel), "analytic_ms_median": round(statistics.median(an), 3),
                "analytic_ms_max": round(max(an), 3), "traced_s_median": round(statistics.median(tr), 3),
                "thop_n": len(th), "thop_s_median": round(statistics.median(th), 2) if th else None,
                "traced_over_analytic": round(statistics.median(tr) * 1e3 / statistics.median(an)),
                "thop_over_analytic": round(statistics.median(th) * 1e3 / statistics.median(an)) if th else None}

    summ = {g: summary([r for r in rows if r["group"] == g]) for g in groups}
    summ["all"] = summary(rows)
    load_after = os.getloadavg()
    ncpu = os.cpu_count() or 1
    loaded = max(load_before[0], load_after[0]) > 0.5 * ncpu
    meta = {"device": device_label(torch.device("cpu")), "cpu_count": ncpu, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "thop": getattr(thop, "__version__", "?"), "python": platform.python_version(),
            "teacher": TEACHER, "resolution": args.resolution, "batch": 1, "text_tokens": 77, "dtype": "float32 (thop)",
            "space_seed": args.seed, "per_space": args.per_space, "repeats": args.repeats, "thop_per_group": args.thop_per_group,
            "describe_s": round(t_describe, 3), "first_analytic_call_ms": round(t_first * 1e3, 2),
            "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
            "note": ("analytic: estimate_cost(method='analytic') with the base described once (plan included), median of "
                     "the repeats; traced: estimate_cost(method='traced'), one call (meta-device build + counted forward); "
                     "thop: one profiling forward on CPU (random float32 weights), the model's build listed apart")}
    if loaded:
        meta["load_note"] = (f"timings taken on a shared {ncpu}-core CPU under load (1-min load average "
                             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after): absolute times are inflated, the ratios less so")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summ, "rows": rows}, indent=1))

    lines = [f"# Closed-form cost vs traced count vs thop, full-size SD-1.x U-Net ({args.resolution} px, batch 1, 77 tokens)", "",
             f"Machine: {meta['device']} ({ncpu} cores), torch {meta['torch']}, diffusers {meta['diffusers']}, thop {meta['thop']}. "
             f"Candidates: the {len(groups['presets'])} candidate presets and {args.per_space} draws per space (seed {args.seed}; "
             f"distinct candidates kept). {meta['note']}.", "",
             f"Load average (1, 5, 15 min): {meta['loadavg_before']} before, {meta['loadavg_after']} after."
             + (f" **{meta['load_note']}.**" if loaded else ""), "",
             f"One-time per base: `describe` {meta['describe_s']} s; first closed-form call (the base check) {meta['first_analytic_call_ms']} ms.", "",
             "| group | candidates | exact (all figures, by block) | analytic median (ms) | analytic max (ms) | traced median (s) | traced / analytic | thop runs | thop median (s) | thop / analytic |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, s in summ.items():
        lines.append(f"| {g} | {s['n']} | {s['exact']}/{s['n']} | {s['analytic_ms_median']} | {s['analytic_ms_max']} | {s['traced_s_median']} | "
                     f"{s['traced_over_analytic']}x | {s['thop_n']} | {s['thop_s_median'] if s['thop_s_median'] is not None else '-'} | "
                     f"{str(s['thop_over_analytic']) + 'x' if s['thop_over_analytic'] else '-'} |")
    th = [r for r in rows if "thop_s" in r]
    lines += ["", f"thop's integer equals the closed form's `macs_conv_linear` on {sum(r['thop_equals_macs_conv_linear'] for r in th)}/{len(th)} profiled candidates.",
              "", "| group | candidate | analytic (ms) | count only (ms) | traced (s) | thop (s) | exact | params | MACs | MACs conv+linear |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['candidate'][:60]} | {r['analytic_ms']} | {r['analytic_count_only_ms']} | {r['traced_s']} | "
                     f"{r.get('thop_s', '-')} | {r['exact']} | {r['params']} | {r['macs']} | {r['macs_conv_linear']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(summ)]))


if __name__ == "__main__":
    main()
