"""A short run whose last weights settle: the held-out output MSE after 40 steps of a cosine-decayed or
averaged distillation, read against the EMA reference.

The held-out output MSE after 40 steps of the long run's own training (constant lr 5e-4) ranks the
25 candidates at Kendall tau 0.773 against the EMA reference (``ema_reference.py``), the nearest of
every score tried to the target of 0.8 within 10% of a long run. The raw weights at a constant
learning rate wander about where training has got to; their moving average, or weights whose
learning rate has decayed, do not. This experiment, fixed in ``results/proxy_fidelity/notes.md``
before any of it was run, distils every candidate again from the start for 40 steps (batch 16, lr
5e-4, training seed 0; recombinations on the first runs' Base) in three variants (``VARIANTS``):

- ``constant``: the first runs' own training, the control: it puts this machine's seconds on the
  scale of the first runs' machines (their distillation seconds to step 40 over this run's) and
  checks that the student is the first run's (the same held-out MSE at step 40);
- ``cosine``: the learning rate cosine-decayed from 5e-4 to 0 over the 40 steps, scored on the last
  weights;
- ``ema``: the constant rate with a moving average of the trainable weights (diffusers' ``EMAModel``,
  decay 0.9 with its warm-up), scored on the average.

Each is scored by the held-out output MSE against the teacher (64 held-out latents, evaluation seed
0), as ``run.py`` scores its runs. The rule (``ema_reference.passes``): a variant replaces the default
proxy only at a cost of at most 10% of a long run and tau >= 0.8 against the EMA reference and each
one-seed reference; if both pass, the one with the higher tau; and one that passes becomes the
default only after a third fresh list of candidates, fixed before it is run, also ranks at >= 0.8.
A run that fails (divergence, a NaN) scores +inf: ranked last.

One process per candidate (``--only``; the records are kept, a rerun skips what is done), then:

    python -m experiments.research.proxy_fidelity.settle --out results/proxy_fidelity --only bk-sdm-small
    python -m experiments.research.proxy_fidelity.settle --out results/proxy_fidelity --analyse-only

Written to ``<results>/proxy_fidelity_settle.md`` (+ ``.json``, ``.png``); per candidate the record
``settle/<name>.json`` (``records.py``: loose until packed into ``<out>/settle.tar.xz``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.research.proxy_fidelity import (
    ema_reference,  # the reference and the rule
    run,  # the candidates, the first runs, rank statistics
)
from experiments.research.proxy_fidelity.records import Records

STEPS = 40
# name -> the DistillConfig fields that differ from the first runs' training (fixed in notes.md)
VARIANTS: dict[str, dict] = {
    "constant": {},
    "cosine": {"lr_schedule": "cosine"},
    "ema": {"ema_decay": 0.9},
}
CONTROL = "constant"
LABELS = {"constant": f"held-out output MSE after {STEPS} steps, constant lr (control: the first runs' training, rerun here)",
          "cosine": f"held-out output MSE after {STEPS} steps, lr cosine-decayed to 0 over them",
          "ema": f"held-out output MSE after {STEPS} steps, moving average of the weights (decay 0.9, warm-up)"}


def settle_candidate(name: str, spec, args, pipe, arch, data, heldout, sched, base_unet, record: dict) -> dict:
    """The variants of ``VARIANTS`` that ``record`` lacks, each a fresh 40-step run of ``name`` scored
    by the held-out output MSE; ``record`` updated in place and returned."""
    from hybridsd_nas.build import build_student
    from hybridsd_nas.arch import plan
    from hybridsd_nas.distill import DistillConfig, distill
    from hybridsd_nas.proxy import zero_cost_scores

    p = plan(arch, run._resolve(spec, arch))
    uses_base = bool(p.candidate.base_blocks)
    for variant, fields in VARIANTS.items():
        if variant in record["variants"]:
            continue
        student = build_student(p, teacher=pipe.unet, device=args.device, base_unet=base_unet if uses_base else None)
        cfg = DistillConfig(steps=STEPS, batch_size=args.batch_size, lr=args.lr, seed=args.train_seed, log_every=1, **fields)
        t0 = time.perf_counter()
        res = distill(student, pipe.unet, p, data, sched, cfg, progress=True)
        distill_s = time.perf_counter() - t0
        rec = {"status": res.status, "reason": res.reason, "distill_seconds": round(distill_s, 2), "config": res.config,
               "ema": res.ema, "final_loss": res.curve[-1]["loss"] if res.curve else None}
        if res.status == "ok":  # an ok EMA run hands the student back holding the average
            h0 = time.perf_counter()
            rec["heldout"] = zero_cost_scores(student, pipe.unet, heldout, sched, n=args.heldout_latents, seed=args.seed + 1)
            rec["heldout"]["seconds"] = round(time.perf_counter() - h0, 3)
        record["variants"][variant] = rec
        print(f"  {name} {variant}: " + (f"held-out output MSE {rec['heldout']['output_mse']:.5f}" if "heldout" in rec
                                         else f"{res.status}: {res.reason}") + f", {distill_s:.0f} s distill", file=sys.stderr, flush=True)
    return record


def _score(rec: dict | None) -> float:
    if rec is None or rec["status"] != "ok" or "heldout" not in rec:
        return float("inf")
    return float(rec["heldout"]["output_mse"])


def analyse(out: Path, results: Path, args) -> dict:
    """Each variant's score against the EMA reference (``ema_reference._taus``), its cost as a fraction of
    the first runs' long runs (this machine's seconds scaled by the control), the control against the
    first runs, and the rule of the module docstring applied."""
    L = str(args.long_steps)
    store = Records(out)
    settled = {Path(n).stem: store.read(n) for n in store.names("settle/*.json")}
    replicates, ema, have, names, missing, complete = ema_reference.reading(  # the 25 it was fixed on
        out, args.long_steps, args.ema_decay,
        lambda r: r["candidate"] in settled and all(v in settled[r["candidate"]]["variants"] for v in VARIANTS),
        scope=ema_reference.before_third_list)
    rep: dict = {"steps": STEPS, "variants": {v: {"label": LABELS[v], "fields": VARIANTS[v]} for v in VARIANTS},
                 "candidates": len(names), "missing": missing, "complete": complete,
                 "machines": sorted({run.machine_of(settled[n]) for n in names}),
                 "first_run_machines": sorted({run.machine_of(r) for r in have}), "per_candidate": []}
    if len(names) < 3:
        _write(rep, results)
        return rep
    _, ref, _, raw_ref = ema_reference.references(have, ema, replicates, args.long_steps)
    long_cost = run._long_cost(have, L)
    # seconds on the first run's machine per second here: the same training to step 40 (the control)
    speed = np.array([r["evals"][str(STEPS)]["distill_seconds"] / max(settled[r["candidate"]]["variants"][CONTROL]["distill_seconds"], 1e-9)
                      for r in have])
    timed = ema_reference.timed_mask(names)
    rep["cost_left_out"] = [n for n, t in zip(names, timed) if not t]
    rep["speed"] = {"median": float(np.median(speed[timed])), "min": float(np.min(speed[timed])), "max": float(np.max(speed[timed]))}
    # the control against the first runs: the same training, so the same held-out MSE up to float32 rounding
    first = np.array([r["evals"][str(STEPS)]["heldout"]["output_mse"] for r in have])
    control = np.array([_score(settled[n]["variants"][CONTROL]) for n in names])
    rel = np.abs(control / first - 1)
    # recombinations train on a Base distilled again here, not the first runs' own: theirs differ more
    on_base = np.array([r["space"] == "recombination" for r in have])
    rep["control"] = {"kendall_tau_first_runs_score": ema_reference._taus(first, ref, raw_ref, ema, names)["kendall_tau"]}
    for key, mask in (("without_base", ~on_base), ("recombinations", on_base)):
        if mask.any():
            rep["control"][key] = {"candidates": int(mask.sum()), "max_relative_difference": float(np.max(rel[mask])),
                                   "median_relative_difference": float(np.median(rel[mask])),
                                   "worst": [n for n, m in zip(names, mask) if m][int(np.argmax(rel[mask]))]}
    rep["base_rebuilt"] = next((settled[n].get("base_rebuilt") for n, m in zip(names, on_base) if m and settled[n].get("base_rebuilt")), None)
    settings = []
    for v in VARIANTS:
        recs = [settled[n]["variants"][v] for n in names]
        x = np.array([_score(r) for r in recs])
        cost = speed * np.array([r["distill_seconds"] + (r.get("heldout") or {}).get("seconds", 0.0) for r in recs])
        s = {"what": LABELS[v], "variant": v, "distill_steps": STEPS, "control": v == CONTROL,
             "failed": [n for n, r in zip(names, recs) if r["status"] != "ok"]}
        s.update(ema_reference._taus(x, ref, raw_ref, ema, names))
        s.update(run._cost_fields(cost[timed], long_cost[timed]))
        settings.append(s)
    rep["settings"] = settings
    if complete:
        passing = [s for s in settings if not s["control"] and ema_reference.passes(s)]
        rep["passing"] = [s["variant"] for s in passing]
        rep["picked"] = max(passing, key=lambda s: s["kendall_tau"])["variant"] if passing else None
    else:  # interim: nothing is picked
        rep["passing"] = rep["picked"] = None
    rep["per_candidate"] = [{"candidate": n, "set": run.set_of(r), "space": r["space"], "ema_reference": float(m),
                             "first_run_heldout_mse": float(f),
                             **{v: _score(settled[n]["variants"][v]) for v in VARIANTS}}
                            for n, r, m, f in zip(names, have, ref, first)]
    _write(rep, results)
    return rep


def _write(rep: dict, results: Path) -> None:
    ema_reference.write_report(rep, results, "proxy_fidelity_settle", _markdown, _plot if rep.get("settings") else None)


def _plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = rep["per_candidate"]
    fig, axes = plt.subplots(1, len(rep["settings"]), figsize=(4.2 * len(rep["settings"]), 4.0), sharey=True)
    y = [c["ema_reference"] for c in pc]
    for ax, s in zip(np.atleast_1d(axes), rep["settings"]):
        x = [c[s["variant"]] for c in pc]
        ax.scatter(x, y, s=14)
        for c, a, b in zip(pc, x, y):
            ax.annotate(c["candidate"], (a, b), fontsize=5)
        ax.set_xscale("log")
        ax.set_xlabel(f"held-out output MSE, {s['variant']} ({STEPS} steps)")
        ax.set_title(f"tau {s['kendall_tau']:.3f}, {100 * s['cost_fraction_mean']:.1f}% of a long run", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("EMA long FID (400 steps, 128 samples;\nmean over training seeds 0, 1)")
    fig.suptitle(f"40-step scores vs the EMA reference, {len(pc)} candidates, float32, batch 16, training seed 0, "
                 f"evaluation seed 0, 64 held-out latents\nshort runs on {'; '.join(rep['machines'])}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rep: dict) -> str:
    f3 = ema_reference.f3
    lines = ["# A 40-step run whose last weights settle, against the EMA reference", "",
             f"Each candidate distilled again from the start for {STEPS} steps (batch 16, lr 5e-4, training seed 0, float32; "
             "recombinations on the first runs' Base) in each variant below, and scored by the output MSE against the teacher "
             "on 64 fixed held-out noisy latents (evaluation seed 0). Reference: " + ema_reference.REFERENCE_WORDS + ". Short runs on "
             f"{'; '.join(rep['machines']) or '-'}; costs are fractions of the first runs' long runs (on "
             f"{'; '.join(rep['first_run_machines']) or '-'}), this machine's seconds scaled by the control"
             + ema_reference.cost_words(rep)
             + ". Made by `experiments/research/proxy_fidelity/settle.py`; the variants and the rule were fixed in "
             "`results/proxy_fidelity/notes.md` before any was run.", ""]
    lines += ema_reference.interim_words(rep)
    if rep.get("settings"):
        lines += ["| score | cost, % of a long run | Kendall tau, EMA reference | Spearman rho | tau, raw reference | "
                  "tau, seed 0 alone | tau, seed 1 alone | failed runs |", "|---|---|---|---|---|---|---|---|"]
        for s in rep["settings"]:
            lines.append(f"| {s['what']} | {100 * s['cost_fraction_mean']:.1f} | {f3(s['kendall_tau'])} | {f3(s['spearman_rho'])} | "
                         f"{f3(s['kendall_tau_raw_reference'])} | {f3(s.get('kendall_tau_seed0'))} | {f3(s.get('kendall_tau_seed1'))} | "
                         f"{', '.join(s['failed']) or 'none'} |")
        c, sp, b = rep["control"], rep["speed"], rep.get("base_rebuilt")
        within = lambda k, what: (f" {what} ({c[k]['candidates']}): within {100 * c[k]['max_relative_difference']:.2g}% "  # noqa: E731
                                  f"(median {100 * c[k]['median_relative_difference']:.2g}%, largest for {c[k]['worst']})") if k in c else ""
        lines += ["", f"- Control: the first runs' training rerun here gives their held-out MSE at step {STEPS}:"
                      + within("without_base", "candidates without a Base") + ";"
                      + within("recombinations", "recombinations, on the Base distilled again here") + "."
                      + (f" That Base's long FID is {b['long_fid']:.3f} against {b['recorded_long_fid']:.3f} for the first runs' "
                         "(the same settings and seed on another machine)." if b else "")
                      + f" The first runs' own score ranks these candidates at tau {c['kendall_tau_first_runs_score']:.3f}. "
                      f"This machine ran the same training {sp['median']:.2f}x as fast as the first runs' machines (median; "
                      f"{sp['min']:.2f}-{sp['max']:.2f}x)."]
        if rep["complete"]:
            lines.append(f"- The rule (cost <= {100 * ema_reference.MAX_COST:.0f}%, tau >= {ema_reference.TARGET_TAU} against the reference and "
                         "each one-seed reference; the control is not a candidate): "
                         + (f"passing: {', '.join(rep['passing'])}; picked: **{rep['picked']}**, which becomes the default only after a "
                            "third fresh list, fixed before it is run, also ranks at >= 0.8." if rep["passing"] else "no variant passes."))
        lines += ["", "![40-step scores against the EMA reference](proxy_fidelity_settle.png)", "",
                  "| candidate | set | space | EMA reference | first run's held-out MSE | " + " | ".join(rep["variants"]) + " |",
                  "|---|---|---|---|---|" + "---|" * len(rep["variants"])]
        for p in rep["per_candidate"]:
            lines.append(f"| {p['candidate']} | {p['set']} | {p['space']} | {p['ema_reference']:.2f} | {p['first_run_heldout_mse']:.5f} | "
                         + " | ".join("failed" if not np.isfinite(p[v]) else f"{p[v]:.5f}" for v in rep["variants"]) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory (its runs, replicates and Base)")
    ap.add_argument("--results", default="results", help="where proxy_fidelity_settle.md/.json/.png go")
    ap.add_argument("--only", default=None, help="comma-separated candidate names (default: every first run)")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--base", default=None, help="the first runs' long-distilled BK-SDM-Base (default: <out>/bk-sdm-base-long)")
    ap.add_argument("--rebuild-base", action="store_true",
                    help="when that Base's export is missing, distill it again from its recorded run's settings (run.py's)")
    ap.add_argument("--device", default="cpu")
    # the first runs' settings (results/proxy_fidelity.json): the control repeats their training
    ap.add_argument("--long-steps", type=int, default=400)
    ap.add_argument("--ema-decay", type=float, default=0.99, help="the decay of the EMA reference read")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = ema_reference.first_runs(out)
    if not rows:
        ap.error(f"--out {out}: no first runs of run.py there (runs/<candidate>.json)")
    known = [r["candidate"] for r in rows]
    only = args.only.split(",") if args.only else known
    unknown = [n for n in only if n not in known]
    if unknown:
        ap.error(f"--only: no first run of {', '.join(unknown)}; known: {', '.join(known)}")
    if not args.analyse_only:
        # run.run_candidate's (and run.rebuild_base's) arguments: the first runs' settings; the Base's
        # rebuild takes its long evaluation (128 samples) and none of the proxies
        meta = {"long_steps": args.long_steps, "checkpoints": [], "score_checkpoints": [], "paired_checkpoints": [],
                "heldout_latents": 64, "batch_size": 16, "lr": 5e-4, "proxy_samples": 32, "long_samples": 128,
                "sampler_steps": 25, "guidance": 4.0, "tf32": False, "defer_fid": False, "seed": 0, "train_seed": 0,
                "replicate": None, "rescore": False, "paired_samples": 8, "list": "first", "base_used": None, "base_rebuilt": None}
        rargs = argparse.Namespace(**{**meta, **vars(args), "ema_decay": 0.0})
        pipe, arch, data, heldout, sched = run.setup(rargs)
        specs = {n: s for lst in run.LISTS.values() for n, s in lst}
        base_unet = None
        store = Records(out)
        for name in only:
            f = f"settle/{name}.json"
            record = store.read(f) if store.exists(f) else {"candidate": name, "variants": {}}
            if all(v in record["variants"] for v in VARIANTS):
                print(f"{name}: done before, kept", file=sys.stderr)
                continue
            base_unet = run._base_for(name, specs[name], arch, rargs, out, base_unet, (pipe, arch, data, heldout, sched))
            print(f"{name}: {STEPS} steps in each of {', '.join(v for v in VARIANTS if v not in record['variants'])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rebuilt = Path(rargs.base_used or "-") / "rebuilt_run.json"
            record.update({"machine": run.machine_label(args.device), "torch": torch.__version__,
                           "base": str(rargs.base_used) if rargs.base_used else None,
                           "base_rebuilt": {"long_fid": (b := json.loads(rebuilt.read_text()))["evals"][str(args.long_steps)]["long"]["proxy_fid"],
                                            "recorded_long_fid": b["recorded"]["long_fid"]} if rebuilt.is_file() else None})
            settle_candidate(name, specs[name], rargs, pipe, arch, data, heldout, sched, base_unet, record)
            record["wall_seconds"] = round(time.perf_counter() - t0, 1)
            store.write(f, record)
    rep = analyse(out, Path(args.results), args)
    done = ", ".join(f"{s['variant']} tau {s['kendall_tau']:.3f} ({100 * s['cost_fraction_mean']:.1f}%)" for s in rep.get("settings", []))
    print(f"{rep['candidates']} candidates ({'complete' if rep['complete'] else 'interim'})" + (f": {done}" if done else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
