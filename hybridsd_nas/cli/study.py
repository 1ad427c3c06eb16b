"""The study commands: ``search``, ``pareto``, ``export`` (of a study's trial), ``pick`` (one model for a
device budget) and ``report``.

Argument wiring and printing only; the work is done by :mod:`hybridsd_nas.study`."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from hybridsd_nas.cli.common import ExitCode, RunFailed, add_device, add_json, add_overwrite, add_parser, print_json
from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.cost import check_device
from hybridsd_nas.study import (
    BUDGET_FORMS,
    SAMPLERS,
    StopReason,
    build_report,
    claim_results_dir,
    describe_audit,
    export_pick,
    export_trial,
    format_table,
    front_columns,
    front_json,
    load_study,
    load_study_config,
    parse_budget,
    pick,
    run_study,
    summarize,
    write_front_csv,
    write_outputs,
)

_DEFAULT_STORAGE = "default: sqlite:///RESULTS/NAME/study.db, RESULTS being $HYBRIDSD_NAS_RESULTS or runs/"


def cmd_search(args: argparse.Namespace) -> int:
    cfg = load_study_config(args.config)
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {args.n_trials}")
    if not args.no_outputs:  # another study's outputs in the folder: refused now, not after the trials
        claim_results_dir(cfg.name, cfg.storage_url(args.storage), cfg.results_dir, write=False)
    res = run_study(cfg, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet,
                    device=args.device)
    outputs = {}
    if res["stopped"] in (StopReason.TRIALS, StopReason.TIMEOUT, StopReason.EXHAUSTED) and not args.no_outputs:
        written = write_outputs(cfg.name, cfg.storage_url(args.storage), cfg.results_dir, device=args.device)
        outputs = {k: str(v) for k, v in written.items()}
    if args.json:
        print(json.dumps({**res, "outputs": outputs}))
    else:
        print(f"study {res['study']}: {res['evaluated']}/{res['target'] or '-'} evaluated trials ({len(res['trials_run'])} run by this worker), "
              f"front of {res['front_size']}, stopped: {res['stopped']}; storage {res['storage']}")
        for what, path in outputs.items():
            print(f"{what}: {path}")
    rb = res.get("rejected_by")
    if res["stopped"] == StopReason.EXHAUSTED and rb:
        given = f" ({rb['given']})" if rb["given"] != rb["constraint"] else ""
        print(f"the last {rb['trials']} candidates were all rejected or already seen, every rejection ({rb['rejected']}) by one "
              f"constraint: {rb['constraint']}{given}; the closest came to {rb['metric']} = {rb['closest']:.6g}: loosen that "
              f"constraint, or check how {rb['metric']} is measured ({res['evaluated']} evaluated)", file=sys.stderr)
    elif res["stopped"] == StopReason.EXHAUSTED:
        print(f"the sampler proposed only rejected or already-seen candidates for a long stretch: the space under these "
              f"constraints looks exhausted ({res['evaluated']} evaluated)", file=sys.stderr)
    if res["stopped"] == StopReason.FAILURES:
        raise RunFailed(f"study {res['study']}: {len(res['failures'])} trials failed in a row, stopped "
                            f"(last: {res['failures'][-1]}); fix the cause, or raise max_failures, and rerun to resume")
    if res["stopped"] == StopReason.INTERRUPTED:
        print("interrupted: rerun the same command to resume the study", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    study = load_study(args.study, args.storage)
    s = summarize(study)
    front = s["front"]
    if args.json:
        print(json.dumps(front_json(s), indent=1, default=str))
        return 0
    cols = front_columns(front)
    if args.csv:
        buf = io.StringIO()
        write_front_csv(front, cols, buf)
        print(buf.getvalue(), end="")
        return 0
    objs = ", ".join(f"{o['direction']} {o['metric']}" for o in s["objectives"])
    print(f"study {s['study']}: {objs}; {s['counts']['trials']} trials "
          f"({', '.join(f'{k} {v}' for k, v in s['counts'].items() if k != 'trials')})")
    print(f"Pareto front: {len(front)} trials, hypervolume {s['hypervolume']:.4f} ({s['hypervolume_note']})")
    print(format_table(front, cols))
    if s.get("audit"):
        print(describe_audit(s["audit"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    study = load_study(args.study, args.storage)
    row, out, cost = export_trial(study, args.trial, args.out, device=args.device, overwrite=args.overwrite)
    if args.json:
        print_json({"trial": row["trial"], "candidate_key": row["candidate_key"], "out": str(out), **cost})
        return 0
    print(f"trial {row['trial']} ({row['candidate_key']}): {cost['params'] / 1e6:.3f} M params -> {out} [{cost['format']}]")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    budgets = [parse_budget(b) for b in args.budget or []]  # malformed or unknown: one line, before anything loads
    if args.verify_on is not None:
        check_device(args.verify_on)
    if Path(args.out).exists() and not args.overwrite:
        raise HybridSDError(f"{args.out} already exists; choose another --out or pass --overwrite")
    studies = [load_study(n, args.storage) for n in args.study]

    def said(e) -> None:
        if not args.json:
            state = f"dropped: {e.dropped}" if e.dropped else "within every budget"
            print(f"measured on {args.verify_on}: {e.name}: "
                  + ", ".join(f"{m} {v:.4g}" for m, v in e.measured.items()) + f"; {state}", file=sys.stderr)

    result = pick(studies, budgets, verify_on=args.verify_on, table=args.table, on_verify=said)
    if result.chosen is None:
        raise RunFailed(result.nearest_miss())
    out, data = export_pick(result, args.out, device=args.device, overwrite=args.overwrite)
    if args.json:
        print_json(data)
        return 0
    e, q = result.chosen, result.quality["metric"]
    within = ", ".join(f"{b.metric} {e.value(b.metric):.4g} ({b})" for b in result.budgets) or "no budget"
    print(f"picked {e.name}: {q} {e.figures[q]:.4g}, the best of {len(result.feasible)} of {len(result.entries)} candidates "
          f"within every budget; {within} -> {out} (pick.json, README.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    studies = [load_study(n, args.storage) for n in args.study]
    out = build_report(studies, args.out)
    if args.json:
        print_json({"studies": args.study, "out": str(out)})
        return 0
    print(f"report of {', '.join(args.study)} -> {out}")
    return 0


def register(sub) -> None:
    """Add ``search``, ``pareto``, ``export``, ``pick`` and ``report`` to the CLI's sub-parsers."""
    p = add_parser(sub, "search", help="run (or resume, or join as another worker) a study declared in YAML "
                                      f"(samplers: {', '.join(SAMPLERS.names())})")
    p.add_argument("config", help="study YAML, e.g. experiments/quickstart.yaml")
    p.add_argument("--storage", help=f"Optuna storage URL ({_DEFAULT_STORAGE}, or the YAML's storage/results_dir); "
                                     "the same postgresql://USER@HOST:PORT/DB on several workers shares the study")
    p.add_argument("--n-trials", type=int, help="evaluated trials the study should have: new candidates scored, "
                   "not counting cheap rejections and repeats (default: the YAML's trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (default: the YAML's)")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the worker's summary as JSON")
    p.add_argument("--no-outputs", action="store_true",
                   help="when the study is done, do not write RESULTS/NAME/ (Pareto table, best U-Net, report.html)")
    p.set_defaults(func=cmd_search)

    p = add_parser(sub, "pareto", help="the Pareto front of a study, with every figure and the hypervolume")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", help=f"storage URL ({_DEFAULT_STORAGE})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_pareto)

    p = add_parser(sub, "export", help="export the pruned U-Net of a study's trial, with a model card "
                                      "(without --study: see `prune`)")
    p.add_argument("--study", required=True)
    p.add_argument("--trial", type=int, required=True, help="trial number (see `pareto`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--storage", help=f"storage URL ({_DEFAULT_STORAGE})")
    add_device(p)
    add_overwrite(p)
    add_json(p)
    p.set_defaults(func=cmd_export)

    p = add_parser(sub, "pick", help="the best model of finished studies within device budgets, exported with its model card "
                                    "and pick.json")
    p.add_argument("--study", action="append", required=True, help="a study name; repeat to pool the candidates of several")
    p.add_argument("--storage", help=f"storage URL holding the studies ({_DEFAULT_STORAGE}, of each)")
    p.add_argument("--budget", action="append", metavar="EXPR",
                   help=f"a budget every candidate must meet, one of {', '.join(BUDGET_FORMS)} for a study metric "
                        "(pipeline_latency_ms<=800, peak_memory_mb<=4000, params<5e8); repeatable")
    p.add_argument("--verify-on", metavar="DEVICE", help="measure the feasible front again on this device (cpu, cuda, cuda:N) "
                   "and drop those that break a budget there, before choosing")
    p.add_argument("--table", metavar="FILE", help="a latency lookup table for latency_ms or pipeline_latency_ms where the "
                   "trials did not record them (default: the study's own table)")
    p.add_argument("--out", required=True, help="output directory: the U-Net, its model card (README.md) and pick.json")
    add_device(p)
    add_overwrite(p)
    add_json(p)
    p.set_defaults(func=cmd_pick)

    p = add_parser(sub, "report", help="one self-contained HTML page comparing the Pareto fronts of studies")
    p.add_argument("--study", action="append", required=True, help="a study name; repeat to compare")
    p.add_argument("--storage", help=f"storage URL holding the studies ({_DEFAULT_STORAGE}, of each)")
    p.add_argument("--out", required=True, help="output HTML file")
    add_json(p)
    p.set_defaults(func=cmd_report)
