"""The proxies read against the EMA reference: each candidate's long FID on the moving average of its weights.

``ema_check.py`` found that most of the long run's run-to-run noise is where the last weights happen
to be at a constant learning rate, and that a moving average of the weights (diffusers' ``EMAModel``,
decay 0.99) varies about 0.4x as much between training seeds. By the rule fixed before that check,
the proxies are read against that average from then on. This script does the reading; the rule it
applies was fixed in ``results/proxy_fidelity/notes.md`` before the runs it reads were made.

The reference of a candidate is the mean over training seeds of its EMA long FID at the last step:
``run.py --replicate ema-seedS --train-seed S --ema-decay D`` records it as ``long_ema``, and the
``ema_check.py`` runs (the same protocol) as their ``ema`` evaluation. The scores are the first runs'
(``<out>/runs``): averaging does not touch the training, so the short students are what they were;
costs are fractions of the first runs' long runs, as in ``run.py``'s report. Beside each tau: the same
score against the raw reference (``run.py``'s, all raw long runs) on the same candidates.

The reading: the target is met when the default proxy ranks every candidate at tau >= 0.8 against the
reference. Another score replaces the default only if it costs at most 10% of a long run and ranks
every candidate at tau >= 0.8 against the reference and against each one-seed reference. Until every
candidate has every seed, the report is interim and adopts or drops nothing.

The third fresh list (``run.py --fresh-c``, THIRD_LIST; its first runs keep the average, so they give
their seed-0 reference themselves), fixed before it was run, adds two things once all of it has run:
a passing score (and the default, for the target) must also rank its candidates alone at tau >= 0.8;
and the ranking decision (``ranking_decision``): the held-out output MSE after RANKING_STEPS steps
becomes the default way to rank candidates if it ranks the third list at least as well as the default
FID proxy, and every candidate better than it against the reference and each one-seed reference, at
no more cost.

    python -m experiments.research.proxy_fidelity.ema_reference --out results/proxy_fidelity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from experiments.research.proxy_fidelity import run  # the experiment read here: candidates, scores, rank statistics
from experiments.research.proxy_fidelity.records import Records

TARGET_TAU = 0.8
MAX_COST = 0.10
SEEDS = (0, 1)  # the training seeds the reference is to have for every candidate (notes.md)
# First runs that shared the 2 cores with other work for part of their time (notes.md, the second fresh
# list): their seconds are stretched, so the cost fractions leave them out; their ranks count as any.
SHARED_CORES = ("bk-base-inner-stages", "prune-mixed", "drop-second-down-resnets")
# The third fresh list (run.py --fresh-c, notes.md): a score that passes over every candidate must also rank
# these alone at tau >= TARGET_TAU; and the ranking decision between the held-out output MSE after
# RANKING_STEPS steps and the default FID proxy is read on them.
THIRD_LIST = "fresh-c"
RANKING_STEPS = 40


def ema_runs(out: Path, replicates: dict[str, list[dict]], long_steps: int, decay: float,
             firsts: list[dict] = ()) -> dict[str, dict[int, list[float]]]:
    """Every EMA long FID at step ``long_steps`` kept with decay ``decay``, by candidate and training
    seed: ``run.py``'s repeats (``replicates``, from ``run.load_replicates``: their ``long_ema``), its
    first runs that kept one (``firsts``, ``run.py --ema-decay`` without ``--replicate``) and
    ``ema_check.py``'s runs (``<out>/ema_check``, ``ema``). Runs with another decay, another length,
    unscored deferred samples or a failed status are left out with a warning; exact repeats count once
    (``run.distinct_runs``)."""
    found: list[tuple[str, str, int, float | None, float | None]] = [  # (where, candidate, seed, decay, FID)
        (f"{name}.{x['tag']}", name, x["train_seed"], x["ema_decay"], x["long_ema_fid"])
        for name, xs in replicates.items() for x in xs]
    for r in firsts:
        ev = r.get("evals", {}).get(str(long_steps), {}).get("long_ema")
        found.append((f"runs/{r['candidate']}.json", r["candidate"], r.get("train_seed", run.UNRECORDED_TRAIN_SEED),
                      (r.get("ema") or {}).get("decay"), None if ev is None else float(ev["proxy_fid"])))
    store = Records(out)
    for name in store.names("ema_check/*.json"):
        r = store.read(name)
        ev = r.get("evals", {}).get(str(long_steps), {}).get("ema") if r.get("status") == "ok" else None
        found.append((Path(name).name, r["candidate"], r.get("train_seed", run.UNRECORDED_TRAIN_SEED), (r.get("ema") or {}).get("decay"),
                      None if ev is None else float(ev["proxy_fid"])))
    by: dict[str, dict[int, list[float]]] = {}
    for where, name, seed, kept, fid in found:
        if kept is None:  # a repeat without an average: nothing to read here, nothing to warn of
            continue
        if fid is None:
            print(f"warning: {where} holds no ok, scored EMA long FID at step {long_steps}; not used", file=sys.stderr)
        elif abs(float(kept) - decay) > 1e-12:
            print(f"warning: {where} kept its average with decay {kept}, not {decay}; not used", file=sys.stderr)
        else:
            by.setdefault(name, {}).setdefault(seed, []).append(fid)
    return {n: {k: run.distinct_runs(n, v) for k, v in sorted(d.items())} for n, d in by.items()}


def first_runs(out: Path) -> list[dict]:
    """The first runs (with the proxies) of every candidate list, in list order, each candidate once (a list
    may repeat candidates of another: RETRAINED); failed ones left out."""
    names = list(dict.fromkeys(n for lst in run.LISTS.values() for n, _ in lst))
    store = Records(out)
    rows = [store.read(f) for f in (run.record_name(n, None) for n in names) if store.exists(f)]
    return [r for r in rows if r["status"] == "ok"]


class Reading(NamedTuple):
    """What a reading against the EMA reference reads (this one's, ``settle.py``'s, ``extrapolate.py``'s)."""
    replicates: dict[str, list[dict]]  # run.py's repeats (run.load_replicates)
    ema: dict[str, dict[int, list[float]]]  # the EMA long FIDs by candidate and seed (ema_runs)
    have: list[dict]  # the first runs read: with an EMA reference and usable by the reading
    names: list[str]  # their candidates
    missing: list[str]  # the first runs' candidates left out
    complete: bool  # none left out, and every one read has every seed of SEEDS


def before_third_list(r: dict) -> bool:
    """Whether a first run belongs to the 25 candidates read before the third fresh list: the scope of the
    readings fixed on them (``settle.py``, ``extrapolate.py``)."""
    return run.set_of(r) != THIRD_LIST


def reading(out: Path, long_steps: int, decay: float, usable: Callable[[dict], bool] = lambda r: True,
            scope: Callable[[dict], bool] = lambda r: True) -> Reading:
    """The first runs of ``out`` within ``scope`` that have an EMA reference (decay ``decay``) and that
    ``usable`` accepts; those in scope that lack either are ``missing``."""
    rows = [r for r in first_runs(out) if scope(r)]
    replicates = run.load_replicates(out, long_steps)
    ema = ema_runs(out, replicates, long_steps, decay, rows)
    have = [r for r in rows if r["candidate"] in ema and usable(r)]
    names = [r["candidate"] for r in have]
    missing = [r["candidate"] for r in rows if r["candidate"] not in names]
    return Reading(replicates, ema, have, names, missing, not missing and all(set(SEEDS) <= set(ema[n]) for n in names))


def timed_mask(names: list[str]) -> np.ndarray:
    """Which candidates' first-run seconds the cost fractions use: all but ``SHARED_CORES`` (all, if that
    would leave none)."""
    timed = np.array([n not in SHARED_CORES for n in names])
    return timed if timed.any() else np.ones(len(names), dtype=bool)


def references(have: list[dict], ema: dict[str, dict[int, list[float]]], replicates: dict[str, list[dict]], long_steps: int):
    """The EMA reference of the first runs ``have`` (the mean over training seeds of each seed's mean EMA
    long FID) and the raw reference on the same candidates, each with its per-seed FIDs:
    ``(seed_fid, ref, raw_seed_fid, raw_ref)``, the arrays in the order of ``have``."""
    names = [r["candidate"] for r in have]
    seed_fid = run.seed_means({n: ema[n] for n in names})  # one EMA long FID per training seed
    raw_seed_fid = run.seed_means(run.seed_runs(have, replicates, long_steps))
    return (seed_fid, np.array([np.mean(seed_fid[n]) for n in names]),
            raw_seed_fid, np.array([np.mean(raw_seed_fid[n]) for n in names]))


def analyse(out: Path, results: Path, args) -> dict:
    """Every score of ``run.score_vectors`` against the EMA reference over the candidates that have one,
    beside the raw reference on the same candidates; the rule of the module docstring applied."""
    L = str(args.long_steps)
    # replicates: the raw reference's repeats, and the EMA's run.py runs
    replicates, ema, have, names, missing, complete = reading(out, args.long_steps, args.ema_decay)
    seed_fid, ref, raw_seed_fid, raw_ref = references(have, ema, replicates, args.long_steps)
    rep: dict = {"long_steps": args.long_steps, "ema_decay": args.ema_decay, "seeds_required": list(SEEDS),
                 "candidates": len(names), "candidates_without_ema": missing, "complete": complete,
                 "machines": sorted({run.machine_of(r) for r in have}),
                 "per_candidate": [{"candidate": n, "set": run.set_of(r), "space": r["space"], "ema_by_seed": ema[n],
                                    "ema_reference": float(m), "raw_reference": float(w),
                                    "raw_seeds": len(raw_seed_fid[n]),
                                    "default_proxy_fid": r["evals"][str(args.default_steps)]["proxy"]["proxy_fid"]}
                                   for n, r, m, w in zip(names, have, ref, raw_ref)]}
    if len(names) < 3:
        rep["settings"] = []
        _write(rep, results)
        return rep
    ema_sd = run.run_to_run(seed_fid)
    raw_sd = run.run_to_run(raw_seed_fid)
    rep.update({"ema_seed_sd": ema_sd, "raw_seed_sd": raw_sd,
                "ema_vs_raw_reference": run.kendall_spearman(ref, raw_ref)})
    if ema_sd:
        rep["ceiling"] = run.repeat_tau(ref, ema_sd["train_sd"], runs=np.array([len(seed_fid[n]) for n in names]))
    long_cost = run._long_cost(have, L)
    timed = timed_mask(names)
    rep["cost_left_out"] = [n for n, t in zip(names, timed) if not t]
    third = [i for i, r in enumerate(have) if run.set_of(r) == THIRD_LIST]
    third_list = [n for n, _ in run.LISTS[THIRD_LIST]]
    rep["third_list"] = {"candidates": [names[i] for i in third], "of": len(third_list),
                         "all_run": bool(third) and set(third_list) <= set(names)}
    # once any of the third list has run, the reading is complete only with all of it
    rep["complete"] = complete = complete and (not third or rep["third_list"]["all_run"])
    settings = []
    for sc in run.score_vectors(have, args):
        x = sc["score"]
        s = {k: v for k, v in sc.items() if k not in ("score", "cost")}
        s.update(_taus(x, ref, raw_ref, ema, names))
        if len(third) >= 3:  # the third fresh list alone
            s["kendall_tau_third"] = run.kendall_spearman(x[third], ref[third])["kendall_tau"]
        s.update(run._cost_fields(sc["cost"][timed], long_cost[timed]))
        settings.append(s)
    rep["settings"] = settings
    rep["context"] = _long_run_context(have, L, ref, raw_ref, ema, names)
    default = next((s for s in settings if s.get("samples") and s["distill_steps"] == args.default_steps), None)
    rep["default"] = default["what"] if default else None
    # the rule reads a complete reference, and the third list whole once any of it has run
    if complete and default:
        holds = (lambda s: s["kendall_tau_third"] >= TARGET_TAU) if third else (lambda s: True)
        if third:  # the target as the rule reads any score, the third list's condition included
            rep["target_met"] = passes(default) and holds(default)
        else:
            rep["target_met"] = bool(default["kendall_tau"] >= TARGET_TAU and default["cost_fraction_mean"] <= MAX_COST)
        rep["adoptable"] = [s["what"] for s in settings if passes(s) and holds(s)]
        rep["ranking_decision"] = ranking_decision(settings, default) if third else None
    else:  # interim: nothing is adopted or dropped
        rep["target_met"] = None
        rep["adoptable"] = None
        rep["ranking_decision"] = None
    _write(rep, results)
    return rep


def ranking_decision(settings: list[dict], default: dict) -> dict | None:
    """The decision fixed with the third fresh list (notes.md): the held-out output MSE after
    RANKING_STEPS steps becomes the default way to rank candidates if it ranks the third list at least as
    well as the default FID proxy, and every candidate better than it against the reference and each
    one-seed reference, at no more cost. None where that score was not taken."""
    m = next((s for s in settings if s["what"] == f"held-out output MSE after {RANKING_STEPS} steps (no sampling)"), None)
    if m is None:
        return None
    checks = {"third_list_at_least_as_well": m["kendall_tau_third"] >= default["kendall_tau_third"],
              "all_better": m["kendall_tau"] > default["kendall_tau"],
              **{f"all_better_seed{k}": m[f"kendall_tau_seed{k}"] > default[f"kendall_tau_seed{k}"] for k in SEEDS},
              "no_more_cost": m["cost_fraction_mean"] <= default["cost_fraction_mean"]}
    return {"score": m["what"], "against": default["what"], "checks": checks, "adopted": all(checks.values())}


def _long_run_context(have: list[dict], L: str, ref, raw_ref, ema, names) -> list[dict]:
    """What one whole long run ranks at: the first run's own raw long FID, and its held-out output MSE at
    its last step. Context for the scores' taus (each costs a whole long run), never a candidate for the
    rule; the first run's seed is in the EMA reference where that seed has an EMA run too."""
    out = []
    for what, get in (("one long run, raw weights (the first run's long FID, one of the runs the raw reference averages)", lambda r: r["evals"][L]["long"]["proxy_fid"]),
                      (f"one long run's held-out output MSE at step {L} (no sampling)",
                       lambda r: (r["evals"][L].get("heldout") or {}).get("output_mse"))):
        x = [get(r) for r in have]
        if any(v is None for v in x):
            continue
        out.append({"what": what, **_taus(np.array(x, dtype=float), ref, raw_ref, ema, names)})
    return out


def _taus(x: np.ndarray, ref: np.ndarray, raw_ref: np.ndarray, ema: dict[str, dict[int, list[float]]], names: list[str]) -> dict:
    """How the score ``x`` (one value per candidate of ``names``) ranks them: Kendall tau and Spearman rho
    against the EMA reference ``ref``, tau against the raw reference ``raw_ref``, and tau against each
    one-seed reference over the candidates that have that seed (at least 3), with their count."""
    out = run.kendall_spearman(x, ref)
    out["kendall_tau_raw_reference"] = run.kendall_spearman(x, raw_ref)["kendall_tau"]
    for k in SEEDS:
        idx = [i for i, n in enumerate(names) if k in ema[n]]
        if len(idx) >= 3:
            y = np.array([float(np.mean(ema[names[i]][k])) for i in idx])
            out[f"kendall_tau_seed{k}"] = run.kendall_spearman(x[idx], y)["kendall_tau"]
            out[f"candidates_seed{k}"] = len(idx)
    return out


def heldout_at(r: dict, n: int) -> float:
    """The first run ``r``'s held-out output MSE after ``n`` steps."""
    return float(r["evals"][str(n)]["heldout"]["output_mse"])


def has_heldout(r: dict, steps) -> bool:
    """Whether the first run ``r`` recorded its held-out output MSE at each of ``steps``."""
    return all("heldout" in r["evals"].get(str(n), {}) for n in steps)


def heldout_cost(r: dict, steps) -> float:
    """Seconds of a score read from the first run ``r``'s held-out output MSE at ``steps``: its distillation
    to the last of them and the held-out evaluation at each."""
    return r["evals"][str(max(steps))]["distill_seconds"] + sum(r["evals"][str(n)]["heldout"]["seconds"] for n in steps)


def f3(v) -> str:
    """A tau (or any figure) in a report: three decimals, a dash where there is none."""
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def passes(s: dict) -> bool:
    """The rule for a score to replace the default: within the cost budget, not a baseline, and tau >=
    TARGET_TAU against the reference and against every one-seed reference."""
    if s.get("baseline") or s["cost_fraction_mean"] > MAX_COST:
        return False
    taus = [s["kendall_tau"]] + [s.get(f"kendall_tau_seed{k}", float("nan")) for k in SEEDS]
    return all(np.isfinite(t) and t >= TARGET_TAU for t in taus)


# what the later readings (settle.py, extrapolate.py) read against, in words
REFERENCE_WORDS = ("the EMA reference of `results/proxy_fidelity_ema_reference.md` (long FID of the moving average, decay 0.99, "
                   "after 400 steps, 128 samples, PNDM 25 steps, guidance 4, 32 px; mean over training seeds 0 and 1)")


def cost_words(rep: dict) -> str:
    """The cost exclusion of ``rep`` (its ``cost_left_out``) in words, or nothing."""
    left = rep.get("cost_left_out")
    return f"; costs leave out {', '.join(left)} (first runs that shared the cores)" if left else ""


def interim_words(rep: dict) -> list[str]:
    """The interim line of a later reading (its ``complete``, ``candidates``, ``missing``), or none."""
    if rep["complete"]:
        return []
    return [f"**Interim**: {rep['candidates']} candidates" + (f"; not yet: {', '.join(rep['missing'])}" if rep["missing"] else "")
            + ". Nothing is adopted on this reading.", ""]


def write_report(rep: dict, results: Path, stem: str, markdown, plot=None) -> None:
    """``rep`` as ``<results>/<stem>.json``, ``markdown(rep)`` as ``.md`` and, when given, ``plot(rep, path)``
    as ``.png``."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(rep, indent=1))
    (results / f"{stem}.md").write_text(markdown(rep))
    if plot is not None:
        plot(rep, results / f"{stem}.png")


def _write(rep: dict, results: Path) -> None:
    write_report(rep, results, "proxy_fidelity_ema_reference", _markdown, _plot if len(rep["per_candidate"]) >= 3 else None)


def _plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = rep["per_candidate"]
    x = [c["default_proxy_fid"] for c in pc]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, key, label in ((axes[0], "ema_reference", "EMA"), (axes[1], "raw_reference", "raw weights")):
        y = [c[key] for c in pc]
        ax.scatter(x, y, s=14)
        for c, a, b in zip(pc, x, y):
            ax.annotate(c["candidate"], (a, b), fontsize=6)
        ax.set_xlabel("default proxy FID (10 steps, 32 samples)")
        ax.set_ylabel(f"long FID, {label}\n({rep['long_steps']} steps, 128 samples; mean over seeds)")
    fig.suptitle(f"proxy vs long distillation, {len(pc)} candidates, float32, evaluation seed 0"
                 + ("" if rep["complete"] else " (interim: not every candidate has every seed)")
                 + f"\nfirst runs on {'; '.join(rep['machines'])}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rep: dict) -> str:
    L = rep["long_steps"]
    pc = rep["per_candidate"]
    lines = ["# Proxy rank fidelity against the EMA reference", "",
             f"Reference: each candidate's long FID on the moving average of its trainable weights (diffusers' EMAModel, decay "
             f"{rep['ema_decay']}, warm-up capped) after {L} distillation steps (batch 16, lr 5e-4, constant), 128 samples on fixed "
             "prompts and seeds (evaluation seed 0), PNDM 25 steps, guidance 4, 32 px, FID against the teacher's samples on the same "
             f"prompts and seeds; the mean over training seeds. Float32. Scores and their costs: the first runs' "
             f"(`results/proxy_fidelity.md`), on {', '.join(rep['machines'])}"
             + (f"; costs leave out {', '.join(rep['cost_left_out'])} (their first runs shared the cores with other work)"
                if rep.get("cost_left_out") else "") + ". "
             "Made by `experiments/research/proxy_fidelity/ema_reference.py`; the rule below was fixed in "
             "`results/proxy_fidelity/notes.md` before these runs were read.", ""]
    if not rep["complete"]:
        counts = [len(c["ema_by_seed"]) for c in pc]
        lines += [f"**Interim**: {len(pc)} candidates have an EMA run"
                  + (f" ({sum(1 for k in counts if k >= len(rep['seeds_required']))} with every seed of {rep['seeds_required']})" if pc else "")
                  + (f"; without one: {', '.join(rep['candidates_without_ema'])}" if rep["candidates_without_ema"] else "")
                  + ". Nothing is adopted or dropped on this reading.", ""]
    if rep.get("settings"):
        third = (rep.get("third_list") or {}).get("candidates", [])
        has_third = any("kendall_tau_third" in s for s in rep["settings"])
        lines += [f"| score | cost, % of a long run | Kendall tau, EMA reference | Spearman rho | tau, raw reference (same candidates) | "
                  + " | ".join(f"tau, seed {k} alone" for k in rep["seeds_required"])
                  + (f" | tau, third fresh list alone ({len(third)})" if has_third else "") + " |",
                  "|---|---|---|---|---|" + "---|" * (len(rep["seeds_required"]) + has_third)]
        rd = rep.get("ranking_decision") or {}
        for s in rep["settings"]:
            # once the ranking decision is adopted the default read here is the earlier one, and the adopted score ranks
            name = s["what"] + (" **(default)**" if s["what"] == rep.get("default") and not rd.get("adopted") else
                                " **(the default read: the earlier one)**" if s["what"] == rep.get("default") else
                                " **(adopted: the default way to rank)**" if rd.get("adopted") and s["what"] == rd["score"] else "")
            seeds = " | ".join(f3(s.get(f"kendall_tau_seed{k}")) + (f" ({s[f'candidates_seed{k}']})" if f"candidates_seed{k}" in s else "")
                               for k in rep["seeds_required"])
            lines.append(f"| {name} | {100 * s['cost_fraction_mean']:.1f} | {f3(s['kendall_tau'])} | {f3(s['spearman_rho'])} | "
                         f"{f3(s['kendall_tau_raw_reference'])} | {seeds}" + (f" | {f3(s.get('kendall_tau_third'))}" if has_third else "") + " |")
        lines.append("")
        if third:
            lines += [f"The third fresh list (`run.py --fresh-c`, fixed in notes.md before it was run): {', '.join(third)}"
                      + (f" ({len(third)} of {rep['third_list']['of']} run so far)" if not rep["third_list"]["all_run"] else "") + ".", ""]
        d = next((s for s in rep["settings"] if s["what"] == rep.get("default")), None)
        es, rs = rep.get("ema_seed_sd"), rep.get("raw_seed_sd")
        lines += [f"- Over {len(pc)} candidates: the default proxy ranks them at tau {f3(d['kendall_tau'])} against the EMA reference "
                  f"and {f3(d['kendall_tau_raw_reference'])} against the raw one." if d else "- The default proxy is not among the scores.",
                  f"- The EMA reference against the raw one: tau {f3(rep['ema_vs_raw_reference']['kendall_tau'])}, Spearman "
                  f"{f3(rep['ema_vs_raw_reference']['spearman_rho'])}.",
                  "- Seed-to-seed sd of one long FID, pooled over these candidates' seeds: EMA "
                  + (f"{es['train_sd']:.2f} ({es['df']} df, {es['candidates_repeated']} candidates)" if es else "- (no candidate has two seeds)")
                  + ", raw " + (f"{rs['train_sd']:.2f} ({rs['df']} df)" if rs else "-") + "."]
        for c in rep.get("context", []):
            lines.append(f"- Context, a whole long run as the score: {c['what']} ranks them at tau {f3(c['kendall_tau'])} against the "
                         f"EMA reference (raw reference {f3(c['kendall_tau_raw_reference'])}"
                         + "".join(f", seed {k} alone {f3(c[f'kendall_tau_seed{k}'])}" for k in rep["seeds_required"]
                                   if f"kendall_tau_seed{k}" in c) + ").")
        if rep.get("ceiling"):
            c = rep["ceiling"]
            lines.append(f"- Ceiling: a repeat of this reference (the same seeds per candidate) would rank them at tau {c['median']:.2f} "
                         f"({c['p10']:.2f}-{c['p90']:.2f}, {c['draws']} simulated repeats); a noise-free score at "
                         f"{c['predictor_median']:.2f} ({c['predictor_p10']:.2f}-{c['predictor_p90']:.2f}).")
        if rep["complete"]:
            lines.append(f"- Target (default tau >= {TARGET_TAU} at <= {100 * MAX_COST:.0f}% of a long run): "
                         + ("met." if rep["target_met"] else "not met."))
            lines.append("- Scores that pass the rule for replacing the default (tau >= 0.8 against the reference and each one-seed "
                         "reference, within the cost" + (", and over the third fresh list alone" if third else "") + "): "
                         + (", ".join(rep["adoptable"]) or "none") + ".")
        rd = rep.get("ranking_decision")
        if rd:
            c = rd["checks"]
            lines.append(f"- The ranking decision (notes.md): {rd['score']} against {rd['against']}: the third list at least as well "
                         f"{'yes' if c['third_list_at_least_as_well'] else 'no'}; every candidate better "
                         f"{'yes' if c['all_better'] else 'no'}"
                         + "".join(f", seed {k} alone {'yes' if c[f'all_better_seed{k}'] else 'no'}" for k in rep["seeds_required"])
                         + f"; no more cost {'yes' if c['no_more_cost'] else 'no'}. "
                         + ("It becomes the default way to rank candidates (the target is a separate question)." if rd["adopted"]
                            else "The default stays."))
        lines.append("")
    lines += ["| candidate | set | space | EMA long FID by training seed | EMA reference | raw reference (seeds) | default proxy FID |",
              "|---|---|---|---|---|---|---|"]
    for c in pc:
        by = ", ".join(f"seed {k}: " + ", ".join(f"{v:.2f}" for v in vs) for k, vs in c["ema_by_seed"].items())
        lines.append(f"| {c['candidate']} | {c['set']} | {c['space']} | {by} | {c['ema_reference']:.2f} | "
                     f"{c['raw_reference']:.2f} ({c['raw_seeds']}) | {c['default_proxy_fid']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def reader_arguments(doc: str, stem: str) -> argparse.ArgumentParser:
    """The arguments every reading against the EMA reference takes (this one, ``extrapolate.py``,
    ``bound.py``): run.py's work directory, where the report ``stem`` goes, the long runs' steps and
    the decay of the averages read."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory (its first runs and repeats are read)")
    ap.add_argument("--results", default="results", help=f"where {stem}.md/.json go")
    ap.add_argument("--long-steps", type=int, default=400)
    ap.add_argument("--ema-decay", type=float, default=0.99, help="the decay of the averages read (others are left out)")
    return ap


def parse_reader(ap: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, Path]:
    """``ap``'s arguments and run.py's work directory; exit 2 naming it when it holds no first runs."""
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not Records(out).names("runs/*.json"):
        ap.error(f"--out {out}: no first runs of run.py there (runs.tar.xz or runs/)")
    return args, out


def main(argv=None) -> int:
    ap = reader_arguments(__doc__, "proxy_fidelity_ema_reference")
    # the settings of run.py's runs being read (its scores are named by them)
    ap.add_argument("--checkpoints", type=run._ints, default=run._ints("10,20,40"))
    ap.add_argument("--proxy-samples", type=int, default=32)
    ap.add_argument("--default-steps", type=int, default=10)
    args, out = parse_reader(ap, argv)
    rep = analyse(out, Path(args.results), args)
    d = next((s for s in rep.get("settings", []) if s["what"] == rep.get("default")), None)
    print(f"{rep['candidates']} candidates with an EMA reference ({'complete' if rep['complete'] else 'interim'})"
          + (f"; default proxy tau {d['kendall_tau']:.3f} (raw reference {d['kendall_tau_raw_reference']:.3f})" if d else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
