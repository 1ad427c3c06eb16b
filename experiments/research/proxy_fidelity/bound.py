"""How far the scores already measured go: post-hoc combinations, against the EMA reference.

Over all candidates: the 40-step held-out output MSE combined with the cost figures and the zero-cost
scores.

The complete reading (``ema_reference.py``, 30 candidates) left no score at Kendall tau >= 0.8 within 10%
of a long run; the best, the held-out output MSE after 40 steps, reads 0.752. Before fixing a fourth
fresh list for a new score, this asks whether any simple use of what the first runs already recorded
gets there: per candidate the held-out MSE at steps 10, 20 and 40, the MACs, the trainable share of
the parameters, the zero-cost output MSE. Every combination here was formed after the 30 were seen
and its weight is the best of a grid searched on them, so the taus are optimistic: an upper bound of
what these figures give at this cost, never a score to adopt. The leave-one-out least-squares fits
are the exception: each candidate is predicted by a fit that did not see it.

Costs: the first run's distillation seconds to step 40 plus the held-out evaluations each score uses,
as a fraction of its long run (the runs that shared the cores left out, as in ``ema_reference.py``);
MACs and the trainable share are free, the zero-cost score is part of every proxy run.

    python -m experiments.research.proxy_fidelity.bound --out results/proxy_fidelity
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from experiments.research.proxy_fidelity import (
    ema_reference,  # the reference, its taus and its rule's numbers
    run,  # the first runs, rank statistics
)

STEPS = (10, 20, 40)
STEM = "proxy_fidelity_bound"  # the report's file names
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 3.0)  # the grid of each weighted combination


_mse = ema_reference.heldout_at


def loo_fit(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Leave-one-out least squares: each row of ``X`` predicted by the fit of ``y`` on the other rows."""
    pred = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        coef = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        pred[i] = X[i] @ coef
    return pred


def combinations(have: list[dict], ref: np.ndarray) -> list[dict]:
    """Each combination: its label, its values per candidate (lower ranks better), the held-out steps it
    reads, and whether its weight was searched on these candidates."""
    h = {n: np.log([_mse(r, n) for r in have]) for n in STEPS}
    macs = np.log([float(r["macs"]) for r in have])
    share = np.log([r["trainable_params"] / r["params"] for r in have])
    zc = np.log([float(r["zero_cost"]["output_mse"]) for r in have])
    slope = (h[40] - h[10]) / np.log(4.0)
    out = [{"what": "held-out output MSE after 40 steps (the adopted ranking score)", "x": h[40], "steps": (40,), "searched": False},
           {"what": "rank of it + rank of -MACs", "x": rankdata(h[40]) + rankdata(-macs), "steps": (40,), "searched": False},
           {"what": "rank of it + rank of the zero-cost output MSE", "x": rankdata(h[40]) + rankdata(zc), "steps": (40,), "searched": False}]
    for a in WEIGHTS:
        out += [{"what": f"log MSE@40 - {a:g} log MACs", "x": h[40] - a * macs, "steps": (40,), "searched": True},
                {"what": f"log MSE@40 + {a:g} log trainable share", "x": h[40] + a * share, "steps": (40,), "searched": True},
                {"what": f"log MSE@40 + {a:g} x its slope over steps 10-40", "x": h[40] + a * slope, "steps": (10, 40), "searched": True}]
    ones = np.ones(len(have))
    fits = (("leave-one-out least squares of the reference on log MSE@40, log MACs", np.c_[ones, h[40], macs], (40,)),
            ("leave-one-out least squares on log MSE@10, @20, @40, log MACs, log trainable share, log zero-cost MSE",
             np.c_[ones, h[10], h[20], h[40], macs, share, zc], STEPS))
    # a fit only where each leave-one-out fit is determined: more candidates than regressors
    out += [{"what": what, "x": loo_fit(X, ref), "steps": steps, "searched": False} for what, X, steps in fits if len(have) > X.shape[1]]
    return out


def analyse(out: Path, results: Path, args) -> dict:
    L = str(args.long_steps)
    replicates, ema, have, names, missing, complete = ema_reference.reading(
        out, args.long_steps, args.ema_decay, lambda r: ema_reference.has_heldout(r, STEPS))
    rep: dict = {"candidates": len(names), "missing": missing, "complete": complete,
                 "machines": sorted({run.machine_of(r) for r in have}), "scores": []}
    if len(names) < 3:
        ema_reference.write_report(rep, results, STEM, _markdown)
        return rep
    _, ref, _, raw_ref = ema_reference.references(have, ema, replicates, args.long_steps)
    timed = ema_reference.timed_mask(names)
    rep["cost_left_out"] = [n for n, t in zip(names, timed) if not t]
    long_cost = run._long_cost(have, L)
    third = np.array([run.set_of(r) == ema_reference.THIRD_LIST for r in have])
    for c in combinations(have, ref):
        cost = np.array([ema_reference.heldout_cost(r, c["steps"]) for r in have])
        s = {"what": c["what"], "searched": c["searched"], **ema_reference._taus(np.asarray(c["x"], float), ref, raw_ref, ema, names),
             **run._cost_fields(cost[timed], long_cost[timed])}
        if third.sum() >= 3:
            s["kendall_tau_third"] = run.kendall_spearman(np.asarray(c["x"], float)[third], ref[third])["kendall_tau"]
        rep["scores"].append(s)
    within = [s for s in rep["scores"] if s["cost_fraction_mean"] <= ema_reference.MAX_COST]
    best = max(within, key=lambda s: s["kendall_tau"]) if within else None
    rep["best"] = best["what"] if best else None
    rep["best_tau"] = best["kendall_tau"] if best else None
    rep["reaches_target"] = bool(best and best["kendall_tau"] >= ema_reference.TARGET_TAU)
    rep["context"] = [{"what": f"held-out output MSE at step {L} of one long run (a whole long run)",
                       **ema_reference._taus(np.array([_mse(r, int(L)) for r in have]), ref, raw_ref, ema, names)}
                      ] if all(ema_reference.has_heldout(r, (int(L),)) for r in have) else []
    ema_reference.write_report(rep, results, STEM, _markdown)
    return rep


def _markdown(rep: dict) -> str:
    f3 = ema_reference.f3
    lines = ["# How far the measured scores go: post-hoc combinations against the EMA reference", "",
             "Per candidate, the first run's held-out output MSE (64 fixed held-out noisy latents, evaluation seed 0; batch 16, "
             "lr 5e-4, training seed 0, float32) at steps 10, 20, 40, its MACs (32 px, batch 1), the trainable share of its "
             "parameters and its zero-cost output MSE, combined as below. Reference: " + ema_reference.REFERENCE_WORDS
             + f". First runs on {'; '.join(rep['machines']) or '-'}" + ema_reference.cost_words(rep)
             + ". Made by `experiments/research/proxy_fidelity/bound.py`. **Post hoc**: every combination was formed after these "
             "candidates were seen, and a weighted one's weight is the best of the grid on them (marked searched): the taus "
             "are optimistic, an upper bound of what these figures give, not scores to adopt.", ""]
    lines += ema_reference.interim_words(rep)
    if rep.get("scores"):
        has_third = any("kendall_tau_third" in s for s in rep["scores"])
        lines += ["| combination | searched | cost, % of a long run | Kendall tau, EMA reference | tau, seed 0 alone | "
                  "tau, seed 1 alone" + (" | tau, third fresh list alone" if has_third else "") + " |",
                  "|---|---|---|---|---|---" + ("|---" if has_third else "") + "|"]
        for s in rep["scores"]:
            lines.append(f"| {s['what']} | {'yes' if s['searched'] else 'no'} | {100 * s['cost_fraction_mean']:.1f} | "
                         f"{f3(s['kendall_tau'])} | {f3(s.get('kendall_tau_seed0'))} | {f3(s.get('kendall_tau_seed1'))}"
                         + (f" | {f3(s.get('kendall_tau_third'))}" if has_third else "") + " |")
        lines.append("")
        if rep["best"]:
            lines.append(f"- The best within {100 * ema_reference.MAX_COST:.0f}% of a long run: {rep['best']}, tau {rep['best_tau']:.3f}: "
                         + ("at or above" if rep["reaches_target"] else "below") + f" the target {ema_reference.TARGET_TAU}"
                         + (" (found post hoc: a fresh list fixed before it is run would have to confirm it)." if rep["reaches_target"] else "."))
        for c in rep["context"]:
            lines.append(f"- Context: {c['what']} ranks them at tau {f3(c['kendall_tau'])}.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, out = ema_reference.parse_reader(ema_reference.reader_arguments(__doc__, STEM), argv)
    rep = analyse(out, Path(args.results), args)
    print(f"{rep['candidates']} candidates ({'complete' if rep['complete'] else 'interim'})"
          + (f": best within the cost {rep['best_tau']:.3f} ({rep['best']})" if rep.get("best") else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
