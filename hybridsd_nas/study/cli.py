"""The study commands: ``search``, ``pareto``, ``export`` (of a study's trial) and ``report``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HybridSDError


def _storage_for(name: str, storage: str | None) -> str:
    if storage:
        return storage
    db = Path("results") / name / "study.db"
    if not db.is_file():
        raise ConfigError(f"no study {name!r} at {db} (the default storage of a study named {name!r}); "
                          "give --storage URL (sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB)")
    return f"sqlite:///{db.as_posix()}"


def load_study(name: str, storage: str | None):
    """A stored study by name, with errors that list the studies the storage holds."""
    import optuna

    from .runner import _redact

    url = _storage_for(name, storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as e:
        raise ConfigError(f"cannot open the study storage {_redact(url)!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if name not in names:
        raise ConfigError(f"unknown study {name!r} in {_redact(url)}; known: {', '.join(sorted(names)) or '(none)'}")
    return optuna.load_study(study_name=name, storage=url)


def cmd_search(args: argparse.Namespace) -> int:
    from .config import load_study_config
    from .runner import run_study

    cfg = load_study_config(args.config)
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {args.n_trials}")
    res = run_study(cfg, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet,
                    device=args.device)
    outputs = {}
    if res["stopped"] in ("trials", "timeout", "exhausted") and not args.no_outputs:
        outputs = {k: str(v) for k, v in write_outputs(cfg.name, args.storage, cfg.results_dir, device=args.device).items()}
    if args.json:
        print(json.dumps({**res, "outputs": outputs}))
    else:
        print(f"study {res['study']}: {res['evaluated']}/{res['target'] or '-'} evaluated trials ({len(res['trials_run'])} run by this worker), "
              f"front of {res['front_size']}, stopped: {res['stopped']}; storage {res['storage']}")
        for what, path in outputs.items():
            print(f"{what}: {path}")
    if res["stopped"] == "exhausted":
        print(f"the sampler proposed only rejected or already-seen candidates for a long stretch: the space under these "
              f"constraints looks exhausted ({res['evaluated']} evaluated)", file=sys.stderr)
    if res["stopped"] == "failures":
        raise HybridSDError(f"study {res['study']}: {len(res['failures'])} trials failed in a row, stopped "
                            f"(last: {res['failures'][-1]}); fix the cause, or raise max_failures, and rerun to resume")
    if res["stopped"] == "interrupted":
        print("interrupted: rerun the same command to resume the study", file=sys.stderr)
        return 130
    return 0


_FRONT_COLS = ("trial", "candidate_key", "status")


def _metric_cols(rows: list[dict[str, Any]]) -> list[str]:
    from .config import METRICS

    return [m for m in METRICS if any(m in r for r in rows)]


def pick_best(front: list[dict[str, Any]], objectives: list[dict[str, str]]) -> dict[str, Any] | None:
    """The knee of the front: the member nearest the ideal point once every objective is min-max
    normalised over the front (best 0, worst 1)."""
    import numpy as np

    if not front:
        return None
    v = np.array([[r[o["metric"]] * (1 if o["direction"] == "minimize" else -1) for o in objectives] for r in front], float)
    span = np.where(np.ptp(v, axis=0) > 0, np.ptp(v, axis=0), 1.0)
    d = np.linalg.norm((v - v.min(axis=0)) / span, axis=1)
    return front[int(np.argmin(d))]


def write_outputs(name: str, storage: str | None, out_dir: Path, device: str = "cpu") -> dict[str, Path]:
    """After a study: the Pareto table (Markdown, CSV, JSON), the knee of the front exported with its
    model card, and the HTML report, all under ``out_dir``."""
    from ..export import export_candidate
    from .report import build_report
    from .results import summarize

    study = load_study(name, storage)
    s = summarize(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    front = s["front"]
    cols = list(_FRONT_COLS) + _metric_cols(front)
    written: dict[str, Path] = {}
    (out_dir / "pareto.json").write_text(json.dumps({k: s[k] for k in ("study", "objectives", "constraints", "counts",
                                                                      "hypervolume", "hypervolume_note", "front")}, indent=1, default=str))
    written["Pareto front (JSON)"] = out_dir / "pareto.json"
    with open(out_dir / "pareto.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["candidate"], extrasaction="ignore")
        w.writeheader()
        for r in front:
            w.writerow({**r, "candidate": json.dumps(r.get("candidate"), sort_keys=True)})
    written["Pareto front (CSV)"] = out_dir / "pareto.csv"
    best = pick_best(front, s["objectives"])
    cfg = s["config"]
    md = [f"# Pareto front of study `{s['study']}`", "",
          f"Objectives: {', '.join(o['direction'] + ' ' + o['metric'] for o in s['objectives'])}; constraints: "
          f"{', '.join(json.dumps(c) for c in s['constraints']) or 'none'}; teacher `{cfg.get('teacher')}`, space "
          f"`{cfg.get('space')}`, sampler `{cfg.get('sampler')}` (seed {cfg.get('seed')}).",
          f"Trials: {', '.join(f'{k} {v}' for k, v in s['counts'].items())}. Hypervolume {s['hypervolume']:.4f} ({s['hypervolume_note']}).",
          "", "```", format_table(front, cols), "```", ""]
    cm = next((r["cost_measured"] for r in front if r.get("cost_measured")), {})
    lat = next((r["latency"] for r in front if r.get("latency")), None)
    lat_txt = (f"{lat.get('method')} on {lat.get('device')} ({lat.get('dtype')}, batch {lat.get('batch')})" if lat else "not measured")
    md += [f"How measured: params and MACs counted on the meta device (no weights), one U-Net forward at "
           f"{cm.get('resolution', '?')} px (latent {cm.get('latent', '?')}), batch {cm.get('batch', cfg.get('batch'))}, "
           f"{cm.get('text_tokens', 77)} text tokens; latency: {lat_txt}; quality proxy on {cfg.get('teacher')}: "
           f"{json.dumps(cfg.get('proxy') or {})} (other keys at the proxy defaults), float32, CPU unless --device.", ""]
    if best is not None:
        dest = out_dir / "best_unet"
        export_candidate(cfg["teacher"], best["candidate"], dest, base=cfg.get("base"), device=device,
                         extra=_export_extra(best, s),
                         overwrite=True, card=lambda c: model_card(best, s, c))
        md.append(f"Exported: trial {best['trial']} ({best['candidate_key']}), the knee of the front (nearest the ideal point "
                  f"with objectives normalised over the front), in `{dest.name}/`.")
        written["best U-Net (knee of the front)"] = dest
    (out_dir / "pareto.md").write_text("\n".join(md) + "\n")
    written["Pareto table"] = out_dir / "pareto.md"
    written["report"] = build_report([study], out_dir / "report.html")
    return written


def cmd_pareto(args: argparse.Namespace) -> int:
    from .results import summarize

    study = load_study(args.study, args.storage)
    s = summarize(study)
    front = s["front"]
    if args.json:
        print(json.dumps({k: s[k] for k in ("study", "objectives", "constraints", "counts", "hypervolume", "hypervolume_note", "front")},
                         indent=1, default=str))
        return 0
    cols = list(_FRONT_COLS) + _metric_cols(front)
    if args.csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols + ["candidate"], extrasaction="ignore")
        w.writeheader()
        for r in front:
            w.writerow({**r, "candidate": json.dumps(r.get("candidate"), sort_keys=True)})
        print(buf.getvalue(), end="")
        return 0
    objs = ", ".join(f"{o['direction']} {o['metric']}" for o in s["objectives"])
    print(f"study {s['study']}: {objs}; {s['counts']['trials']} trials "
          f"({', '.join(f'{k} {v}' for k, v in s['counts'].items() if k != 'trials')})")
    print(f"Pareto front: {len(front)} trials, hypervolume {s['hypervolume']:.4f} ({s['hypervolume_note']})")
    print(format_table(front, cols))
    return 0


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    from .results import format_value

    table = [[c for c in cols]] + [[format_value(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _export_extra(row: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    extra = {"study": summary["study"], "trial": row["trial"], "figures": {m: row[m] for m in _metric_cols([row])}}
    if row.get("schedule"):
        extra["schedule"] = row["schedule"]  # a hybrid-schedule trial: the export is its small (edge) U-Net
    return extra


def _schedule_md(r: dict[str, Any]) -> str:
    s = r.get("schedule")
    if not s:
        return ""
    runs = " then ".join(f"{'the teacher (large, cloud)' if m == 'large' else 'this U-Net (small, edge)'} for {k} steps"
                         for m, k in zip(s["models"], s["steps"]) if k > 0)
    return (f"\n## Hybrid schedule\n\nThis trial is a hybrid run of {s['total_steps']} denoising steps: {runs}. The export is "
            f"the small (edge) U-Net; run the schedule with `hybridsd-nas hybrid --teacher TEACHER --unets teacher <this "
            f"directory> --steps {','.join(map(str, s['steps']))}` (order as listed: {', '.join(s['models'])}).\n")


def model_card(study_row: dict[str, Any], summary: dict[str, Any], cost: dict[str, Any]) -> str:
    """A README for an exported trial: the candidate, every figure, how each was measured."""
    from ..proxy import ProxySettings

    cfg = summary["config"]
    r = study_row
    figs = "\n".join(f"| {m} | {r[m]:.6g} |" if isinstance(r[m], float) else f"| {m} | {r[m]} |" for m in _metric_cols([r]))
    lat = f"{cfg.get('latency_mode')} on {cfg.get('latency_device')} ({cfg.get('latency_dtype') or 'default dtype'})" \
        if cfg.get("latency_mode") not in (None, "off") else "not measured"
    proxy = cfg.get("proxy") or {}
    return f"""# {summary['study']} / trial {r['trial']}: candidate {r['candidate_key']}

Pruned U-Net of teacher `{cfg.get('teacher')}` found by the study `{summary['study']}` (space `{cfg.get('space')}`,
sampler `{cfg.get('sampler')}` seed {cfg.get('seed')}). Weights are inherited from the teacher (BK-SDM's layer
mapping): the starting point for the final distillation (`hybridsd-nas distill`).

## Candidate

```json
{json.dumps(r.get('candidate'), indent=1, sort_keys=True)}
```
{_schedule_md(r)}
## Figures recorded by the study

| metric | value |
|---|---|
{figs}

Objectives: {', '.join(f"{o['direction']} {o['metric']}" for o in summary['objectives'])}.
Constraints: {', '.join(json.dumps(c) for c in summary['constraints']) or 'none'}.

## How they were measured

- params and MACs: counted on the meta device, no weights, one forward at {cost['measured']['resolution']} px,
  batch {cost['measured']['batch']}, {cost['measured']['text_tokens']} text tokens (this export: {cost['params']} params,
  {cost['macs']} MACs, {cost['macs_conv_linear']} conv+linear MACs).
- latency: {lat}, batch {cfg.get('batch')}.
- quality proxy (when an objective): short distillation of {proxy.get('distill_steps', ProxySettings.distill_steps)} steps, batch
  {proxy.get('batch_size', ProxySettings.batch_size)}, then {proxy.get('samples', ProxySettings.samples)} samples with seed {proxy.get('seed', 0)}; proxy FID and KID
  against the teacher's samples from the same prompts and seeds; float32 on the study's worker device.
"""


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_candidate
    from .results import summarize

    study = load_study(args.study, args.storage)
    s = summarize(study)
    row = next((r for r in s["trials"] if r["trial"] == args.trial), None)
    if row is None or row.get("candidate") is None:
        have = [r["trial"] for r in s["trials"] if r.get("candidate") is not None and r["state"] == "COMPLETE"]
        raise ConfigError(f"study {args.study!r} has no completed trial {args.trial} with a candidate; trials with one: "
                          f"{', '.join(map(str, have[:40])) or '(none)'}")
    cfg = s["config"]
    out, cost = export_candidate(cfg["teacher"], row["candidate"], args.out, base=cfg.get("base"), device=args.device,
                                 extra=_export_extra(row, s),
                                 overwrite=args.overwrite, card=lambda c: model_card(row, s, c))
    print(f"trial {row['trial']} ({row['candidate_key']}): {cost['params'] / 1e6:.3f} M params -> {out} [{cost['format']}]")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    studies = [load_study(n, args.storage) for n in args.study]
    out = build_report(studies, args.out)
    print(f"report of {', '.join(args.study)} -> {out}")
    return 0


def register(sub) -> None:
    """Add ``search``, ``pareto``, ``export`` and ``report`` to the CLI's sub-parsers."""
    p = sub.add_parser("search", help="run (or resume, or join as another worker) a study declared in YAML")
    p.add_argument("config", help="study YAML, e.g. experiments/quickstart.yaml")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///results/NAME/study.db); "
                                     "the same postgresql://USER@HOST:PORT/DB on several workers shares the study")
    p.add_argument("--n-trials", type=int, help="evaluated trials the study should have: new candidates scored, "
                   "not counting cheap rejections and repeats (default: the YAML's trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (default: the YAML's)")
    p.add_argument("--device", default="cpu", help="device of the quality proxy (cpu, cuda, cuda:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the worker's summary as JSON")
    p.add_argument("--no-outputs", action="store_true",
                   help="when the study is done, do not write results/NAME/ (Pareto table, best U-Net, report.html)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("pareto", help="the Pareto front of a study, with every figure and the hypervolume")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", help="storage URL (default: results/STUDY/study.db)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("export", help="export the pruned U-Net of a study's trial, with a model card "
                                      "(without --study: see `prune`)")
    p.add_argument("--study", required=True)
    p.add_argument("--trial", type=int, required=True, help="trial number (see `pareto`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--storage", help="storage URL (default: results/STUDY/study.db)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="one self-contained HTML page comparing the Pareto fronts of studies")
    p.add_argument("--study", action="append", required=True, help="a study name; repeat to compare")
    p.add_argument("--storage", help="storage URL holding the studies (default: results/STUDY/study.db of each)")
    p.add_argument("--out", required=True, help="output HTML file")
    p.set_defaults(func=cmd_report)
