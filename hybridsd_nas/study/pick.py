"""One model for a device budget: the evaluated candidates of finished studies, pooled, kept when
they meet every budget (``pipeline_latency_ms<=800``), optionally measured again on the device, and
the best by the studies' quality objective exported with its model card and ``pick.json``.

Candidates are each study's scored trials that keep its own constraints, a candidate once, at the
highest rung it reached (:func:`~hybridsd_nas.study.results.feasible_trials`). A budget's figure is
the one the trial recorded; where it did not record it, one computed without weights from the
candidate: params and MACs (the study's resolution and batch), ``peak_memory_mb`` (predicted, the
study's request), ``latency_ms`` and ``pipeline_latency_ms`` from a lookup table. The quality
objective is each study's first objective that is not a cost (a quality figure, else a zero-cost
one); ties go to the fewer MACs, then the fewer params, then the earlier study and trial.

With a device to verify on, the feasible candidates that no other dominates (on the quality
objective and the budgets' figures) are measured there: the budgets' ``latency_ms``,
``pipeline_latency_ms`` and ``peak_memory_mb`` (with no budget on any of them, the last two, for the
record); a candidate whose measured figure breaks a budget is dropped. This repeats, front by front,
until the best remaining candidate has been measured.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from hybridsd_nas.arch import Candidate, UNetArch, describe
from hybridsd_nas.core.errors import BudgetError, ConfigError, HybridSDError
from hybridsd_nas.cost import default_resolution, estimate_cost, open_table
from hybridsd_nas.cost.request import PipelineCost, Request, default_request, schedule_runs
from hybridsd_nas.export import export_candidate

from .metrics import METRICS, metrics_in
from .outputs import export_extra, model_card
from .results import feasible_trials, nondominated, summarize, trial_row

BUDGET_FORMS = ("METRIC<=V", "METRIC<V", "METRIC>=V", "METRIC>V")
_BUDGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([^\s<>=]+)\s*$")
WEIGHT_FREE = ("params", "macs", "macs_conv_linear", "peak_memory_mb")  # computable from any candidate
WITH_TABLE = ("latency_ms", "pipeline_latency_ms")  # computable with a lookup table
MEASURED = ("pipeline_latency_ms", "peak_memory_mb")  # the whole request's figures, measured on a device
DEVICE_FIGURES = ("latency_ms", *MEASURED)  # what a verification measures again, where a budget names it


@dataclass(frozen=True)
class Budget:
    """``metric op value``: ``op`` one of ``<=``, ``<``, ``>=``, ``>``."""

    metric: str
    op: str
    value: float

    @property
    def upper(self) -> bool:
        return self.op in ("<=", "<")

    def holds(self, v: float) -> bool:
        return {"<=": v <= self.value, "<": v < self.value, ">=": v >= self.value, ">": v > self.value}[self.op]

    def miss(self, v: float) -> float:
        """How far ``v`` lies outside the budget, relative to its bound (0 within, or on a strict bound)."""
        d = v - self.value if self.upper else self.value - v
        return max(d, 0.0) / (abs(self.value) or 1.0)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_budget(text: str) -> Budget:
    """``METRIC<=V`` (or ``<``, ``>=``, ``>``) for a registered metric; anything else is a one-line
    :class:`BudgetError` naming the valid forms or metrics."""
    m = _BUDGET.match(text or "")
    if m is None:
        raise BudgetError(f"budget {text!r} is not one of the forms {', '.join(BUDGET_FORMS)} (e.g. pipeline_latency_ms<=800)")
    metric, op, raw = m.groups()
    if metric not in METRICS:
        raise BudgetError(f"budget {text!r}: {metric!r} is not a metric; known: {', '.join(METRICS.names())}")
    try:
        value = float(raw)
    except ValueError:
        raise BudgetError(f"budget {text!r}: {raw!r} is not a number (forms: {', '.join(BUDGET_FORMS)})") from None
    if not math.isfinite(value):
        raise BudgetError(f"budget {text!r}: the bound must be a finite number")
    b = Budget(metric, op, value)
    if METRICS.get(metric).pipeline and (value <= 0 if b.upper else value < 0):
        raise BudgetError(f"budget {text!r}: {metric} is a time or a size, so an upper bound must be > 0")
    return b


@dataclass
class Entry:
    """A candidate of the pool: its study, its trial's row, the figures the budgets and the ranking read
    (``computed``: those found without the trial), and what a verification measured."""

    study: str
    order: int
    row: dict[str, Any]
    figures: dict[str, float]
    computed: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, float] | None = None
    measured_how: dict[str, Any] | None = None
    dropped: str | None = None

    @property
    def name(self) -> str:
        return f"trial {self.row['trial']} ({self.row.get('label') or self.row.get('candidate_key')}) of study {self.study}"

    def value(self, metric: str) -> float:
        """The figure a budget reads: the measured one where the candidate was measured."""
        if self.measured is not None and metric in self.measured:
            return self.measured[metric]
        return self.figures[metric]

    def to_dict(self, budgets: Sequence[Budget], quality: str) -> dict[str, Any]:
        r = self.row
        out = {"study": self.study, "trial": r["trial"], "label": r.get("label"), "candidate_key": r.get("candidate_key"),
               "rung": r.get("rung"), quality: self.figures.get(quality),
               "budgets": {str(b): {"value": self.value(b.metric), "holds": b.holds(self.value(b.metric)),
                                    "from": _source(self, b.metric)} for b in budgets}}
        if r.get("schedule"):
            out["schedule"] = r["schedule"]
        if self.computed:
            out["computed"] = self.computed
        if self.measured is not None:
            out["measured"] = self.measured
            out["measured_how"] = self.measured_how
        if self.dropped:
            out["dropped"] = self.dropped
        return out


def _source(e: Entry, metric: str) -> str:
    if e.measured is not None and metric in e.measured:
        return "measured"
    return "computed" if metric in e.computed.get("figures", {}) else "recorded"


def quality_objective(summary: dict[str, Any]) -> dict[str, str]:
    """A study's first objective that is not a cost: a quality figure, else a zero-cost one."""
    objs = summary["objectives"]
    for group in ("quality", "zero_cost"):
        for o in objs:
            if o["metric"] in METRICS and METRICS.get(o["metric"]).group == group:
                return o
    raise ConfigError(f"study {summary['study']!r} has no quality objective to rank by (objectives: "
                      f"{', '.join(o['metric'] for o in objs)}); pick needs one such as {', '.join(metrics_in('quality')[:3])}")


def request_of(config: dict[str, Any]) -> Request:
    """The whole request of a study's stored config (its ``pipeline:``; the teacher's defaults)."""
    spec = config.get("pipeline") or {}
    return default_request(config["teacher"], spec.get("steps"), spec.get("guidance"),
                           spec.get("resolution") or config.get("resolution"), spec.get("images") or 1)


class _Figures:
    """Figures of one study's candidates computed without its trials: weight-free, or measured on a device."""

    def __init__(self, config: dict[str, Any], table: str | None = None, device: str | None = None):
        self.cfg, self.device = config, device
        self.teacher = config["teacher"]
        self._arch: UNetArch | None = None
        spec = config.get("pipeline") or {}
        own = spec.get("table") or (config.get("latency_table") if config.get("latency_mode") == "lut" else None)
        self.table = table or (own if own and Path(own).is_file() else None)
        self._pipeline: PipelineCost | None = None
        self._lut = None

    @property
    def arch(self) -> UNetArch:  # read only when something is computed
        if self._arch is None:
            self._arch = describe(self.teacher)
        return self._arch

    def can(self, metric: str) -> bool:
        return metric in WEIGHT_FREE or (metric in WITH_TABLE and self.table is not None)

    def pipeline(self) -> PipelineCost:
        if self._pipeline is None:
            dtype = self.cfg.get("latency_dtype")
            if self.device is not None:  # measured on the device, whatever the study used
                self._pipeline = PipelineCost(self.teacher, request_of(self.cfg), latency="measure", device=self.device,
                                              dtype=dtype, memory="measure", arch=self.arch)
            else:
                self._pipeline = PipelineCost(self.teacher, request_of(self.cfg), latency="lut" if self.table else "off",
                                              device=self.cfg.get("latency_device") or "cpu", dtype=dtype, table=self.table,
                                              arch=self.arch)
        return self._pipeline

    def __call__(self, row: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
        """``metrics`` of the candidate of ``row`` and, under ``record``, how the whole request's were found."""
        cand = Candidate.from_dict(row["candidate"])
        out: dict[str, Any] = {}
        c = self.cfg
        if any(m in ("params", "macs", "macs_conv_linear", "latency_ms") for m in metrics):
            lat = "latency_ms" in metrics
            if lat and self.device is None and self._lut is None:
                self._lut = open_table(self.table, resolution=c.get("resolution") or default_resolution(self.teacher, self.arch),
                                       dtype=c.get("latency_dtype"), batch=c.get("batch") or 1)
            r = estimate_cost(self.teacher, cand, resolution=c.get("resolution"), batch=c.get("batch") or 1, arch=self.arch,
                              latency=("measure" if self.device else "lut") if lat else "off", device=self.device or "cpu",
                              dtype=c.get("latency_dtype"), lut=self._lut)
            out.update({k: getattr(r, k) for k in ("params", "macs", "macs_conv_linear") if k in metrics})
            if lat:
                out["latency_ms"] = float(r.latency_ms)
        whole = [m for m in MEASURED if m in metrics]
        if whole:
            pc = self.pipeline()
            f = pc.figures(schedule_runs(cand, row.get("schedule"), pc.request.steps), whole)
            out["record"] = f.pop("record")
            out.update(f)
        return out


@dataclass
class Pick:
    """What :func:`pick` found: every candidate in rank order, the chosen one (None: none meets every budget)."""

    quality: dict[str, str]
    budgets: list[Budget]
    entries: list[Entry]
    feasible: list[Entry]
    chosen: Entry | None
    summaries: dict[str, dict[str, Any]]
    verify_on: str | None = None
    dropped: list[str] = field(default_factory=list)

    def nearest_miss(self) -> str:
        """One line: no candidate meets every budget, and the one that misses least (by its worst relative miss)."""
        studies = ", ".join(self.summaries)
        if not self.entries:
            return f"no evaluated candidate in study {studies} keeps its own constraints: nothing to pick from"
        worst = [(max((b.miss(e.value(b.metric)) for b in self.budgets), default=0.0), i) for i, e in enumerate(self.entries)]
        e = self.entries[min(worst)[1]]
        where = f" measured on {self.verify_on}" if e.measured is not None else ""
        misses = [f"{b.metric} = {e.value(b.metric):.4g}{where if b.metric in (e.measured or {}) else ''} misses {b} by "
                  f"{100 * b.miss(e.value(b.metric)):.1f}%" for b in self.budgets if not b.holds(e.value(b.metric))]
        return (f"no candidate of {len(self.entries)} in study {studies} meets every budget "
                f"({', '.join(map(str, self.budgets))}); nearest miss: {e.name}: {'; '.join(misses)}")

    def to_dict(self) -> dict[str, Any]:
        q = self.quality["metric"]
        return {"studies": list(self.summaries), "quality": self.quality, "budgets": [str(b) for b in self.budgets],
                "candidates": len(self.entries), "feasible": len(self.feasible),
                "chosen": None if self.chosen is None else {**self.chosen.to_dict(self.budgets, q),
                                                            "candidate": self.chosen.row.get("candidate"),
                                                            "figures": {m: self.chosen.row[m] for m in METRICS if m in self.chosen.row}},
                "runners_up": [e.to_dict(self.budgets, q) for e in self.feasible if e is not self.chosen],
                "verification": None if self.verify_on is None else {
                    "device": self.verify_on, "dropped": self.dropped,
                    "measured": [e.to_dict(self.budgets, q) for e in self.entries if e.measured is not None]},
                "requests": {name: _request_dict(s["config"]) for name, s in self.summaries.items()},
                "ranking": f"{self.quality['direction']} {q}; ties: fewer macs, then fewer params, then study and trial order"}


def _request_dict(config: dict[str, Any]) -> dict[str, Any] | None:
    """The whole request a study's ``pipeline_latency_ms`` and ``peak_memory_mb`` are figures of (None: its
    teacher is no pipeline)."""
    try:
        return request_of(config).to_dict()
    except HybridSDError:
        return None


def _rank_key(e: Entry, quality: dict[str, str]) -> tuple:
    v = e.figures[quality["metric"]]
    sign = 1.0 if quality["direction"] == "minimize" else -1.0
    return (sign * v, e.figures.get("macs", math.inf), e.figures.get("params", math.inf), e.order, e.row["trial"])


def _front(entries: Sequence[Entry], quality: dict[str, str], budgets: Sequence[Budget]) -> list[Entry]:
    """The entries no other one dominates on the quality objective and the budgets' figures."""
    metrics = [quality["metric"]] + list(dict.fromkeys(b.metric for b in budgets))
    directions = [quality["direction"]] + ["minimize" if next(b for b in budgets if b.metric == m).upper else "maximize"
                                           for m in metrics[1:]]
    mask = nondominated(np.array([[e.figures[m] for m in metrics] for e in entries], float), directions)
    return [e for e, keep in zip(entries, mask) if keep]


def pick(studies: Sequence[optuna.Study], budgets: Sequence[Budget], verify_on: str | None = None, table: str | None = None,
         on_verify: Callable[[Entry], None] | None = None) -> Pick:
    """The best candidate of ``studies`` within ``budgets`` (see the module docstring); ``table``: a lookup
    table for the latency figures the trials did not record; ``verify_on``: the device to measure the
    feasible front on; ``on_verify`` is called with each candidate measured."""
    names = [s.study_name for s in studies]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {next(n for n in names if names.count(n) > 1)!r} is given twice")
    summaries = {s.study_name: summarize(s) for s in studies}
    quality = {n: quality_objective(s) for n, s in summaries.items()}
    first = next(iter(quality.values()))
    if any((q["metric"], q["direction"]) != (first["metric"], first["direction"]) for q in quality.values()):
        raise ConfigError("the studies rank by different quality objectives ("
                          + ", ".join(f"{n}: {q['direction']} {q['metric']}" for n, q in quality.items())
                          + "); pick pools studies of one quality objective")
    need = list(dict.fromkeys([first["metric"]] + [b.metric for b in budgets]))
    pools = []
    for s in studies:  # every figure recorded or computable, checked before anything is computed
        rows = [trial_row(t) for t in feasible_trials(s)]
        calc = _Figures(summaries[s.study_name]["config"], table)
        for m in sorted({m for m in need for r in rows if r.get(m) is None}):
            if m == first["metric"] or not calc.can(m):
                hint = ("give --table FILE, a lookup table built for the study's settings" if m in WITH_TABLE else
                        f"computable without weights: {', '.join(WEIGHT_FREE)}, and with --table FILE {', '.join(WITH_TABLE)}")
                raise ConfigError(f"study {s.study_name!r} did not record {m} for every candidate, and pick cannot compute it "
                                  f"here; {hint}")
        pools.append((s.study_name, rows, calc))
    entries: list[Entry] = []
    for order, (name, rows, calc) in enumerate(pools):
        for r in rows:
            todo = [m for m in need if r.get(m) is None]
            figs = {m: float(r[m]) for m in need if r.get(m) is not None}
            if "macs" in r and r["macs"] is not None:
                figs.setdefault("macs", float(r["macs"]))
            if "params" in r and r["params"] is not None:
                figs.setdefault("params", float(r["params"]))
            computed: dict[str, Any] = {}
            if todo:
                try:
                    got = calc(r, todo)
                except HybridSDError as e:
                    raise ConfigError(f"study {name!r}, trial {r['trial']}: {e}") from None
                computed = {"figures": {m: got[m] for m in todo}, **({"pipeline": got["record"]} if "record" in got else {})}
                figs.update({m: float(got[m]) for m in todo})
            entries.append(Entry(name, order, r, figs, computed))
    entries.sort(key=lambda e: _rank_key(e, first))
    feasible = [e for e in entries if all(b.holds(e.figures[b.metric]) for b in budgets)]
    result = Pick(first, list(budgets), entries, feasible, None, summaries, verify_on)
    if verify_on is None:
        result.chosen = feasible[0] if feasible else None
        return result
    devices: dict[str, _Figures] = {}
    # the budgets' figures a device measures; with none among them, the whole request's, for the record
    metrics = [m for m in dict.fromkeys(b.metric for b in budgets) if m in DEVICE_FIGURES] or list(MEASURED)
    while True:
        alive = [e for e in feasible if e.dropped is None]
        if not alive or alive[0].measured is not None:
            break
        todo = [e for e in _front([e for e in alive if e.measured is None], first, budgets) if e.measured is None]
        if alive[0] not in todo:
            todo.insert(0, alive[0])
        for e in todo:
            calc = devices.setdefault(e.study, _Figures(summaries[e.study]["config"], device=verify_on))
            got = calc(e.row, metrics)
            e.measured = {m: float(got[m]) for m in metrics}
            e.measured_how = got.get("record")
            broken = [b for b in budgets if b.metric in e.measured and not b.holds(e.measured[b.metric])]
            if broken:
                e.dropped = "; ".join(f"{b.metric} = {e.measured[b.metric]:.4g} measured on {verify_on} misses {b} by "
                                      f"{100 * b.miss(e.measured[b.metric]):.1f}%" for b in broken)
                result.dropped.append(f"{e.name}: {e.dropped}")
            if on_verify is not None:
                on_verify(e)
    alive = [e for e in feasible if e.dropped is None]
    result.chosen = alive[0] if alive else None
    return result


def _pick_md(p: Pick) -> str:
    e = p.chosen
    rows = "\n".join(f"| {b} | {e.value(b.metric):.6g} | {_source(e, b.metric)} |" for b in p.budgets)
    ver = f"\nMeasured again on `{p.verify_on}` before choosing; dropped there: {len(p.dropped)}.\n" if p.verify_on else ""
    return (f"\n## Picked for a device budget\n\nThe best by {p.quality['direction']} {p.quality['metric']} "
            f"({e.figures[p.quality['metric']]:.6g}) of {len(p.feasible)} candidates within every budget, out of "
            f"{len(p.entries)} of study {', '.join(p.summaries)} (`pick.json`).\n\n| budget | value | from |\n|---|---|---|\n{rows}\n{ver}")


def export_pick(p: Pick, out: str | Path, device: str = "cpu", overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Export the chosen candidate's U-Net with its model card (a section on the pick added) and write
    ``pick.json`` beside it; returns the folder and the pick's JSON."""
    if p.chosen is None:
        raise HybridSDError("nothing was picked")
    e, summary = p.chosen, p.summaries[p.chosen.study]
    cfg = summary["config"]
    data = p.to_dict()
    extra = {**export_extra(e.row, summary), "pick": {"budgets": data["budgets"], "quality": p.quality, "verify_on": p.verify_on}}
    path, cost = export_candidate(cfg["teacher"], e.row["candidate"], out, base=cfg.get("base"), device=device, extra=extra,
                                  overwrite=overwrite, card=lambda c: model_card(e.row, summary, c) + _pick_md(p))
    data["out"] = str(path)
    (Path(path) / "pick.json").write_text(json.dumps(data, indent=1, default=str))
    return Path(path), data
