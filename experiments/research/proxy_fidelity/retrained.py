"""Proxy rank fidelity on the retrained teacher (v4), read as fixed in ``results/proxy_fidelity/teacher_v4/notes.md``.

The twelve candidates of ``run.py --retrained`` (RETRAINED) are distilled 400 steps with a moving
average of their weights, with training seeds 0 (the first run, which records the scores on the
way) and 1 (``--replicate ema-seed1``). Reference: each candidate's EMA long FID, the mean over the
two seeds. Each score's Kendall tau against it, with a bootstrap 90% interval over candidates, beside
the same score's tau on the same candidates on the earlier teacher (v3: its first runs in
``results/proxy_fidelity`` and its EMA reference in ``results/proxy_fidelity_ema_reference.json``).

    python -m experiments.research.proxy_fidelity.retrained

Reads the records only (no training); a partial set gives an interim report that says what is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from experiments.research.proxy_fidelity import run
from experiments.research.proxy_fidelity.records import Records

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "results" / "proxy_fidelity" / "teacher_v4"
V3_OUT = ROOT / "results" / "proxy_fidelity"
V3_REFERENCE = ROOT / "results" / "proxy_fidelity_ema_reference.json"
LONG = "400"
SEEDS = (0, 1)
TARGET_TAU, MAX_COST = 0.8, 0.10
BOOTSTRAP, BOOT_SEED = 2000, 0
ADOPTED = "held-out output MSE after 40 steps (the adopted ranking score)"
SCORES = {  # name -> (value from a first run's record, the steps of distillation it needs)
    ADOPTED: (lambda r: r["evals"]["40"]["heldout"]["output_mse"], 40),
    "held-out output MSE after 20 steps": (lambda r: r["evals"]["20"]["heldout"]["output_mse"], 20),
    "held-out output MSE after 10 steps": (lambda r: r["evals"]["10"]["heldout"]["output_mse"], 10),
    "10 steps, 32 samples (FID; the earlier default)": (lambda r: r["evals"]["10"]["proxy"]["proxy_fid"], 10),
    "zero-cost output MSE (no training)": (lambda r: r["zero_cost"]["output_mse"], 0),
    # the cost as a score: fewer MACs or parameters, a worse student (ranked by their negatives)
    "MACs alone (no training)": (lambda r: -r["macs"], 0),
    "parameters alone (no training)": (lambda r: -r["params"], 0),
}


def tau(x, y) -> float:
    return float(kendalltau(x, y).statistic)


def bootstrap(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The 5th and 95th percentiles of tau over candidates resampled with replacement (ties-only draws skipped)."""
    rng = np.random.default_rng(BOOT_SEED)
    taus = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(x), len(x))
        if len(set(i)) >= 3:
            t = tau(x[i], y[i])
            if np.isfinite(t):
                taus.append(t)
    return float(np.percentile(taus, 5)), float(np.percentile(taus, 95))


def cost_fraction(r: dict, steps: int) -> float:
    """A score's seconds (distillation to ``steps`` plus its held-out or proxy evaluation) over the long run's
    (distillation to the end plus the long evaluation of the average)."""
    if steps == 0:
        return 0.0
    e = r["evals"][str(steps)]
    own = e["distill_seconds"] + (e.get("heldout") or {}).get("seconds", 0.0)
    long = r["evals"][LONG]["distill_seconds"] + r["evals"][LONG]["long_ema"]["eval_seconds"]
    return own / long


def read_v4(out: Path) -> tuple[list[dict], dict[str, dict[int, float]], list[str]]:
    store = Records(out)
    firsts, by_seed, missing = [], {}, []
    for name, _ in run.RETRAINED:
        first = store.read(f"runs/{name}.json") if store.exists(f"runs/{name}.json") else None
        rep = store.read(f"replicates/{name}.ema-seed1.json") if store.exists(f"replicates/{name}.ema-seed1.json") else None
        seeds = {}
        for rec in (first, rep):
            if rec and rec["status"] == "ok" and "long_ema" in rec["evals"].get(LONG, {}):
                seeds[rec["train_seed"]] = rec["evals"][LONG]["long_ema"]["proxy_fid"]
        if first and first["status"] == "ok":
            firsts.append(first)
        if set(seeds) != set(SEEDS) or not (first and first["status"] == "ok"):
            missing.append(name + (f" (seeds {sorted(seeds)})" if seeds else ""))
        by_seed[name] = seeds
    return firsts, by_seed, missing


def read_v3(names: list[str]) -> tuple[list[dict], dict[str, float]]:
    ref = {c["candidate"]: c["ema_reference"] for c in json.loads(V3_REFERENCE.read_text())["per_candidate"]}
    store = Records(V3_OUT)
    rows = [store.read(f"runs/{n}.json") for n in names if n in ref and store.exists(f"runs/{n}.json")]
    return [r for r in rows if r["status"] == "ok"], ref


def table(firsts: list[dict], ref: dict[str, float], with_cost: bool) -> dict[str, dict]:
    names = [r["candidate"] for r in firsts if r["candidate"] in ref]
    rows = [r for r in firsts if r["candidate"] in ref]
    y = np.array([ref[n] for n in names])
    out = {}
    for what, (get, steps) in SCORES.items():
        try:
            x = np.array([float(get(r)) for r in rows])
        except KeyError:  # a score the records of this teacher do not hold
            continue
        lo, hi = bootstrap(x, y) if len(y) >= 4 else (float("nan"), float("nan"))
        s = {"kendall_tau": tau(x, y), "interval_90": [lo, hi], "candidates": len(y)}
        if with_cost:
            s["cost_fraction_mean"] = float(np.mean([cost_fraction(r, steps) for r in rows]))
        out[what] = s
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="the retrained teacher's records")
    ap.add_argument("--results", default=str(ROOT / "results"), help="where proxy_fidelity_teacher_v4.md/.json go")
    args = ap.parse_args(argv)
    firsts, by_seed, missing = read_v4(Path(args.out))
    complete = {n: s for n, s in by_seed.items() if set(s) == set(SEEDS)}
    ref = {n: float(np.mean([s[k] for k in SEEDS])) for n, s in complete.items()}
    v4 = table(firsts, ref, with_cost=True) if len(ref) >= 3 else {}
    v3_rows, v3_ref = read_v3([r["candidate"] for r in firsts if r["candidate"] in ref])
    v3 = table(v3_rows, v3_ref, with_cost=False) if len(v3_rows) >= 3 else {}
    seed_sd = [abs(s[0] - s[1]) / np.sqrt(2) for s in complete.values()]
    adopted = v4.get(ADOPTED, {})
    rep = {"list": [n for n, _ in run.RETRAINED], "complete": not missing, "missing": missing,
           "machines": sorted({run.machine_of(r) for r in firsts}),
           "per_candidate": [{"candidate": n, "ema_long_fid_by_seed": by_seed[n], "ema_reference": ref.get(n)} for n, _ in run.RETRAINED],
           "seed_sd_pooled": float(np.sqrt(np.mean(np.square(seed_sd)))) if seed_sd else None,
           "scores_v4": v4, "scores_v3_same_candidates": v3,
           "target": {"kendall_tau": TARGET_TAU, "max_cost_fraction": MAX_COST},
           "target_met": bool(adopted and adopted["kendall_tau"] >= TARGET_TAU and adopted["cost_fraction_mean"] <= MAX_COST
                              and not missing)}
    res = Path(args.results)
    (res / "proxy_fidelity_teacher_v4.json").write_text(json.dumps(rep, indent=1) + "\n")
    (res / "proxy_fidelity_teacher_v4.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


def markdown(rep: dict) -> str:
    lines = ["# Proxy rank fidelity on the retrained teacher (v4)", "",
             "Made by `python -m experiments.research.proxy_fidelity.retrained` from the records in "
             "`results/proxy_fidelity/teacher_v4/`; the list and the reading were fixed in its `notes.md` before the runs. "
             "Each candidate distilled 400 steps (batch 16, lr 5e-4, constant) with a moving average of its trainable weights "
             "(decay 0.99); reference: the average's long FID (128 samples, fixed prompts, evaluation seed 0, PNDM 25 steps, "
             "guidance 4, 32 px, against the teacher's samples on the same prompts and seeds), mean over training seeds 0 and 1. "
             f"Float32, on {', '.join(rep['machines']) or '-'}. Tau intervals: bootstrap over candidates, 90%, {BOOTSTRAP} resamples.",
             ""]
    if rep["missing"]:
        lines += [f"**Interim**: {len(rep['missing'])} of {len(rep['list'])} candidates lack a run: {', '.join(rep['missing'])}.", ""]
    lines += ["| score | cost, % of a long run | Kendall tau, v4 (90% interval) | tau, v3, same candidates |", "|---|---:|---|---|"]
    for what, s in rep["scores_v4"].items():
        old = rep["scores_v3_same_candidates"].get(what)
        lo, hi = s["interval_90"]
        lines.append(f"| {what} | {100 * s['cost_fraction_mean']:.1f} | {s['kendall_tau']:.3f} ({lo:.2f} to {hi:.2f}), n={s['candidates']} | "
                     + (f"{old['kendall_tau']:.3f}, n={old['candidates']}" if old else "-") + " |")
    lines += ["", "| candidate | EMA long FID, seed 0 | seed 1 | reference |", "|---|---:|---:|---:|"]
    for c in rep["per_candidate"]:
        s = c["ema_long_fid_by_seed"]
        cells = [f"{s[k]:.2f}" if k in s else "-" for k in SEEDS]
        ref = "-" if c["ema_reference"] is None else f"{c['ema_reference']:.2f}"
        lines.append(f"| {c['candidate']} | {' | '.join(cells)} | {ref} |")
    if rep["seed_sd_pooled"] is not None:
        lines += ["", f"- Seed-to-seed sd of one EMA long FID, pooled: {rep['seed_sd_pooled']:.2f}."]
    a = rep["scores_v4"].get(ADOPTED)
    if a:
        lines.append(f"- Target (adopted score tau >= {TARGET_TAU} at <= {100 * MAX_COST:.0f}% of a long run): "
                     f"{'met' if rep['target_met'] else 'not met'} (tau {a['kendall_tau']:.3f} at {100 * a['cost_fraction_mean']:.1f}%).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
