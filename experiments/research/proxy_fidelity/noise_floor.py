"""How much of the long FID is sampling noise? Re-evaluates long-distilled students on other seeds.

The long evaluation of ``run.py`` samples ``--long-samples`` images on fixed prompts and seeds
``seed + i``. A second set of seeds gives another FID for the same weights; the spread over seed
sets is the noise of one long FID, and the spread of the *difference* between two students on the
same seeds is the noise of a comparison. ``run.py`` reads this file (``--noise``) and adds the
run-to-run noise of the distillation itself, which it measures from repeats of whole long runs
(``run.py --replicate TAG``, in ``<out>/replicates/``). Pairs of candidates whose long FIDs differ by
less than about two standard deviations of that combined noise are not ranked by the long run at
all, so no proxy can be expected to order them; ``run.py`` reports the rank agreement on the pairs
the long run does separate beside the plain Kendall tau.

The students are the ones ``run.py`` exports (``<out>/<name>-long``). Seed 0 is re-evaluated too: it
must give the long FID ``run.py`` recorded for the same weights, which checks the export.

    python -m experiments.research.proxy_fidelity.noise_floor --out results/proxy_fidelity --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.research.proxy_fidelity.records import Records
from hybridsd_nas import load_unet
from hybridsd_nas.sources import load_pipeline, pipeline_fingerprint, resolve_teacher
from hybridsd_nas.proxy import ProxySettings, evaluate_student


def _long_fid(run: dict) -> float:
    """The long FID of one of run.py's per-candidate records (its last, longest evaluation)."""
    return run["evals"][max(run["evals"], key=int)]["long"]["proxy_fid"]


def _run_record(out: Path, name: str) -> dict | None:
    store = Records(out)
    return store.read(f"runs/{name}.json") if store.exists(f"runs/{name}.json") else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory")
    ap.add_argument("--students", default="bk-sdm-base,bk-sdm-tiny", help="exported long students (<out>/<name>-long)")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--samples", type=int, default=128, help="images per evaluation (run.py's --long-samples)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sampler-steps", type=int, default=None, help="as run.py was given (default: the teacher's sampling.json)")
    ap.add_argument("--guidance", type=float, default=None, help="as run.py was given (default: the teacher's sampling.json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = [n for n in args.students.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for n in names:
        if not (out / f"{n}-long" / "hybridsd_nas.json").is_file():
            raise SystemExit(f"error: {out / (n + '-long')} is missing; run `python -m experiments.research.proxy_fidelity.run` first "
                             f"(it exports {', '.join(names)})")
    pipe = load_pipeline(args.teacher, device="cpu")
    steps, guidance = resolve_teacher(args.teacher).sampling_settings(args.sampler_steps, args.guidance)
    students = {n: load_unet(out / f"{n}-long").eval() for n in names}
    recorded = {n: _long_fid(r) for n in names if (r := _run_record(out, n))}
    fid: dict[str, dict[int, float]] = {n: {} for n in names}
    t0 = time.perf_counter()
    for s in seeds:
        st = ProxySettings(samples=args.samples, seed=s, batch_size=args.batch_size)
        for n in names:
            with torch.no_grad():
                e = evaluate_student(args.teacher, pipe, students[n], st, steps, guidance)
            fid[n][s] = e["proxy_fid"]
            print(f"seed {s} {n}: FID {e['proxy_fid']:.2f} vs the teacher's samples ({e['eval_seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    per = {n: {"fid_by_seed": {str(s): round(v, 3) for s, v in fid[n].items()},
               "mean": float(np.mean(list(fid[n].values()))), "sd": float(np.std(list(fid[n].values()), ddof=1)),
               "recorded_seed0": recorded.get(n)} for n in names}
    diffs = {}
    for a, b in itertools.combinations(names, 2):
        dv = [fid[a][s] - fid[b][s] for s in seeds]
        diffs[f"{a} - {b}"] = {"by_seed": [round(x, 3) for x in dv], "mean": float(np.mean(dv)), "sd": float(np.std(dv, ddof=1))}
    report = {
        "what": "long FID (vs the teacher's samples on the same prompts and seeds) of long-distilled students, re-evaluated "
                "on several seed sets",
        "teacher": args.teacher, "teacher_fingerprint": pipeline_fingerprint(args.teacher), "samples": args.samples,
        "sampler": type(pipe.scheduler).__name__, "sampler_steps": steps, "guidance": guidance, "seeds": seeds,
        "machine": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), float32, torch {torch.__version__}",
        "students": per, "differences": diffs,
        # the noise of one long FID: the pooled standard deviation over seed sets
        "fid_sd": float(np.sqrt(np.mean([p["sd"] ** 2 for p in per.values()]))),
        "diff_sd": float(np.sqrt(np.mean([v["sd"] ** 2 for v in diffs.values()]))) if diffs else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "noise_floor.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("fid_sd", "diff_sd", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
