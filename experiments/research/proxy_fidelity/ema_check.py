"""Is the long FID noisy because the last weights are? Long runs scored on a moving average of their weights.

``run.py``'s long runs train at a constant learning rate and are scored on their last weights. Two
runs of one candidate (another training seed, or the same seed on another machine) differ by a
standard deviation of about 2.5 FID, which bounds how well any proxy can be seen to rank. If most
of that is the last weights' wander around where training has got to, an exponential moving
average of the weights (diffusers' ``EMAModel``, as BK-SDM's training keeps one) varies much less
between runs, and a reference read on it ranks candidates with less noise for no extra training.

Each candidate of ``PILOT`` (fixed before any was run; no recombinations, which need a distilled
Base) is distilled as ``run.py``'s long runs are (batch 16, lr 5e-4, 400 steps, the same data,
training seed ``--train-seed``) while keeping an EMA (``--ema-decay``). At each ``--eval-steps``
step both the raw weights and the EMA get ``run.py``'s long evaluation: 128 samples on the same
fixed prompts and seeds, FID against the teacher's samples. Averaging does not touch the training:
the raw weights at step 400 are those of a ``run.py`` long run with the same seed (up to the float32
rounding of another machine). Records: ``<out>/ema_check/<name>.seed<k>.json`` (a rerun skips what is
there; ``records.py``: loose until packed into ``<out>/ema_check.tar.xz``); reading:
``<results>/proxy_fidelity_ema.md`` and ``.json``.

    python -m experiments.research.proxy_fidelity.ema_check --out results/proxy_fidelity --train-seed 0
    python -m experiments.research.proxy_fidelity.ema_check --out results/proxy_fidelity --analyse-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.research.proxy_fidelity import run  # the experiment this one checks: candidates, settings, reference
from experiments.research.proxy_fidelity.records import Records
from hybridsd_nas.build import build_student
from hybridsd_nas.arch import plan
from hybridsd_nas.distill import DistillConfig, averaged_weights, distill
from hybridsd_nas.proxy import ProxySettings, evaluate_student

# Fixed before any was run: four candidates without a Base, fast to train here, spread over the
# reference's range (two-seed long FIDs about 57, 53, 41 and 37).
PILOT = ("bk-sdm-tiny", "small-prune-ff-half", "prune-resnet-mild", "drop-mid-attention")
# The reading, fixed with the list: the EMA becomes the reference of the next runs if the pooled
# seed-to-seed sd of its long FID is at most this fraction of the raw weights' sd in the same runs.
ADOPT_RATIO = 0.5


def _spec(name: str):
    specs = {n: s for lst in run.LISTS.values() for n, s in lst}
    if name not in specs:
        raise SystemExit(f"ema_check: unknown candidate {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]


def check_candidate(name: str, args, pipe, arch, data, sched) -> dict:
    """One long run of ``name`` with an EMA; the long evaluation of both weights at each eval step."""
    p = plan(arch, run._resolve(_spec(name), arch))
    if p.candidate.base_blocks:
        raise SystemExit(f"ema_check: {name} is a recombination (it needs a distilled Base); use a candidate without base blocks")
    student = build_student(p, teacher=pipe.unet, device=args.device)
    long_s = ProxySettings(samples=args.long_samples, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    evals: dict[str, dict] = {}
    spent = {"eval": 0.0}
    t_start = time.perf_counter()

    def on_step(n: int, st) -> None:
        if n not in args.eval_steps:
            return
        e0 = time.perf_counter()
        rec = {"distill_seconds": round(e0 - t_start - spent["eval"], 2)}
        st.eval()
        try:
            rec["raw"] = evaluate_student(args.teacher, pipe, st, long_s, args.sampler_steps, args.guidance, device=args.device)
            with averaged_weights(st):
                rec["ema"] = evaluate_student(args.teacher, pipe, st, long_s, args.sampler_steps, args.guidance, device=args.device)
        finally:
            st.train()
        evals[str(n)] = rec
        spent["eval"] += time.perf_counter() - e0
        print(f"  {name} seed {args.train_seed} step {n}: raw FID {rec['raw']['proxy_fid']:.2f}, EMA FID {rec['ema']['proxy_fid']:.2f}, "
              f"{rec['distill_seconds']:.0f} s distill", file=sys.stderr, flush=True)

    cfg = DistillConfig(steps=max(args.eval_steps), batch_size=args.batch_size, lr=args.lr, seed=args.train_seed,
                        ema_decay=args.ema_decay)
    res = distill(student, pipe.unet, p, data, sched, cfg, progress=True, on_step=on_step)
    return {"candidate": name, "candidate_key": p.candidate.key, "train_seed": args.train_seed, "machine": run.machine_label(args.device),
            "status": res.status, "reason": res.reason, "ema": res.ema, "config": res.config, "evals": evals,
            "final_loss": res.curve[-1]["loss"] if res.curve else None, "torch": torch.__version__}


def _fid(rec: dict, kind: str, step: int) -> float | None:
    e = rec["evals"].get(str(step), {}).get(kind)
    return None if e is None else float(e["proxy_fid"])


def analyse(records: list[dict], out: Path, results: Path, long_steps: int, earlier: int) -> dict:
    """Seed-to-seed spread of the raw and averaged long FIDs (pooled over candidates), their change over
    the last ``long_steps - earlier`` steps of one run, the raw runs against ``run.py``'s records of the
    same seed, and the reading against ``ADOPT_RATIO``."""
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        if r["status"] == "ok":
            by.setdefault(r["candidate"], {})[r["train_seed"]] = r
    store = Records(out)
    first = {r["candidate"]: r for r in (store.read(n) for n in store.names("runs/*.json"))}
    recorded = run.seed_runs([first[n] for n in by if n in first], run.load_replicates(out, long_steps), long_steps)
    rows, raw_groups, ema_groups, same_seed = [], {}, {}, []
    for name, seeds in by.items():
        for k, r in sorted(seeds.items()):
            row = {"candidate": name, "train_seed": k, "machine": r["machine"],
                   "raw": _fid(r, "raw", long_steps), "ema": _fid(r, "ema", long_steps),
                   "raw_earlier": _fid(r, "raw", earlier), "ema_earlier": _fid(r, "ema", earlier),
                   "recorded_raw_same_seed": recorded.get(name, {}).get(k, []), "ema_last_decay": (r["ema"] or {}).get("last_decay")}
            rows.append(row)
            for v in row["recorded_raw_same_seed"]:
                same_seed.append(row["raw"] - v)
        if len(seeds) > 1:  # the seed-to-seed groups: this candidate's rows just made
            mine = rows[-len(seeds):]
            raw_groups[name], ema_groups[name] = [x["raw"] for x in mine], [x["ema"] for x in mine]
    raw_sd, ema_sd = run.run_to_run(raw_groups), run.run_to_run(ema_groups)
    drift = lambda kind: [abs(r[kind] - r[f"{kind}_earlier"]) for r in rows if r[kind] is not None and r[f"{kind}_earlier"] is not None]  # noqa: E731
    ratio = ema_sd["train_sd"] / raw_sd["train_sd"] if raw_sd and ema_sd and raw_sd["train_sd"] > 0 else None
    rep = {"long_steps": long_steps, "earlier_step": earlier, "rows": rows,
           "raw_seed_sd": raw_sd, "ema_seed_sd": ema_sd, "sd_ratio": ratio, "adopt_ratio": ADOPT_RATIO,
           "adopted": None if ratio is None else bool(ratio <= ADOPT_RATIO),
           "within_run_change_raw": drift("raw"), "within_run_change_ema": drift("ema"),
           "ema_minus_raw": [r["ema"] - r["raw"] for r in rows if r["ema"] is not None and r["raw"] is not None],
           "raw_minus_recorded_same_seed": same_seed,
           "machines": sorted({r["machine"] or "unnamed" for r in rows})}
    results.mkdir(parents=True, exist_ok=True)
    (results / "proxy_fidelity_ema.json").write_text(json.dumps(rep, indent=1))
    (results / "proxy_fidelity_ema.md").write_text(_markdown(rep, records))
    return rep


def _markdown(rep: dict, records: list[dict]) -> str:
    L, E = rep["long_steps"], rep["earlier_step"]
    cfg = next((r["config"] for r in records), {})
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["# Long FID on a moving average of the weights", "",
             f"Runs of `experiments/research/proxy_fidelity/ema_check.py` on {', '.join(rep['machines'])}, float32: each candidate distilled "
             f"{L} steps (batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, constant) while keeping an EMA of its trainable weights "
             f"(diffusers' EMAModel, decay {cfg.get('ema_decay')}, which its warm-up caps at (1 + n) / (10 + n): "
             f"{(rep['rows'][0]['ema_last_decay'] if rep['rows'] else float('nan')):.3f} at step {L}). At steps {E} and {L}, both weights get "
             "run.py's long evaluation: 128 samples on fixed prompts and seeds (evaluation seed 0), PNDM 25 steps, guidance 4, 32 px, "
             "FID against the teacher's samples on the same prompts and seeds.", "",
             f"| candidate | training seed | raw @{E} | raw @{L} | EMA @{E} | EMA @{L} | run.py's raw @{L}, same seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['candidate']} | {r['train_seed']} | {f(r['raw_earlier'])} | {f(r['raw'])} | {f(r['ema_earlier'])} | "
                     f"{f(r['ema'])} | {', '.join(f'{v:.2f}' for v in r['recorded_raw_same_seed']) or '-'} |")
    rs, es = rep["raw_seed_sd"], rep["ema_seed_sd"]
    mean = lambda v: f"{np.mean(v):.2f} over {len(v)}" if v else "-"  # noqa: E731
    lines += ["",
              f"- Seed-to-seed sd of the long FID at step {L}, pooled over the candidates run with both seeds: raw weights "
              + (f"{rs['train_sd']:.2f} ({rs['df']} df)" if rs else "-") + ", EMA " + (f"{es['train_sd']:.2f} ({es['df']} df)" if es else "-")
              + (f"; ratio {rep['sd_ratio']:.2f}" if rep["sd_ratio"] is not None else ""),
              f"- Change of one run's long FID from step {E} to step {L}, mean |difference|: raw {mean(rep['within_run_change_raw'])} runs, "
              f"EMA {mean(rep['within_run_change_ema'])} runs",
              f"- EMA minus raw at step {L}: mean {mean(rep['ema_minus_raw'])} runs",
              f"- Raw weights here minus run.py's record of the same candidate and training seed (other runs of the same draws): "
              f"mean {mean(rep['raw_minus_recorded_same_seed'])} pairs"
              + (f", sd {np.std(rep['raw_minus_recorded_same_seed'], ddof=1):.2f}" if len(rep['raw_minus_recorded_same_seed']) > 1 else ""),
              "",
              f"Reading fixed before the runs: the EMA becomes the reference of the next long runs if its sd is at most "
              f"{rep['adopt_ratio']} x the raw weights' sd in the same runs. "
              + ("Not read yet: no candidate has both seeds." if rep["adopted"] is None
                 else "Met: the EMA is the next reference." if rep["adopted"] else "Not met: the reference stays on the raw weights."),
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--eval-steps", type=run._ints, default=run._ints("380,400"),
                    help="steps at which both weights get the long evaluation; the last ends the run (default: 380,400)")
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation and the data, as run.py's")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--long-samples", type=int, default=128)
    ap.add_argument("--sampler-steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--heldout-latents", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated candidates (default: PILOT)")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory (its records are read)")
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)
    if len(args.eval_steps) != 2:
        ap.error(f"--eval-steps takes two steps (an earlier one and the end of the run), got {args.eval_steps}")
    names = args.only.split(",") if args.only else list(PILOT)
    for n in names:
        _spec(n)
    out = Path(args.out)
    store = Records(out)
    args.proxy_samples = args.long_samples  # run.warm_caches warms both evaluations' references; here both are the long one
    if not args.analyse_only:
        pipe, arch, data, _, sched = run.setup(args)
        print(f"teacher samples and reference features cached ({run.warm_caches(args, pipe):.0f} s)", file=sys.stderr, flush=True)
        for name in names:
            f = f"ema_check/{name}.seed{args.train_seed}.json"
            if store.exists(f):
                print(f"{name} seed {args.train_seed}: done before, kept", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            rec = check_candidate(name, args, pipe, arch, data, sched)
            rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
            store.write(f, rec)
    records = [store.read(n) for n in store.names("ema_check/*.json")]
    rep = analyse(records, out, Path(args.results), max(args.eval_steps), min(args.eval_steps))
    print(f"raw sd {rep['raw_seed_sd']}, EMA sd {rep['ema_seed_sd']}, adopted {rep['adopted']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
