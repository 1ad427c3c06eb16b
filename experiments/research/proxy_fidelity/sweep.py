"""Proxy settings of their own: does a short distillation at another batch size or learning rate rank
candidates better for its cost than the first steps of the long run?

``run.py`` takes every proxy from the first steps of the long run itself (batch 16, lr 5e-4), so its
proxies can only be shorter, not different. Here each candidate that ``run.py`` ran is distilled
again from the start with each of ``SETTINGS`` (fixed in code before any of them was run), and the
cheap score, the output MSE against the teacher on the fixed held-out noisy latents (no sampling),
is taken at every listed step. The reference is ``run.py``'s: the mean long FID over each
candidate's long runs.

Costs are put on the scale of the long runs they are a fraction of: every candidate is first run
for 10 steps with the long run's own settings (``calibration``), and the ratio of the long run's
distillation seconds to those of the calibration at step 10 scales this machine's seconds to the
machine of the long run. The calibration also checks that the student is the long run's (the same
held-out MSE at step 10).

The rule that picks a setting is ``run.choose``, applied to the first candidates (``run.CANDIDATES``)
only; the fresh candidates (``run.FRESH``) then check it. Written to ``<results>/proxy_fidelity_sweep.md``
(+ ``.json``, ``.png``); per candidate and setting, the record ``sweep/<setting>/<name>.json``
(``records.py``: loose until packed into ``<out>/sweep.tar.xz``), kept across reruns.

    python -m experiments.research.proxy_fidelity.sweep --out results/proxy_fidelity --base DIR
    python -m experiments.research.proxy_fidelity.sweep --out results/proxy_fidelity --analyse-only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.research.proxy_fidelity import run  # the experiment this one extends: candidates, scores, reference, rule
from experiments.research.proxy_fidelity.records import Records

# name, batch size, learning rate, steps at which the held-out score is taken (the last ends the run).
# Fixed before any was run: smaller batches for more steps at the same cost, and larger learning
# rates, so that the proxy's student gets further from its starting point within the budget.
SETTINGS: list[tuple[str, int, float, tuple[int, ...]]] = [
    ("b4-lr5e-4", 4, 5e-4, (10, 20, 40, 80, 160)),
    ("b4-lr1e-3", 4, 1e-3, (10, 20, 40, 80, 160)),
    ("b4-lr2e-3", 4, 2e-3, (10, 20, 40, 80, 160)),
    ("b8-lr1e-3", 8, 1e-3, (10, 20, 40, 80)),
    ("b16-lr2e-3", 16, 2e-3, (5, 10, 20, 40)),
]
CALIBRATION_STEP = 10


def _run_args(args, batch: int, lr: float, steps, fresh: bool) -> argparse.Namespace:
    """run.run_candidate's arguments for a short run with the cheap score only (its rescore mode:
    no sampling, no long evaluation, no export)."""
    return argparse.Namespace(**{**vars(args), "batch_size": batch, "lr": lr, "score_checkpoints": sorted(steps),
                                 "checkpoints": [], "paired_checkpoints": [], "rescore": True, "replicate": None,
                                 "fresh": fresh})


def speed(record: dict, calibration: dict) -> float:
    """Seconds on the long run's machine per second here: the distillation seconds of both to the
    calibration step (the same training)."""
    k = str(CALIBRATION_STEP)
    return record["evals"][k]["distill_seconds"] / max(calibration["evals"][k]["distill_seconds"], 1e-9)


def sweep_scores(records: list[dict], sweep: dict[str, dict[str, dict]]) -> list[dict]:
    """One score per setting and step, over the candidates of ``records`` (run.py's records, in
    order); ``sweep[setting][name]`` is that setting's run of the candidate. A candidate whose run
    failed before the step (divergence, a NaN) scores +inf there: ranked last. A setting that some
    candidate lacks is left out. Costs are in the long run's seconds (``speed``)."""
    out = []
    names = [r["candidate"] for r in records]
    cal = sweep.get("calibration", {})
    if not all(n in cal for n in names):
        return out
    sp = np.array([speed(r, cal[r["candidate"]]) for r in records])
    for sname, batch, lr, steps in SETTINGS:
        runs = sweep.get(sname, {})
        if not all(n in runs for n in names):
            continue
        # what a run that failed before a step cost: its seconds to the last step it reached
        last = [max((e["distill_seconds"] for e in runs[c]["evals"].values()), default=0.0) for c in names]
        for n in steps:
            ev = [runs[c]["evals"].get(str(n)) for c in names]
            out.append({"what": f"{sname}: held-out output MSE after {n} steps (batch {batch}, lr {lr:g})", "setting": sname,
                        "batch_size": batch, "lr": lr, "distill_steps": n,
                        "score": np.array([e["heldout"]["output_mse"] if e and np.isfinite(e["heldout"]["output_mse"]) else np.inf
                                           for e in ev]),
                        "cost": sp * np.array([e["distill_seconds"] + e["heldout"]["seconds"] if e else t for e, t in zip(ev, last)])})
    return out


def analyse(records: list[dict], sweep: dict[str, dict[str, dict]], ref: dict[str, list[float]], noise: dict | None,
            args, meta: dict, results: Path) -> dict:
    first = [r for r in records if r.get("set") != "fresh"]
    fresh = [r for r in records if r.get("set") == "fresh"]
    both = first + fresh
    y = np.array([float(np.mean(ref[r["candidate"]])) for r in both])
    nf = len(first)
    long_cost = run._long_cost(both, str(args.long_steps))
    macs = -np.array([float(r["macs"]) for r in both])
    sep = None
    if noise:
        sep = run.pair_separation(noise["diff_sd"], noise.get("train_sd") or 0.0, np.array([len(ref[r["candidate"]]) for r in both]))
    table = []
    for sc in sweep_scores(both, sweep):
        x, frac = sc["score"], sc["cost"] / long_cost
        d = {k: v for k, v in sc.items() if k not in ("score", "cost")}
        d.update({"kendall_tau": run.kendall_spearman(x[:nf], y[:nf])["kendall_tau"],
                  "partial_tau_given_macs": run.partial_tau(x[:nf], y[:nf], macs[:nf]),
                  "cost_fraction_mean": float(np.mean(frac[:nf])), "cost_fraction_max": float(np.max(frac[:nf])),
                  "failed_first": int(np.sum(~np.isfinite(x[:nf])))})
        if len(fresh) >= 3:
            every = run.kendall_spearman(x, y, sep) if sep is not None else {}
            d.update({"kendall_tau_fresh": run.kendall_spearman(x[nf:], y[nf:])["kendall_tau"],
                      "kendall_tau_all": run.kendall_spearman(x, y)["kendall_tau"],
                      "cost_fraction_mean_fresh": float(np.mean(frac[nf:])),
                      "separated_pairs_all": every.get("separated_pairs"), "separated_agree_all": every.get("separated_agree")})
        table.append(d)
    chosen = run.choose(table)
    ceiling = None
    if noise and noise.get("train_sd") and len(fresh) >= 3:  # what the reference's own noise lets any score show over all
        ceiling = run.repeat_tau(y, noise["train_sd"], runs=np.array([len(ref[r["candidate"]]) for r in both]))
    report = {"meta": meta, "settings": [dict(zip(("name", "batch_size", "lr", "steps"), s)) for s in SETTINGS],
              "reference_runs": {r["candidate"]: len(ref[r["candidate"]]) for r in both}, "first": nf, "fresh": len(fresh),
              "long_samples": both[0]["evals"][str(args.long_steps)]["long"].get("samples"),
              "table": table, "chosen": chosen, "ceiling_all": ceiling,
              "calibration": {r["candidate"]: {"speed": speed(r, sweep["calibration"][r["candidate"]]),
                                               "heldout_mse": sweep["calibration"][r["candidate"]]["evals"][str(CALIBRATION_STEP)]["heldout"]["output_mse"],
                                               "heldout_mse_long_run": r["evals"][str(CALIBRATION_STEP)]["heldout"]["output_mse"]}
                              for r in both if r["candidate"] in sweep.get("calibration", {})}}
    results.mkdir(parents=True, exist_ok=True)
    (results / "proxy_fidelity_sweep.json").write_text(json.dumps(report, indent=1))
    _plot(table, results / "proxy_fidelity_sweep.png", nf, len(fresh), ceiling,
          f"held-out output MSE on {args.heldout_latents} latents against the mean long FID; {meta['machine']}, float32, seed {args.seed}")
    _markdown(report, args, results / "proxy_fidelity_sweep.md")
    return report


def _plot(table: list[dict], path: Path, nf: int, n_fresh: int, ceiling: dict | None, how: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if n_fresh >= 3 else 1, figsize=(13.5 if n_fresh >= 3 else 8, 4.2), squeeze=False)
    for ax, key, title in zip(axes[0], ("kendall_tau", "kendall_tau_all"),
                              (f"first {nf} candidates (the rule picks here)", f"all {nf + n_fresh} candidates")):
        for sname, *_ in SETTINGS:
            pts = [(100 * t["cost_fraction_mean"], t[key]) for t in table if t["setting"] == sname and key in t]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sname)
        ax.axhline(0.8, color="grey", lw=0.8, ls="--", label="target 0.8")
        if ceiling and key == "kendall_tau_all":
            ax.axhspan(ceiling["predictor_p10"], ceiling["predictor_p90"], color="grey", alpha=0.15,
                       label="a noise-free score (10th-90th pct.)")
            ax.axhline(ceiling["median"], color="black", lw=0.8, ls="-.", label="a repeat of the reference (median)")
        ax.axvline(10, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("cost, % of one long run (mean over the first candidates)")
        ax.set_ylabel("Kendall tau against the long FID")
        ax.set_title(title, fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(how, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict, args, path: Path) -> None:
    m, table, chosen = report["meta"], report["table"], report["chosen"]
    fresh = report["fresh"] >= 3
    lines = ["# Proxy settings of their own", "",
             f"Teacher `{args.teacher}`. Each of the {report['first']} first and {report['fresh']} fresh candidates of "
             "`proxy_fidelity.md` distilled again from the start with each setting below (task + output KD + feature KD, "
             f"weights 1/1/1, seed {args.seed}), scored by the output MSE against the teacher on {args.heldout_latents} fixed "
             "held-out noisy latents (no sampling) at each listed step. Reference: the mean long FID over each candidate's "
             f"{run.span(report['reference_runs'].values())} training seeds (each seed's runs averaged first) of {args.long_steps}-step runs "
             f"(batch {args.batch_size}, lr {args.lr:g}; {report['long_samples']} samples, FID against the teacher's samples on the "
             "same prompts and seeds). Settings, fixed in code before any was run: "
             + "; ".join(f"{s['name']} (batch {s['batch_size']}, lr {s['lr']:g}, to {max(s['steps'])} steps)" for s in report["settings"]) + ".",
             "",
             f"Measured on {m['machine']}, float32, torch {m['torch']}; costs are this machine's distillation seconds scaled to "
             "the machine of each long run by the ratio of the two at step 10 of the long run's own settings (run here first), "
             f"as a fraction of that long run's seconds. Wall time of the sweep: {m.get('wall_seconds', 0) / 60:.0f} min.", "",
             "| setting | steps | Kendall tau, first | partial tau given MACs, first | cost / long cost (first: mean, max) |"
             + (" Kendall tau, fresh | Kendall tau, all | separated pairs, all: same order |" if fresh else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if fresh else "")]
    for t in table:
        pt = f"{t['partial_tau_given_macs']:.3f}" if np.isfinite(t["partial_tau_given_macs"]) else "-"
        failed = f" ({t['failed_first']} failed)" if t["failed_first"] else ""
        row = (f"| {t['setting']}{' **(picked)**' if chosen and t['what'] == chosen['what'] else ''} | {t['distill_steps']} | "
               f"{t['kendall_tau']:.3f}{failed} | {pt} | "
               f"{100 * t['cost_fraction_mean']:.1f}%, {100 * t['cost_fraction_max']:.1f}% |")
        if fresh:
            sp = f"{t['separated_agree_all']} of {t['separated_pairs_all']}" if t.get("separated_pairs_all") is not None else "-"
            row += f" {t['kendall_tau_fresh']:.3f} | {t['kendall_tau_all']:.3f} | {sp} |"
        lines.append(row)
    lines += ["", "The rule (`run.choose`, the same as in `proxy_fidelity.md`): of the scores costing at most 10% of a long run on the "
              "first candidates, the highest Kendall tau there; a tie goes to the cheaper. "
              + (f"It picks **{chosen['what']}**: tau {chosen['kendall_tau']:.3f} on the first {report['first']} at "
                 f"{100 * chosen['cost_fraction_mean']:.1f}%" + (f"; on the fresh ones {chosen['kendall_tau_fresh']:.3f}, over all "
                                                                  f"{chosen['kendall_tau_all']:.3f}." if fresh else ".")
                 if chosen else "No setting is within the cost."),
              "", "![proxy settings](proxy_fidelity_sweep.png)", ""]
    c = report.get("ceiling_all")
    if c:
        repeat, perfect = run.ceiling_words(c)
        lines += [f"What the reference's own noise lets a score show over all {report['first'] + report['fresh']} candidates: a "
                  f"repeat of the whole reference would rank them against it with {repeat}, a score that knew each expected "
                  f"long FID without noise {perfect}; `proxy_fidelity.md` says how.", ""]
    cal = report["calibration"]
    if cal:
        dev = [abs(c["heldout_mse"] / c["heldout_mse_long_run"] - 1) for c in cal.values()]
        sp = [c["speed"] for c in cal.values()]
        lines += [f"Calibration: this machine ran the long runs' settings {np.median(sp):.2f}x as fast as their machines "
                  f"(median over candidates; {min(sp):.2f}-{max(sp):.2f}x); its held-out MSE at step {CALIBRATION_STEP} "
                  f"matches the long run's to within {100 * max(dev):.2g}% (relative; recombinations take this sweep's Base)."]
    if args.notes:
        lines += ["", Path(args.notes).read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


def load_sweep(out: Path) -> dict[str, dict[str, dict]]:
    """Every run kept so far: ``{setting: {candidate: record}}``."""
    sweep: dict[str, dict[str, dict]] = {}
    store = Records(out)
    for name in store.names("sweep/*/*.json"):
        f = Path(name)
        sweep.setdefault(f.parent.name, {})[f.stem] = store.read(name)
    return sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory (its runs/ and replicates/)")
    ap.add_argument("--results", default="results")
    ap.add_argument("--long-steps", type=int, default=400, help="the long runs' length (as run.py was given)")
    ap.add_argument("--batch-size", type=int, default=16, help="the long runs' batch size (the calibration's)")
    ap.add_argument("--lr", type=float, default=5e-4, help="the long runs' learning rate (the calibration's)")
    ap.add_argument("--heldout-latents", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None, help="the long-distilled BK-SDM-Base for the recombinations (default: <out>/bk-sdm-base-long)")
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--notes", default=None, help="a markdown file of reading notes appended to the report")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = [n for n, _ in run.CANDIDATES + run.FRESH]
    store = Records(out)
    records = [store.read(f) for f in (run.record_name(n, None) for n in names) if store.exists(f)]
    records = [r for r in records if r["status"] == "ok"]
    if not records:
        raise SystemExit(f"error: no candidate runs in {out} (runs.tar.xz or runs/); run "
                         "`python -m experiments.research.proxy_fidelity.run` first")
    # the fields run.run_candidate reads; sampling is never used here (no FID), the held-out score is
    args.sampler_steps = args.guidance = None
    args.proxy_samples = args.long_samples = args.paired_samples = 0
    args.base_used = None
    meta = {"machine": "", "torch": torch.__version__}
    if not args.analyse_only:
        pipe, arch, data, heldout, sched = run.setup(args)
        from hybridsd_nas.cost.latency import device_label

        meta["machine"] = f"{device_label(torch.device('cpu'))} ({platform.machine()}, {torch.get_num_threads()} threads)"
        specs = dict(run.CANDIDATES + run.FRESH)
        only = set(args.only.split(",")) if args.only else None
        base_unet = None
        jobs = [("calibration", args.batch_size, args.lr, (CALIBRATION_STEP,))] + SETTINGS
        for r in records:
            name = r["candidate"]
            if only and name not in only:
                continue
            for sname, batch, lr, steps in jobs:
                f = f"sweep/{sname}/{name}.json"
                if store.exists(f):
                    continue
                base_unet = run._base_for(name, specs[name], arch, args, out, base_unet)
                print(f"{name}: {sname} (batch {batch}, lr {lr:g}, {max(steps)} steps)", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                row = run.run_candidate(name, specs[name], _run_args(args, batch, lr, steps, r.get("set") == "fresh"),
                                        pipe, arch, data, heldout, sched, base_unet, out)
                row.update({"setting": {"name": sname, "batch_size": batch, "lr": lr, "steps": list(steps)},
                            "base": str(args.base_used) if row["space"] == "recombination" else None, "machine": meta["machine"],
                            "wall_seconds": round(time.perf_counter() - t0, 1)})
                row.pop("curve", None)
                store.write(f, row)
    sweep = load_sweep(out)
    machines = {x.get("machine") for v in sweep.values() for x in v.values()} - {None, ""}
    meta["machine"] = meta["machine"] or ", ".join(sorted(machines))
    meta["wall_seconds"] = sum(x.get("wall_seconds", 0.0) for v in sweep.values() for x in v.values())
    ref = run.reference_runs(records, run.load_replicates(out, args.long_steps), args.long_steps)
    noise = run.load_noise(out / "noise_floor.json", args.teacher)
    if noise:
        noise = {**noise, **(run.run_to_run(ref) or {})}
    analyse(records, sweep, ref, noise, args, meta, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
