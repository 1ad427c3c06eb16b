"""One self-contained HTML page comparing the Pareto fronts of several studies (no network needed).

Per group of studies sharing their objectives the page holds: a table of the studies (teacher,
space, sampler, constraints, trial counts, front size, hypervolume on the group's normalisation);
the plots (one objective: the value per trial and the best so far; two: the objectives against
each other; more: a parallel-coordinates view and the objectives pairwise), with the teacher as a
star, the enqueued presets labelled, and a button pair that hides the infeasible and rejected
trials; the hypervolume of the front as each study grew; and per study its front as a table, its
rungs and rung audit (multi-fidelity studies), all its trials, and the front members' sample grids.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import optuna
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from .config import artifacts_dir_of
from .metrics import METRICS
from .results import HV_NOTE, feasible_trials, format_value, hypervolume, normaliser, summarize
from .status import SCORED, TrialStatus, evaluated

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_GREY = "#9a9a9a"
_TEACHER_COLOUR = "#f2b701"
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}code{background:#f6f6f6;padding:0 .2em}
.grid img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}.note{color:#666;font-size:.9em}
.key{color:#999;font-size:.8em;font-family:monospace}
.warn{background:#fff4e5;border-left:4px solid #e67700;padding:.4em .7em;margin:.5em 0}
.pairs{display:grid;grid-template-columns:1fr 1fr;gap:0 1em}
details{margin:.4em 0}summary{cursor:pointer}"""
# the mode bar without the selection tools (nothing on the page reads a selection): shorter, so it
# leaves a half-width plot's title readable
# the plots' widths in px on the page (max-width 1200 less padding; the pairwise grid's column), a
# little under, for laying out their legends
_FULL_WIDTH, _HALF_WIDTH = 1100, 540
_PLOT_CONFIG = {"responsive": True, "displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}


class _Axis(NamedTuple):
    """How a metric reads on an axis: its title, a short name (parallel coordinates), the divisor its
    values are shown in, the unit after dividing, and what one value is of (``{res}``: the resolution)."""

    title: str
    short: str
    scale: float = 1.0
    unit: str = ""
    per: str = ""


# the readable axis of each registered metric; one missing here reads as its own name, unscaled
_AXES: dict[str, _Axis] = {
    "params": _Axis("U-Net parameters", "params", 1e6, "M"),
    "macs": _Axis("U-Net MACs", "MACs", 1e9, "G", "per forward{res}"),
    "macs_conv_linear": _Axis("U-Net conv+linear MACs", "conv+linear MACs", 1e9, "G", "per forward{res}"),
    "latency_ms": _Axis("U-Net latency", "latency", 1.0, "ms", "per forward"),
    "cloud_share": _Axis("cloud share of the all-cloud MACs", "cloud share", 1.0, "fraction"),
    "edge_macs": _Axis("edge MACs", "edge MACs", 1e9, "G", "per image{res}"),
    "output_mse": _Axis("output MSE vs teacher before training", "output MSE"),
    "latent_stat_shift": _Axis("noise statistics shift vs teacher before training", "stat shift", 1.0, "|Δmean|+|Δstd|"),
    "proxy_fid": _Axis("proxy FID vs teacher samples", "proxy FID"),
    "kid": _Axis("KID vs teacher samples", "KID"),
    "fid_real": _Axis("FID vs real images", "FID real"),
    "heldout_mse": _Axis("held-out MSE vs teacher", "held-out MSE"),
    "paired_mse": _Axis("paired pixel MSE vs teacher samples", "paired MSE"),
    "adherence": _Axis("prompt adherence", "adherence", 1.0, "share of samples"),
    "clip_score": _Axis("CLIP score", "CLIP score"),
    "cmmd": _Axis("CMMD vs teacher samples", "CMMD"),
}


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    return format_value(v, unit_sep=" ")


def _axis(metric: str) -> _Axis:
    return _AXES.get(metric) or _Axis(metric, metric)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scaled(metric: str, v: Any) -> float | None:
    """``v`` in the unit its axis shows (params in millions, MACs in G); None if not a finite number."""
    return v / _axis(metric).scale if _num(v) else None


def _g(v: float) -> str:
    return f"{v:.4g}"


def _shown(metric: str, v: Any) -> str:
    """A figure in its axis unit, unit included (``1.234 M``, ``0.5 G``, ``12.3 ms``)."""
    x = _scaled(metric, v)
    if x is None:
        return _fmt(v)
    unit = _axis(metric).unit
    return f"{_g(x)} {unit}" if unit and unit[0].isalpha() and len(unit) <= 2 else _g(x)


def _unit_label(metric: str) -> str:
    """The metric's short name with its unit, for column headers and parallel coordinates."""
    a = _axis(metric)
    return f"{a.short} ({a.unit})" if a.unit and len(a.unit) <= 2 else a.short


def _axis_title(metric: str, direction: str | None, res: str = "") -> str:
    """``U-Net MACs (G, per forward at 32 px, lower is better)``: title, unit, what per, which way is better."""
    a = _axis(metric)
    parts = [a.unit, a.per.format(res=res)]
    if direction:
        parts.append("lower is better" if direction == "minimize" else "higher is better")
    inner = ", ".join(p for p in parts if p)
    return f"{a.title} ({inner})" if inner else a.title


def _label(row: dict[str, Any]) -> str:
    """The candidate's readable name: its label, else the preset it was enqueued as, else its key."""
    return str(row.get("label") or row.get("enqueued_as") or row.get("candidate_key") or f"trial {row.get('trial')}")


def _label_cell(row: dict[str, Any]) -> str:
    """A table cell naming the candidate; its key is the cell's tooltip."""
    key = row.get("candidate_key")
    tip = f" title='candidate key {_esc(key)}'" if key else ""
    return f"<td class='l'{tip}>{_esc(_label(row))}</td>"


def _resolution(summ: list[tuple[optuna.Study, dict[str, Any]]]) -> str:
    """`` at 32 px`` from the trials' cost records (else the configs), `` at 32/64 px`` if they differ, else ''."""
    seen: list[Any] = []
    for _, s in summ:
        r = next((row["cost_measured"].get("resolution") for row in s["trials"]
                  if isinstance(row.get("cost_measured"), dict) and row["cost_measured"].get("resolution")), None)
        r = r or s["config"].get("resolution")
        if r and r not in seen:
            seen.append(r)
    return f" at {'/'.join(str(r) for r in seen)} px" if seen else ""


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


def _rung(row: dict[str, Any]) -> Any:
    """The distillation steps the row's quality figures come from; None for a row without any (a
    trial rejected by a budget or failed before distilling is given the first rung by summarize)."""
    if row.get("rung") is None or not any(METRICS.get(m).group == "quality" for m in _figures_of(row)):
        return None
    return row["rung"]


def _hover(row: dict[str, Any]) -> str:
    """Everything a trial row has to say in a plot's hover box: name, trial, status, rung, every figure, key."""
    head = [f"trial {row.get('trial')}", str(row.get("status") or row.get("state", "").lower())]
    if _rung(row) is not None:
        head.append(f"rung {_rung(row)} steps")
    lines = [f"<b>{_esc(_label(row))}</b>", " · ".join(_esc(h) for h in head)]
    if row.get("enqueued_as") and row["enqueued_as"] != _label(row):
        lines.append(f"enqueued as {_esc(row['enqueued_as'])}")
    lines += [f"{_esc(_axis(m).short)}: {_esc(_shown(m, row[m]))}" for m in _figures_of(row)]
    if row.get("status") != TrialStatus.OK and row.get("reason"):
        reason = str(row["reason"])
        lines.append(_esc(reason if len(reason) <= 90 else reason[:87] + "..."))
    if row.get("candidate_key"):
        lines.append(f"<span style='font-size:10px;color:#888'>key {_esc(row['candidate_key'])}</span>")
    return "<br>".join(lines)


def _scored(t: optuna.trial.FrozenTrial) -> bool:
    """A complete trial with figures of its own (ok or infeasible; a reused duplicate is not)."""
    ua = t.user_attrs
    return t.state == TrialState.COMPLETE and ua.get("status") in SCORED and "duplicate_of" not in ua and t.values is not None


def _keep_highest_rung(best: dict[str, optuna.trial.FrozenTrial], t: optuna.trial.FrozenTrial) -> None:
    """Record scored trial ``t`` in ``best`` (by candidate key) if it is its candidate's highest rung so far."""
    k = str(t.user_attrs.get("candidate_key") or f"trial-{t.number}")
    have = best.get(k)
    if have is None or (t.user_attrs.get("rung") or 0, t.number) > (have.user_attrs.get("rung") or 0, have.number):
        best[k] = t


def _representatives(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Each scored candidate's trial at the highest rung it reached (without rungs: its one scored
    trial), by candidate key: the feasible ones are those :func:`~hybridsd_nas.study.results.feasible_trials` takes."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if _scored(t):
            _keep_highest_rung(best, t)
    return best


def _feasible(t: optuna.trial.FrozenTrial) -> bool:
    return t.user_attrs.get("status") == TrialStatus.OK and all(math.isfinite(v) for v in t.values)


def _hv_series(study: optuna.Study, directions: list[str], scale) -> dict[str, list]:
    """The hypervolume of the feasible front after each trial, in trial-number order: ``x`` the
    evaluated trials so far (a promotion to a higher rung adds a point at the same x), ``y`` the
    hypervolume on ``scale`` (the group's normalisation), ``trial`` the trial numbers."""
    out: dict[str, list] = {"x": [], "y": [], "trial": []}
    n = 0
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        new, scored = evaluated(t), _scored(t)
        n += new
        if scored:
            _keep_highest_rung(best, t)
        if not (new or scored):
            continue
        pts = [b.values for b in best.values() if _feasible(b)]
        hv = hypervolume(np.array(pts), directions, scale) if pts and scale is not None else 0.0
        out["x"].append(n)
        out["y"].append(hv)
        out["trial"].append(t.number)
    return out


def _rows_for(study: optuna.Study, s: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The trial rows of a study by how a plot draws them: ``feasible`` (each candidate's scored
    trial at its highest rung, within every constraint), ``earlier`` (a promoted candidate's
    lower-rung trials), ``other`` (infeasible, rejected by a budget, failed: those with figures)."""
    rep = {t.number for t in _representatives(study).values()}
    out: dict[str, list[dict[str, Any]]] = {"feasible": [], "earlier": [], "other": []}
    for r in s["trials"]:
        if "duplicate_of" in r:
            continue
        st = r.get("status")
        if st == TrialStatus.OK and r.get("state") == "COMPLETE":
            out["feasible" if r["trial"] in rep else "earlier"].append(r)
        elif st in (TrialStatus.INFEASIBLE, TrialStatus.REJECTED, TrialStatus.FAILED):
            out["other"].append(r)
    return out


def _teacher_points(summ, metrics: list[str]) -> tuple[list[tuple[str, list[float], dict[str, Any]]], str | None]:
    """The teacher's point(s) in ``metrics`` (scaled) with a legend name and all its figures each, and a note
    when none can be placed.

    Studies of one teacher with the same figures share one star named "teacher"; different teachers get one each."""
    points: list[tuple[dict, str]] = []
    missing: set[str] = set()
    unknown = []
    for _, s in summ:
        t = s.get("teacher")
        if not t:
            unknown.append(s["study"])
            continue
        lack = [m for m in metrics if not _num(t.get(m))]
        if lack:
            missing.update(lack)
            continue
        if not any(p == t for p, _ in points):
            points.append((t, str(s["config"].get("teacher") or s["study"])))
    named = [("teacher" if len(points) == 1 else f"teacher ({name})", [_scaled(m, t[m]) for m in metrics], t) for t, name in points]
    if named:
        return named, None
    why = []
    if missing:
        why.append("no teacher figure for " + ", ".join(sorted(missing)))
    if unknown:
        why.append("the teacher's figures are not recorded in " + ", ".join(unknown))
    return [], f"The teacher is not placed on this plot: {'; '.join(why)}."


def _status_traces(group, rows_of, xm: str, ym: str, *, xfun=None, front_line: str | None = None):
    """The traces of one scatter of ``ym`` against ``xm`` (``xfun``: x from a row instead, e.g. its trial
    number) and the indices of the infeasible traces (for the toggle). ``front_line``: join the front's
    members by a staircase of this plotly line shape (``hv``/``vh``), else markers only."""
    many = len(group) > 1
    data: list[dict[str, Any]] = []
    labelled: list[dict[str, Any]] = []  # the presets, drawn after every study's markers so that their labels stay on top
    grey: list[int] = []

    def x_of(r):
        return xfun(r) if xfun else _scaled(xm, r.get(xm))

    def has(r):
        return x_of(r) is not None and _scaled(ym, r.get(ym)) is not None

    def pre(name, s):
        return f"{s['study']}: {name}" if many else name

    for i, (_, s) in enumerate(group):
        c = _COLOURS[i % len(_COLOURS)]
        rows = rows_of[s["study"]]
        # the presets last, so the legend shows the plain marker of the trace (it draws its first point's)
        other = sorted((r for r in rows["other"] if has(r)), key=lambda r: (bool(r.get("enqueued_as")), r["trial"]))
        if other:
            grey.append(len(data))
            data.append({"type": "scatter", "mode": "markers+text", "name": pre("infeasible/rejected", s),
                         "x": [x_of(r) for r in other], "y": [_scaled(ym, r[ym]) for r in other],
                         "text": [r.get("enqueued_as") or "" for r in other],
                         "textfont": {"color": _GREY, "size": 10}, "hovertext": [_hover(r) for r in other], "hoverinfo": "text",
                         "marker": {"color": _GREY, "size": 6, "opacity": 0.45,
                                    "symbol": ["square-open" if r.get("enqueued_as") else "circle" for r in other]}})
        earlier = [r for r in rows["earlier"] if has(r)]
        if earlier:
            data.append({"type": "scatter", "mode": "markers", "name": pre("earlier rungs of promoted", s),
                         "x": [x_of(r) for r in earlier], "y": [_scaled(ym, r[ym]) for r in earlier],
                         "hovertext": [_hover(r) for r in earlier], "hoverinfo": "text",
                         "marker": {"color": c, "size": 6, "symbol": "circle-open", "opacity": 0.5}})
        ok = [r for r in rows["feasible"] if has(r)]
        data.append({"type": "scatter", "mode": "markers", "name": pre("feasible", s), "x": [x_of(r) for r in ok],
                     "y": [_scaled(ym, r[ym]) for r in ok], "hovertext": [_hover(r) for r in ok], "hoverinfo": "text",
                     "marker": {"color": c, "size": 7, "opacity": 0.4}})
        front = sorted((r for r in s["front"] if has(r)), key=lambda r: (x_of(r), _scaled(ym, r[ym])))
        data.append({"type": "scatter", "mode": "lines+markers" if front_line else "markers", "name": pre("Pareto front", s),
                     "x": [x_of(r) for r in front], "y": [_scaled(ym, r[ym]) for r in front],
                     "hovertext": [_hover(r) for r in front], "hoverinfo": "text",
                     "line": {"shape": front_line or "linear", "color": c, "width": 1.5},
                     "marker": {"color": c, "size": 10, "symbol": "diamond", "line": {"color": "white", "width": 1}}})
        presets = [r for r in rows["feasible"] if has(r) and r.get("enqueued_as")]
        if presets:
            labelled.append({"type": "scatter", "mode": "markers+text", "name": pre("presets", s),
                         "x": [x_of(r) for r in presets], "y": [_scaled(ym, r[ym]) for r in presets],
                         "text": [r["enqueued_as"] for r in presets],
                         "textfont": {"color": c, "size": 11, "shadow": "auto"}, "hovertext": [_hover(r) for r in presets],
                         "hoverinfo": "text",
                         "marker": {"color": c, "size": 13, "symbol": "square-open", "line": {"width": 2}}})
    return data + labelled, grey


def _toggle(grey: list[int]) -> dict[str, Any]:
    """Layout entries for the "all trials" / "feasible only" buttons that show or hide the infeasible
    traces ``grey``: above the plot's top-left corner, under the title, after the word "show:"."""
    if not grey:
        return {}
    return {"updatemenus": [{"type": "buttons", "direction": "right", "showactive": True, "active": 0, "x": 0, "xanchor": "left",
                             "y": 1.015, "yanchor": "bottom", "pad": {"l": 42, "t": 0, "b": 0, "r": 0}, "font": {"size": 11},
                             "buttons": [{"label": "all trials", "method": "restyle", "args": [{"visible": True}, grey]},
                                         {"label": "feasible only", "method": "restyle", "args": [{"visible": False}, grey]}]}],
            "annotations": [{"text": "show:", "showarrow": False, "xref": "paper", "yref": "paper", "x": 0, "xanchor": "left",
                             "y": 1.015, "yanchor": "bottom", "yshift": 4, "font": {"size": 12, "color": "#555"}}]}


def _layout(title: str, xtitle: str, ytitle: str, height: int = 520) -> dict[str, Any]:
    return {"title": {"text": title, "x": 0, "xanchor": "left", "y": 0.985, "yanchor": "top", "yref": "container", "font": {"size": 15}},
            "height": height,
            "xaxis": {"title": {"text": xtitle}, "zeroline": False, "automargin": True},
            "yaxis": {"title": {"text": ytitle}, "zeroline": False, "automargin": True},
            "hovermode": "closest", "margin": {"t": 80, "r": 20, "l": 70, "b": 60}}


def _legend_below(fig: dict[str, Any], width: int) -> None:
    """Put ``fig``'s legend under its x-axis title, in rows, with the bottom margin it needs: the page's
    layout is fixed, so the rows are counted ahead (plotly's horizontal legend: an entry is about
    40 px plus its text, about 6.5 px a character at 11 px, and wraps at the plot's width)."""
    names = [t["name"] for t in fig["data"] if t.get("name") and t.get("showlegend", True)]
    if len(names) < 2:  # plotly shows no legend for a single trace
        return
    rows, used = 1, 0.0
    for n in names:
        w = 40 + 6.5 * len(n)
        if used and used + w > width:
            rows, used = rows + 1, 0.0
        used += w
    lay = fig["layout"]
    lay["legend"] = {"orientation": "h", "x": 0, "xanchor": "left", "yref": "container", "y": 0, "yanchor": "bottom",
                     "font": {"size": 11}}
    lay["margin"] = {**lay["margin"], "b": 80 + 21 * rows}
    lay["height"] = lay["height"] + 21 * rows


# where a point's label may go, tried in this order: plotly's text position, and the side it takes (x, y)
_LABEL_SPOTS = (("top center", 0, 1), ("bottom center", 0, -1), ("middle right", 1, 0), ("middle left", -1, 0))


def _place_labels(fig: dict[str, Any], width: int) -> None:
    """Give each labelled point (the presets) a text position where its label does not cover a label
    placed before it, going left to right; the boxes are estimated in px from the axes' data range
    and the plot's size (an 11 px label: about 6.5 px a character, 14 px high)."""
    traces = [t for t in fig["data"] if t.get("type") == "scatter" and "text" in t.get("mode", "")]
    xs = [x for t in fig["data"] for x in t.get("x", []) if _num(x)]
    ys = [y for t in fig["data"] for y in t.get("y", []) if _num(y)]
    if not traces or not xs:
        return
    sx = (width - 90) / ((max(xs) - min(xs)) or 1.0)
    sy = (fig["layout"]["height"] - 140) / ((max(ys) - min(ys)) or 1.0)
    placed: list[tuple[float, float, float, float]] = []
    for t in traces:
        t["textposition"] = ["top center"] * len(t["x"])
        t["cliponaxis"] = False  # a label near the plot's edge shows whole
    points = sorted(((t, i) for t in traces for i, txt in enumerate(t["text"]) if txt), key=lambda ti: ti[0]["x"][ti[1]])
    for t, i in points:
        px, py = (t["x"][i] - min(xs)) * sx, (t["y"][i] - min(ys)) * sy
        w, h = 6.5 * len(t["text"][i]) + 4, 14.0
        boxes = []
        for pos, dx, dy in _LABEL_SPOTS:
            cx, cy = px + dx * (6 + w / 2), py + dy * (6 + h / 2)
            boxes.append((pos, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        pos, box = next(((p, b) for p, b in boxes
                         if not any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in placed)), boxes[0])
        t["textposition"][i] = pos
        placed.append(box)


def _teacher_traces(points, x: list[float] | None = None) -> list[dict[str, Any]]:
    """A star per teacher point; with ``x`` (one objective plotted against trials) a dashed line over it.
    The hover lists every figure the teacher has."""
    out = []
    for name, p, figs in points:
        hover = "<br>".join([f"<b>{_esc(name)}</b>"] + [f"{_esc(_axis(m).short)}: {_esc(_shown(m, figs[m]))}" for m in METRICS if m in figs])
        if x is not None:
            out.append({"type": "scatter", "mode": "lines", "name": name, "x": x, "y": [p[0]] * len(x), "hovertext": [hover] * len(x),
                        "hoverinfo": "text", "line": {"color": _TEACHER_COLOUR, "dash": "dash", "width": 2}})
        else:
            out.append({"type": "scatter", "mode": "markers", "name": name, "x": [p[0]], "y": [p[1]], "hovertext": [hover],
                        "hoverinfo": "text",
                        "marker": {"color": _TEACHER_COLOUR, "size": 18, "symbol": "star", "line": {"color": "#333", "width": 1}}})
    return out


def _scatter(group, rows_of, xm: str, ym: str, dirs: tuple[str, str], res: str, two: bool, height: int = 520):
    """The scatter of ``ym`` against ``xm`` with the teacher, the presets and the toggle; its note (or None)."""
    # the front's staircase bounds the region it dominates: from a member, along x first when x is
    # minimised (the next member is further right and better in y), along y first when x is maximised
    data, grey = _status_traces(group, rows_of, xm, ym, front_line=("hv" if dirs[0] == "minimize" else "vh") if two else None)
    points, note = _teacher_points(group, [xm, ym])
    data += _teacher_traces(points)
    title = f"{_axis(ym).short} against {_axis(xm).short}"
    fig = {"data": data, "layout": {**_layout(f"Pareto front: {title}" if two else title,
                                              _axis_title(xm, dirs[0], res), _axis_title(ym, dirs[1], res), height),
                                    **_toggle(grey)}}
    return fig, note


def _one_objective(group, rows_of, metric: str, direction: str, res: str):
    """One objective: each trial's value against its trial number, the best so far as a step line."""
    data, grey = _status_traces(group, rows_of, "trial", metric, xfun=lambda r: r["trial"])
    xs_all = [r["trial"] for _, s in group for r in s["trials"]]
    for i, (_, s) in enumerate(group):
        rows = sorted(rows_of[s["study"]]["feasible"], key=lambda r: r["trial"])
        best, xs, ys = None, [], []
        for r in rows:
            v = _scaled(metric, r.get(metric))
            if v is None:
                continue
            if best is None or (v < best if direction == "minimize" else v > best):
                best = v
            xs.append(r["trial"])
            ys.append(best)
        data.append({"type": "scatter", "mode": "lines", "name": f"{s['study']}: best so far" if len(group) > 1 else "best so far",
                     "x": xs, "y": ys, "hoverinfo": "skip", "line": {"shape": "hv", "color": _COLOURS[i % len(_COLOURS)]}})
    points, note = _teacher_points(group, [metric])
    data += _teacher_traces(points, x=[min(xs_all), max(xs_all)] if xs_all else [0, 1])
    fig = {"data": data, "layout": {**_layout(f"{_axis(metric).short} per trial", "trial number", _axis_title(metric, direction, res)),
                                    **_toggle(grey)}}
    return fig, note


def _parcoords(group, rows_of, metrics: list[str], directions: list[str]) -> tuple[dict[str, Any], str]:
    """The feasible trials across all objectives; one study: front members dark, the rest light; several:
    a colour per study. The teacher is a gold line where it has every objective's figure."""
    vals: list[list[float]] = [[] for _ in metrics]
    colour: list[float] = []
    many = len(group) > 1
    for i, (_, s) in enumerate(group):
        front = {r["trial"] for r in s["front"]}
        for r in rows_of[s["study"]]["feasible"]:
            xs = [_scaled(m, r.get(m)) for m in metrics]
            if any(x is None for x in xs):
                continue
            for col, x in zip(vals, xs):
                col.append(x)
            colour.append(i if many else (1 if r["trial"] in front else 0))
    levels = [_COLOURS[i % len(_COLOURS)] for i in range(len(group))] if many else ["#a6c8e8", _COLOURS[0]]
    points, _ = _teacher_points(group, metrics)
    for _, p, _ in points[:1]:
        for col, x in zip(vals, p):
            col.append(x)
        colour.append(len(levels))
    levels = levels + [_TEACHER_COLOUR] if points else levels
    n = len(levels)
    # a discrete colour scale: level k fills [k/n, (k+1)/n], the line colour value sits in its middle
    scale = [[b / n, c] for k, c in enumerate(levels) for b in (k, k + 1)]
    dims = [{"label": _unit_label(m) + (" ↓" if d == "minimize" else " ↑"), "values": v} for m, d, v in zip(metrics, directions, vals)]
    fig = {"data": [{"type": "parcoords", "dimensions": dims,
                     "line": {"color": [(c + 0.5) / n for c in colour], "colorscale": scale, "cmin": 0, "cmax": 1}}],
           "layout": {"title": {"text": "feasible trials across all objectives", "x": 0, "xanchor": "left", "font": {"size": 15}},
                      "height": 460, "margin": {"t": 90, "l": 70, "r": 70, "b": 30}}}
    key = (", ".join(f"{s['study']} {_colour_word(i)}" for i, (_, s) in enumerate(group)) if many
           else "light: feasible trials; dark: the Pareto front")
    note = (f"Parallel coordinates (↓ lower is better, ↑ higher is better; units as on the plots below); {key}"
            + ("; gold: the teacher" if points else "") + ". Drag along an axis to select a range. Below, the objectives"
            " pairwise: the Pareto front's members are marked in each pair, where some look dominated (the front is"
            " over all objectives).")
    return fig, note


def _colour_word(i: int) -> str:
    return ("blue", "red", "green", "purple", "orange", "brown", "pink", "cyan")[i % len(_COLOURS)]


def _hv_figure(group, directions: list[str], scale) -> dict[str, Any]:
    data = []
    for i, (study, s) in enumerate(group):
        ser = _hv_series(study, directions, scale)
        data.append({"type": "scatter", "mode": "lines+markers", "name": s["study"], "x": ser["x"], "y": ser["y"],
                     "hovertext": [f"after trial {t}: hypervolume {y:.4f}" for t, y in zip(ser["trial"], ser["y"])],
                     "hoverinfo": "text+name", "line": {"shape": "hv", "color": _COLOURS[i % len(_COLOURS)]},
                     "marker": {"size": 4}})
    lay = _layout("hypervolume of the feasible front as the study grew (normalised as in the table above)",
                  "evaluated trials (in trial-number order)", "hypervolume (higher is better)", 380)
    n = max((max(d["x"]) for d in data if d["x"]), default=1)
    lay["xaxis"].update({"tick0": 0, "dtick": max(1, math.ceil(n / 10))})  # trial counts: whole-number ticks
    return {"data": data, "layout": lay}


def _figures(group, metrics: list[str], directions: list[str], scale) -> list[dict[str, Any]]:
    """The plots of one group of studies sharing their objectives, each ``{"fig", "note", "half"}``:
    ``half`` places it in a two-column grid (the pairwise projections of more than two objectives)."""
    rows_of = {s["study"]: _rows_for(st, s) for st, s in group}
    res = _resolution(group)
    out: list[dict[str, Any]] = []
    if len(metrics) == 1:
        fig, note = _one_objective(group, rows_of, metrics[0], directions[0], res)
        out.append({"fig": fig, "note": note, "half": False})
        _place_labels(fig, _FULL_WIDTH)
        _legend_below(fig, _FULL_WIDTH)
        return out
    if len(metrics) == 2:
        fig, note = _scatter(group, rows_of, metrics[0], metrics[1], (directions[0], directions[1]), res, two=True)
        out.append({"fig": fig, "note": note, "half": False})
    else:
        fig, note = _parcoords(group, rows_of, metrics, directions)
        out.append({"fig": fig, "note": note, "half": False})
        idx = range(len(metrics))
        pairs = list(itertools.combinations(idx, 2)) if len(metrics) <= 4 else [(0, j) for j in idx[1:]]
        notes = set()
        for a, b in pairs:
            fig, note = _scatter(group, rows_of, metrics[a], metrics[b], (directions[a], directions[b]), res, two=False, height=480)
            out.append({"fig": fig, "note": None, "half": True})
            if note:
                notes.add(note)
        if notes:
            out[-1]["note"] = " ".join(sorted(notes))
    out.append({"fig": _hv_figure(group, directions, scale), "note": None, "half": False})
    for p in out:
        if p["fig"]["data"] and p["fig"]["data"][0]["type"] == "scatter":
            _place_labels(p["fig"], _HALF_WIDTH if p["half"] else _FULL_WIDTH)
            _legend_below(p["fig"], _HALF_WIDTH if p["half"] else _FULL_WIDTH)
    return out


def _fidelity_rungs(fid: Any) -> list[int]:
    """The rungs of a study's ``fidelity`` (its dict form, or a :class:`~hybridsd_nas.study.fidelity.Fidelity`)."""
    if fid is None:
        return []
    rungs = fid.get("rungs") if isinstance(fid, dict) else getattr(fid, "rungs", None)
    return list(rungs or [])


def _rung_notes(s: dict[str, Any]) -> list[str]:
    """A multi-fidelity study's scored trials per rung and its rung audit, as HTML; nothing without rungs."""
    fid = s.get("fidelity")
    if not fid:
        return []
    rungs = _fidelity_rungs(fid)
    promote = fid.get("promote") if isinstance(fid, dict) else getattr(fid, "promote", None)
    counts: dict[Any, int] = {}
    for r in s["trials"]:
        if r.get("state") == "COMPLETE" and r.get("status") in SCORED and "duplicate_of" not in r and r.get("rung") is not None:
            counts[r["rung"]] = counts.get(r["rung"], 0) + 1
    order = rungs + sorted((k for k in counts if k not in rungs), key=str)
    per = " · ".join(f"{_esc(k)} steps: {counts.get(k, 0)}" for k in order) or "none yet"
    out = [f"<p class='note'>Trials scored per rung: {per}"
           + (f" (promote {_esc(_g(promote))} of each rung)" if _num(promote) else "") + ".</p>"]
    a = s.get("audit")
    if not a:
        return out
    metric = f" of {_esc(a['metric'])}" if a.get("metric") else ""
    if not a.get("possible"):
        out.append(f"<p class='note'>Rung audit{metric}: not possible: {_esc(str(a.get('reason') or 'no reason recorded').rstrip('.'))}.</p>")
        return out
    tau, iv = a.get("kendall_tau"), a.get("tau_interval_90")
    rungs_txt = (f" between {_esc(a['first_rung'])} and {_esc(a['highest_rung'])} steps"
                 if a.get("first_rung") is not None and a.get("highest_rung") is not None else "")
    parts = [f"Kendall tau {_g(tau) if _num(tau) else 'undefined'}"
             + (f" (90% interval {_g(iv[0])} to {_g(iv[1])})" if iv and len(iv) == 2 and all(_num(v) for v in iv) else "")]
    if _num(a.get("top_k_recall")):
        parts.append(f"top-{_esc(a.get('top_k'))} recall {_g(a['top_k_recall'])}")
    parts.append(f"over n = {_esc(a.get('n'))} candidates scored at both")
    out.append(f"<p>Rung audit{metric}{rungs_txt}: {', '.join(parts)}.</p>")
    if a.get("warning"):
        out.append(f"<div class='warn'><b>Warning:</b> {_esc(str(a['warning']).rstrip('.'))}.</div>")
    return out


def _figures_of(row: dict[str, Any]) -> list[str]:
    """The metrics ``row`` has a figure of. A row's ``params`` is the trial's sampled parameters (a
    dict) where the trial has no parameter count, so a figure is a number, not a key that is there."""
    return [m for m in METRICS if _num(row.get(m))]


def _metric_cols(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in METRICS if any(_num(r.get(m)) for r in rows)]


def _table(rows: list[dict[str, Any]], rungs: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """A table of trial rows: candidate (its key the tooltip), trial, rung (a multi-fidelity study),
    ``extra`` columns, then every figure the rows have, in its axis unit."""
    ms = _metric_cols(rows)
    head = (["<th class='l'>candidate</th>", "<th>trial</th>"] + (["<th>rung (steps)</th>"] if rungs else [])
            + [f"<th class='l'>{_esc(c)}</th>" for c in extra]
            + [f"<th title='{_esc(_axis_title(m, None))}'>{_esc(_unit_label(m))}</th>" for m in ms])
    out = ["<table><tr>" + "".join(head) + "</tr>"]
    for r in rows:
        cells = [_label_cell(r), f"<td>{_esc(r.get('trial'))}</td>"]
        if rungs:
            cells.append(f"<td>{_esc(_rung(r) if _rung(r) is not None else '')}</td>")
        cells += [f"<td class='l'>{_esc(r.get(c) if r.get(c) is not None else '')}</td>" for c in extra]
        cells += [f"<td>{_esc(_g(_scaled(m, r[m])) if _scaled(m, r.get(m)) is not None else '')}</td>" for m in ms]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _script(div: str, fig: dict[str, Any]) -> str:
    def js(x):  # JSON inside a <script>: a "</" in a label must not close it
        return json.dumps(x, default=float).replace("</", "<\\/")
    return f"Plotly.newPlot({json.dumps(div)}, {js(fig['data'])}, {js(fig['layout'])}, {json.dumps(_PLOT_CONFIG)});"


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
                       " Feasible: complete, within every constraint, one trial per candidate. Candidates are named by the preset"
                       " they match or were enqueued as, else by their structure; hover a name for its candidate key.</p>"]
    plots: list[tuple[str, dict[str, Any]]] = []
    for gi, (key, members) in enumerate(groups.items()):
        metrics, directions = [k[0] for k in key], [k[1] for k in key]
        vals = [t.values for st in members for t in feasible_trials(st)]
        scale = normaliser(np.array(vals), directions) if vals else None
        summ = [(st, summarize(st, scale=scale)) for st in members]
        body.append("<h2>Objectives: " + ", ".join(f"{_esc(_axis(m).title)} <code>{_esc(m)}</code> ({_esc(d)})" for m, d in key)
                    + "</h2>")
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
        in_pairs = False
        for fi, p in enumerate(_figures(summ, metrics, directions, scale)):
            if p["half"] != in_pairs:
                body.append("<div class='pairs'>" if p["half"] else "</div>")
                in_pairs = p["half"]
            div = f"plot-{gi}-{fi}"
            body.append(f"<div id='{div}' class='plot' style='width:100%;height:{p['fig']['layout'].get('height', 480)}px'></div>")
            plots.append((div, p["fig"]))
            if p["note"]:
                if in_pairs:
                    body.append("</div>")
                    in_pairs = False
                body.append(f"<p class='note'>{_esc(p['note'])}</p>")
        if in_pairs:
            body.append("</div>")
        for st, s in summ:
            rungs = bool(s.get("fidelity"))
            body.append(f"<h3>{_esc(s['study'])}: Pareto front ({len(s['front'])} trial{'' if len(s['front']) == 1 else 's'})</h3>")
            body += _table(s["front"], rungs)
            body += _rung_notes(s)
            shown = [r for r in s["trials"] if r.get("status") not in (None, TrialStatus.SURPLUS)]
            body.append(f"<details><summary>all {len(shown)} trials of {_esc(s['study'])} (status, reason, figures)</summary>")
            body += _table(shown, rungs, extra=("status", "reason"))
            body.append("</details>")
            for r in s["front"]:
                img = _grid_img(st, r.get("sample_grid_artifact"))
                cand = _esc(json.dumps(r.get("candidate"), sort_keys=True))
                inner = (f"<div class='grid'><img alt='samples of trial {r['trial']}' src='{img}'></div>" if img
                         else "<p class='note'>no samples stored</p>")
                key_ = f" <span class='key'>{_esc(r['candidate_key'])}</span>" if r.get("candidate_key") else ""
                body.append(f"<details><summary><b>{_esc(_label(r))}</b> (trial {r['trial']}): samples and candidate{key_}</summary>"
                            f"{inner}<p><code>{cand}</code></p></details>")
    script = "\n".join(_script(div, fig) for div, fig in plots)
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
