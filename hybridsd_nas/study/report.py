"""One self-contained HTML page comparing the Pareto fronts of several studies (no network needed)."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from plotly.offline import get_plotlyjs

from .config import artifacts_dir_of
from .metrics import METRICS
from .results import HV_NOTE, feasible_trials, format_value, normaliser, summarize
from .status import TrialStatus

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}code{background:#f6f6f6;padding:0 .2em}
.grid img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}.note{color:#666;font-size:.9em}
details{margin:.4em 0}"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    return format_value(v, unit_sep=" ")


def _artifact_dir(study: optuna.Study) -> Path:
    cfg = study.user_attrs.get("config", {})
    return artifacts_dir_of(study.study_name, cfg.get("artifacts"), cfg.get("results"))


def _grid_img(study: optuna.Study, artifact_id: str | None) -> str | None:
    if not artifact_id:
        return None
    path = _artifact_dir(study) / artifact_id
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _how_measured(cfg: dict[str, Any]) -> str:
    lat = ("not measured" if cfg.get("latency_mode") in (None, "off") else
           f"{cfg['latency_mode']} on {cfg.get('latency_device')} ({cfg.get('latency_dtype') or 'default dtype'}), batch {cfg.get('batch')}")
    proxy = cfg.get("proxy") or {}
    return (f"params/MACs: meta-device count, resolution {cfg.get('resolution') or 'the config default'}, batch {cfg.get('batch')}; "
            f"latency: {lat}; proxy: {json.dumps(proxy) if proxy else 'defaults'} (float32)")


def _hover(row: dict[str, Any], metrics: list[str]) -> str:
    parts = [f"trial {row['trial']}", f"candidate {row.get('candidate_key')}"]
    parts += [f"{m}: {_fmt(row[m])}" for m in metrics if m in row]
    return "<br>".join(parts)


def _figures(group: list[tuple[optuna.Study, dict[str, Any]]], metrics: list[str], directions: list[str]) -> list[dict[str, Any]]:
    """Plotly figure specs (data + layout) for one group of studies sharing their objectives."""
    figs = []
    extra = sorted({m for _, s in group for r in s["front"] for m in r if m in METRICS} - set(metrics))
    if len(metrics) == 1:
        data = []
        for i, (study, s) in enumerate(group):
            rows = sorted((r for r in s["trials"] if r["status"] == TrialStatus.OK), key=lambda r: r["trial"])
            best, xs, ys = None, [], []
            for r in rows:
                v = r[metrics[0]]
                if best is None or (v < best if directions[0] == "minimize" else v > best):
                    best = v
                xs.append(r["trial"])
                ys.append(best)
            data.append({"type": "scatter", "mode": "lines+markers", "x": xs, "y": ys, "name": s["study"],
                         "line": {"shape": "hv", "color": _COLOURS[i % len(_COLOURS)]}})
        figs.append({"data": data, "layout": {"title": f"best {metrics[0]} so far", "xaxis": {"title": "trial"},
                                              "yaxis": {"title": metrics[0]}}})
        return figs
    if len(metrics) == 2:
        data = []
        for i, (study, s) in enumerate(group):
            c = _COLOURS[i % len(_COLOURS)]
            ok = [r for r in s["trials"] if r["status"] == TrialStatus.OK and all(m in r for m in metrics)]
            data.append({"type": "scatter", "mode": "markers", "name": f"{s['study']}: all feasible", "opacity": 0.35,
                         "x": [r[metrics[0]] for r in ok], "y": [r[metrics[1]] for r in ok],
                         "text": [_hover(r, metrics + extra) for r in ok], "hoverinfo": "text", "marker": {"color": c, "size": 7}})
            front = sorted(s["front"], key=lambda r: r[metrics[0]])
            data.append({"type": "scatter", "mode": "lines+markers", "name": f"{s['study']}: Pareto front",
                         "x": [r[metrics[0]] for r in front], "y": [r[metrics[1]] for r in front],
                         "text": [_hover(r, metrics + extra) for r in front], "hoverinfo": "text",
                         "line": {"shape": "hv" if directions == ["minimize", "minimize"] else "linear", "color": c},
                         "marker": {"color": c, "size": 10, "symbol": "diamond"}})
        figs.append({"data": data, "layout": {"title": f"{metrics[1]} against {metrics[0]}",
                                              "xaxis": {"title": f"{metrics[0]} ({directions[0]})"},
                                              "yaxis": {"title": f"{metrics[1]} ({directions[1]})"}, "hovermode": "closest"}})
        return figs
    data = []
    for i, (study, s) in enumerate(group):
        front = s["front"]
        data.append({"type": "splom", "name": s["study"], "showupperhalf": False,
                     "dimensions": [{"label": m, "values": [r[m] for r in front]} for m in metrics],
                     "text": [_hover(r, metrics) for r in front], "marker": {"color": _COLOURS[i % len(_COLOURS)], "size": 8}})
    figs.append({"data": data, "layout": {"title": "Pareto fronts, objectives pairwise", "height": 250 * len(metrics)}})
    return figs


def build_report(studies: list[optuna.Study], out: str | Path) -> Path:
    """Write one HTML page comparing the Pareto fronts of ``studies``; returns its path.

    Studies are grouped by their objectives (names and directions); within a group, hypervolume is
    computed on one normalisation over all the group's feasible trials, so the numbers compare.
    """
    out = Path(out)
    groups: dict[tuple, list[optuna.Study]] = {}
    for st in studies:
        key = tuple(zip(st.metric_names or [f"objective_{i}" for i in range(len(st.directions))],
                        (d.name.lower() for d in st.directions)))
        groups.setdefault(key, []).append(st)
    body: list[str] = [f"<h1>Pareto fronts: {_esc(', '.join(s.study_name for s in studies))}</h1>",
                       f"<p class='note'>{_esc(HV_NOTE.replace('the trials compared', 'all feasible trials of the studies in a group'))}."
                       " Feasible: complete, within every constraint, one trial per candidate.</p>"]
    plots: list[tuple[str, dict[str, Any]]] = []
    for gi, (key, members) in enumerate(groups.items()):
        metrics, directions = [k[0] for k in key], [k[1] for k in key]
        vals = [t.values for st in members for t in feasible_trials(st)]
        scale = normaliser(np.array(vals), directions) if vals else None
        summ = [(st, summarize(st, scale=scale)) for st in members]
        body.append(f"<h2>Objectives: {_esc(', '.join(f'{d} {m}' for m, d in key))}</h2>")
        body.append("<table><tr><th class='l'>study</th><th class='l'>teacher</th><th class='l'>space</th><th class='l'>sampler</th>"
                    "<th class='l'>constraints</th><th class='l'>trials</th><th>front</th><th>hypervolume</th></tr>")
        for st, s in summ:
            cfg = s["config"]
            cons = "; ".join(f"{c['metric']} {'<= ' + _fmt(c['max']) if c.get('max') is not None else ''}"
                             f"{' >= ' + _fmt(c['min']) if c.get('min') is not None else ''}{' x teacher' if c.get('of') else ''}"
                             for c in s["constraints"]) or "none"
            counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
            body.append(f"<tr><td class='l'>{_esc(s['study'])}</td><td class='l'>{_esc(cfg.get('teacher'))}</td>"
                        f"<td class='l'>{_esc(cfg.get('space'))}</td><td class='l'>{_esc(cfg.get('sampler'))} (seed {_esc(cfg.get('seed'))})</td>"
                        f"<td class='l'>{_esc(cons)}</td><td class='l'>{_esc(counts)}</td><td>{len(s['front'])}</td>"
                        f"<td>{s['hypervolume']:.4f}</td></tr>")
        body.append("</table>")
        for st, s in summ:
            body.append(f"<p class='note'>{_esc(s['study'])}: {_esc(_how_measured(s['config']))}</p>")
        for fi, fig in enumerate(_figures(summ, metrics, directions)):
            div = f"plot-{gi}-{fi}"
            body.append(f"<div id='{div}' class='plot' style='width:100%;height:{fig['layout'].get('height', 480)}px'></div>")
            plots.append((div, fig))
        for st, s in summ:
            cols = ["trial", "candidate_key"] + [m for m in METRICS if any(m in r for r in s["front"])]
            body.append(f"<h3>{_esc(s['study'])}: Pareto front ({len(s['front'])} trials)</h3><table><tr>"
                        + "".join(f"<th class='l'>{_esc(c)}</th>" if c == "candidate_key" else f"<th>{_esc(c)}</th>" for c in cols) + "</tr>")
            for r in s["front"]:
                body.append("<tr>" + "".join(f"<td class='l'>{_esc(r.get(c))}</td>" if c == "candidate_key" else f"<td>{_esc(_fmt(r.get(c)))}</td>"
                                             for c in cols) + "</tr>")
            body.append("</table>")
            for r in s["front"]:
                img = _grid_img(st, r.get("sample_grid_artifact"))
                cand = _esc(json.dumps(r.get("candidate"), sort_keys=True))
                inner = (f"<div class='grid'><img alt='samples of trial {r['trial']}' src='{img}'></div>" if img
                         else "<p class='note'>no samples stored</p>")
                body.append(f"<details><summary>trial {r['trial']} ({_esc(r.get('candidate_key'))}): samples and candidate</summary>"
                            f"{inner}<p><code>{cand}</code></p></details>")
    script = "\n".join(f"Plotly.newPlot({json.dumps(div)}, {json.dumps(fig['data'], default=float)}, "
                       f"{json.dumps(fig['layout'], default=float)}, {{responsive: true, displaylogo: false}});"
                       for div, fig in plots)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hybridsd_nas report</title><style>{_CSS}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(body)}<script>{script}</script></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
