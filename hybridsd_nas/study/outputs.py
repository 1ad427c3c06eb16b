"""What a study leaves behind: the Pareto table (Markdown, CSV, JSON), the knee of the front
exported with its model card, exports of any trial, and the HTML report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import optuna

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.export import export_candidate
from hybridsd_nas.proxy import ProxySettings

from .metrics import METRICS
from .report import build_report
from .results import format_value, summarize
from .rungs import describe_audit
from .storage import load_study, redact_url, stored_study_url

FRONT_COLUMNS = ("trial", "label", "candidate_key", "status")
# the parts of a study's summary that pareto.json and ``pareto --json`` hold
FRONT_KEYS = ("study", "objectives", "constraints", "counts", "hypervolume", "hypervolume_note", "fidelity", "audit", "front")
OWNER_FILE = "study-owner.json"  # in a results folder: the study and storage whose outputs it holds


def _storage_id(url: str | None) -> str | None:
    """A storage URL as compared between runs: the password redacted, a SQLite path made absolute."""
    if url is None:
        return None
    if url.startswith("sqlite:///"):
        url = "sqlite:///" + Path(url[len("sqlite:///"):]).resolve().as_posix()
    return redact_url(url)


def claim_results_dir(name: str, storage: str, out_dir: Path, write: bool = True) -> None:
    """Refuse (one line) when ``out_dir`` holds the outputs of another study, or of a study of the same
    name in another storage; else mark it as study ``name``'s in ``storage`` (``write``), so that two
    studies never write into one folder. A folder from before these marks is judged by its pareto.json."""
    mine = {"study": name, "storage": _storage_id(storage)}
    mark = out_dir / OWNER_FILE
    if mark.is_file():
        try:
            theirs = json.loads(mark.read_text())
        except (OSError, json.JSONDecodeError):
            theirs = {}
    elif (out_dir / "pareto.json").is_file():
        try:
            theirs = {"study": json.loads((out_dir / "pareto.json").read_text()).get("study"), "storage": mine["storage"]}
        except (OSError, json.JSONDecodeError):
            theirs = {}
    else:
        theirs = None
    if theirs is not None and {k: theirs.get(k) for k in mine} != mine:
        raise ConfigError(f"results folder {out_dir} holds the outputs of study {theirs.get('study')!r} in {theirs.get('storage')}; "
                          f"study {name!r} in {mine['storage']} will not write there: give it its own results_dir (or remove {out_dir})")
    if write and not mark.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(mark, "x") as f:  # created once: of two studies claiming at the same moment, one gets it
                json.dump(mine, f, indent=1)
        except FileExistsError:
            claim_results_dir(name, storage, out_dir, write=False)


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The study metrics any of ``rows`` has, in registry order."""
    return [m for m in METRICS if any(m in r for r in rows)]


def front_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of a front table: trial, readable label, candidate key, status, the rung (a
    multi-fidelity study), then every metric the rows have."""
    rung = ["rung"] if any(r.get("rung") is not None for r in rows) else []
    return list(FRONT_COLUMNS) + rung + metric_columns(rows)


def front_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of :func:`~hybridsd_nas.study.summarize`'s summary that pareto.json holds."""
    return {k: summary[k] for k in FRONT_KEYS}


def write_front_csv(rows: list[dict[str, Any]], cols: list[str], f: IO[str]) -> None:
    """The front as CSV: ``cols`` then the candidate as JSON."""
    w = csv.DictWriter(f, fieldnames=cols + ["candidate"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "candidate": json.dumps(r.get("candidate"), sort_keys=True)})


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain-text table of ``rows`` (figures through :func:`~hybridsd_nas.study.results.format_value`)."""
    table = [[c for c in cols]] + [[format_value(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def pick_best(front: list[dict[str, Any]], objectives: list[dict[str, str]]) -> dict[str, Any] | None:
    """The knee of the front: the member nearest the ideal point once every objective is min-max
    normalised over the front (best 0, worst 1)."""
    if not front:
        return None
    v = np.array([[r[o["metric"]] * (1 if o["direction"] == "minimize" else -1) for o in objectives] for r in front], float)
    span = np.where(np.ptp(v, axis=0) > 0, np.ptp(v, axis=0), 1.0)
    d = np.linalg.norm((v - v.min(axis=0)) / span, axis=1)
    return front[int(np.argmin(d))]


def export_extra(row: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What an export of trial ``row`` records beside its candidate: the study, the trial, its figures
    (and its schedule for a hybrid-schedule trial)."""
    extra = {"study": summary["study"], "trial": row["trial"], "figures": {m: row[m] for m in metric_columns([row])}}
    if row.get("provenance"):
        extra["provenance"] = row["provenance"]  # what the quality figures were measured on
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


def _provenance_md(r: dict[str, Any]) -> str:
    p = r.get("provenance")
    if not p:
        return ""
    es = p.get("eval_set") or {}
    lines = [f"- teacher: `{p.get('teacher')}` (fingerprint `{p.get('teacher_fingerprint')}`)",
             f"- trained on: {p.get('data')}; held out for the ranking score: {p.get('heldout')}",
             f"- resolution {p.get('resolution')} px; sampler {p.get('sampler')}, {p.get('sampler_steps')} steps, guidance {p.get('guidance')}"]
    if es:
        lines.append(f"- evaluation set: `{es.get('source')}` ({es.get('prompts')} prompts, fingerprint `{es.get('fingerprint')}`)")
    return "\n## What the quality figures were measured on\n\n" + "\n".join(lines) + "\n"


def _pipeline_md(r: dict[str, Any]) -> str:
    """How the whole request's figures of trial ``r`` were found (nothing when it has none)."""
    p = r.get("pipeline")
    if not p:
        return ""
    q = p["request"]
    out = (f"\n- whole request (`pipeline_latency_ms`, `peak_memory_mb`): {q['steps']} steps at guidance {q['guidance']:g}, "
           f"{q['resolution']} px, {q['images']} image(s), {q['unet_batch']} latents per U-Net forward, {p.get('dtype')}")
    if "latency" in p:
        lat = p["latency"]
        out += (f"; latency = text encoder {lat['text_encoder_ms']:.4g} + U-Net steps {lat['unet_ms']:.4g} + VAE decoder "
                f"{lat['decoder_ms']:.4g} ms (U-Net: {lat['unet_from']}; text encoder and decoder: {lat['components_from']})")
    if "memory" in p:
        mem = p["memory"]
        parts = ", ".join(f"{k} {v:.4g}" for k, v in (mem.get("weights_mb") or {}).items())
        out += f"; memory {mem['method']}" + (f" (weights MB: {parts}; activation peak {mem['activation_peak_mb']:.4g} MB)"
                                               if parts else "")
    return out + "."


def model_card(study_row: dict[str, Any], summary: dict[str, Any], cost: dict[str, Any]) -> str:
    """A README for an exported trial: the candidate, every figure, how each was measured."""
    cfg = summary["config"]
    r = study_row
    figs = "\n".join(f"| {m} | {r[m]:.6g} |" if isinstance(r[m], float) else f"| {m} | {r[m]} |" for m in metric_columns([r]))
    lat = f"{cfg.get('latency_mode')} on {cfg.get('latency_device')} ({cfg.get('latency_dtype') or 'default dtype'})" \
        if cfg.get("latency_mode") not in (None, "off") else "not measured"
    proxy = cfg.get("proxy") or {}
    return f"""# {summary['study']} / trial {r['trial']}: {r.get('label') or 'candidate'} ({r['candidate_key']})

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
- latency: {lat}, batch {cfg.get('batch')}.{_pipeline_md(r)}
- quality proxy (when an objective): short distillation of {proxy.get('distill_steps', ProxySettings.distill_steps)} steps, batch
  {proxy.get('batch_size', ProxySettings.batch_size)}, then {proxy.get('samples', ProxySettings.samples)} samples with seed {proxy.get('seed', 0)}; proxy FID and KID
  against the teacher's samples from the same prompts and seeds; float32 on the study's worker device.
{_provenance_md(r)}"""


def export_row(row: dict[str, Any], summary: dict[str, Any], out: str | Path, device: str = "cpu",
               overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Export the U-Net of trial ``row`` (a row of ``summary``) to ``out`` with its model card; returns
    the directory and the export's cost figures."""
    cfg = summary["config"]
    return export_candidate(cfg["teacher"], row["candidate"], out, base=cfg.get("base"), device=device,
                            extra=export_extra(row, summary), overwrite=overwrite, card=lambda c: model_card(row, summary, c))


def export_trial(study: optuna.Study, trial: int, out: str | Path, device: str = "cpu",
                 overwrite: bool = False) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Export the U-Net of a completed trial of ``study``; returns its row, the directory and its cost."""
    s = summarize(study)
    row = next((r for r in s["trials"] if r["trial"] == trial), None)
    if row is None or row.get("candidate") is None:
        have = [r["trial"] for r in s["trials"] if r.get("candidate") is not None and r["state"] == "COMPLETE"]
        raise ConfigError(f"study {study.study_name!r} has no completed trial {trial} with a candidate; trials with one: "
                          f"{', '.join(map(str, have[:40])) or '(none)'}")
    out, cost = export_row(row, s, out, device=device, overwrite=overwrite)
    return row, out, cost


def write_outputs(name: str, storage: str | None, out_dir: Path, device: str = "cpu") -> dict[str, Path]:
    """After a study: the Pareto table (Markdown, CSV, JSON), the knee of the front exported with its
    model card, and the HTML report, all under ``out_dir``; refused (one line) when ``out_dir`` holds
    another study's outputs (:func:`claim_results_dir`)."""
    study = load_study(name, storage)
    claim_results_dir(name, stored_study_url(name, storage), out_dir)
    s = summarize(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    front = s["front"]
    cols = front_columns(front)
    written: dict[str, Path] = {}
    (out_dir / "pareto.json").write_text(json.dumps(front_json(s), indent=1, default=str))
    written["Pareto front (JSON)"] = out_dir / "pareto.json"
    with open(out_dir / "pareto.csv", "w", newline="") as f:
        write_front_csv(front, cols, f)
    written["Pareto front (CSV)"] = out_dir / "pareto.csv"
    best = pick_best(front, s["objectives"])
    cfg = s["config"]
    md = [f"# Pareto front of study `{s['study']}`", "",
          f"Objectives: {', '.join(o['direction'] + ' ' + o['metric'] for o in s['objectives'])}; constraints: "
          f"{', '.join(json.dumps(c) for c in s['constraints']) or 'none'}; teacher `{cfg.get('teacher')}`, space "
          f"`{cfg.get('space')}`, sampler `{cfg.get('sampler')}` (seed {cfg.get('seed')}).",
          f"Trials: {', '.join(f'{k} {v}' for k, v in s['counts'].items())}. Hypervolume {s['hypervolume']:.4f} ({s['hypervolume_note']}).",
          "", "```", format_table(front, cols), "```", ""]
    if s.get("fidelity"):
        f = s["fidelity"]
        md += [f"Multi-fidelity: rungs {f['rungs']} distillation steps, the best {f['promote']:g} of each rung promoted; the front "
               "uses each candidate's highest rung (column `rung`).", "", describe_audit(s["audit"]), ""]
    cm = next((r["cost_measured"] for r in front if r.get("cost_measured")), {})
    lat = next((r["latency"] for r in front if r.get("latency")), None)
    lat_txt = (f"{lat.get('method')} on {lat.get('device')} ({lat.get('dtype')}, batch {lat.get('batch')})" if lat else "not measured")
    md += [f"How measured: params and MACs counted on the meta device (no weights), one U-Net forward at "
           f"{cm.get('resolution', '?')} px (latent {cm.get('latent', '?')}), batch {cm.get('batch', cfg.get('batch'))}, "
           f"{cm.get('text_tokens', 77)} text tokens; latency: {lat_txt}; quality proxy on {cfg.get('teacher')}: "
           f"{json.dumps(cfg.get('proxy') or {})} (other keys at the proxy defaults), float32, CPU unless --device.", ""]
    if best is not None:
        dest = out_dir / "best_unet"
        export_row(best, s, dest, device=device, overwrite=True)
        md.append(f"Exported: trial {best['trial']} ({best.get('label')}, {best['candidate_key']}), the knee of the front (nearest the ideal point "
                  f"with objectives normalised over the front), in `{dest.name}/`.")
        written["best U-Net (knee of the front)"] = dest
    (out_dir / "pareto.md").write_text("\n".join(md) + "\n")
    written["Pareto table"] = out_dir / "pareto.md"
    written["report"] = build_report([study], out_dir / "report.html")
    return written
