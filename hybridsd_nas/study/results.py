"""What a study found: trials as rows, the Pareto front, and its hypervolume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np
import optuna
from optuna.trial import TrialState

from hybridsd_nas.arch import Candidate
from hybridsd_nas.core.errors import HybridSDError

from .config import StudyConfig
from .metrics import METRICS
from .rungs import PROMOTION_OF, RUNG, fidelity_of, highest_rung_trials, study_audit
from .status import TrialStatus, evaluated

HV_NOTE = ("hypervolume of the objectives min-max normalised over the trials compared (best 0, worst 1, "
           "maximised ones flipped), against the reference point 1.1 in every objective")


def format_value(v: Any, unit_sep: str = "") -> str:
    """A figure for tables: floats to 4 significant digits, large integers in millions."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10**6:
        return f"{v / 1e6:.3f}{unit_sep}M"
    return "" if v is None else str(v)


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """One complete trial per candidate that keeps every constraint (reused duplicates left out); in a
    multi-fidelity study, the candidate's trial at the highest rung it reached, feasible there."""
    fid = fidelity_of(study.user_attrs.get("config"))
    out = []
    for t in highest_rung_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), fid):
        if t.user_attrs.get("status") != TrialStatus.OK:
            continue
        if t.values is None or not all(math.isfinite(v) for v in t.values):
            continue
        out.append(t)
    return out


def _minimise(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return values * sign


def nondominated(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows (first of identical rows kept)."""
    if len(values) == 0:
        return np.zeros(0, bool)
    return np.asarray(moocore.is_nondominated(_minimise(np.asarray(values, float), directions), keep_weakly=False))


def pareto_front(study: optuna.Study, cfg: StudyConfig | None = None) -> list[optuna.trial.FrozenTrial]:
    trials = feasible_trials(study)
    if not trials:
        return []
    directions = [d.name.lower() for d in study.directions]
    mask = nondominated(np.array([t.values for t in trials]), directions)
    return sorted([t for t, m in zip(trials, mask) if m], key=lambda t: t.values[0])


def normaliser(values: np.ndarray, directions: Sequence[str]):
    """Min-max normalisation to minimisation in [0, 1] over the given rows (all compared trials)."""
    v = _minimise(np.asarray(values, float), directions)
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return lambda x: (_minimise(np.asarray(x, float), directions) - lo) / span


def hypervolume(points: np.ndarray, directions: Sequence[str], scale=None, ref: float = 1.1) -> float:
    """Hypervolume of ``points`` (raw objective values). ``scale`` is a :func:`normaliser`; by
    default the points' own range. See :data:`HV_NOTE`."""
    pts = np.asarray(points, float)
    if len(pts) == 0:
        return 0.0
    scale = scale or normaliser(pts, directions)
    z = scale(pts)
    z = z[np.all(z < ref, axis=1)]
    if len(z) == 0:
        return 0.0
    return float(moocore.hypervolume(z, ref=np.full(z.shape[1], ref)))


def candidate_label(ua: dict[str, Any]) -> str | None:
    """A readable name of a trial's candidate: its ``label`` attribute (the preset it matches, else its
    structure), else the preset it was enqueued as, else the structure of its stored candidate."""
    if ua.get("label"):
        return ua["label"]
    if ua.get("enqueued_as"):
        return ua["enqueued_as"]
    if ua.get("candidate") is not None:
        try:
            return Candidate.from_dict(ua["candidate"]).label
        except HybridSDError:
            return None
    return None


def trial_row(t: optuna.trial.FrozenTrial, cfg_objectives: Sequence[str] | None = None) -> dict[str, Any]:
    """One trial as a flat row: its number, state, status and reason, the candidate (``label``, key,
    the sampler's ``choices``), every metric it recorded, and ``rung``: the distillation steps its
    quality figures come from (None where it has none, or the study has no rungs)."""
    ua = t.user_attrs
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "status": ua.get("status"), "reason": ua.get("reason"),
                           "candidate_key": ua.get("candidate_key"), "label": candidate_label(ua), "choices": dict(t.params),
                           "candidate": ua.get("candidate"), "worker": ua.get("worker"), "rung": ua.get(RUNG)}
    if PROMOTION_OF in ua:
        row[PROMOTION_OF] = ua[PROMOTION_OF]
    for m in METRICS:
        if m in ua:
            row[m] = ua[m]
    for k in ("adherence_teacher", "kid_std", "build", "cost_measured", "latency", "duplicate_of", "enqueued_as", "retry_of", "sample_grid_artifact",
              "schedule", "accounting", "pipeline", "provenance", "resumed_from_step"):
        if k in ua:
            row[k] = ua[k]
    row["timings"] = ua.get("timings", {})
    if t.datetime_start and t.datetime_complete:
        row["wall_seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 3)
    return row


def summarize(study: optuna.Study, scale=None) -> dict[str, Any]:
    """Everything the CLI, the report and the model cards need about one study. In a multi-fidelity
    study the front holds each candidate's highest rung, ``fidelity`` its rungs and ``audit`` the
    proxy audit (:func:`~hybridsd_nas.study.rungs.study_audit`); ``teacher`` holds the teacher's own
    figures where they are known (its cost; 0 for figures measured against it)."""
    cfg = study.user_attrs.get("config", {})
    fid = fidelity_of(cfg)
    directions = [d.name.lower() for d in study.directions]
    names = study.metric_names or [f"objective_{i}" for i in range(len(directions))]
    objectives = [{"metric": n, "direction": d} for n, d in zip(names, directions)]
    trials = study.get_trials(deepcopy=False)
    front = pareto_front(study)
    feas = feasible_trials(study)
    vals = np.array([t.values for t in feas]) if feas else np.zeros((0, len(directions)))
    hv = hypervolume(np.array([t.values for t in front]), directions, scale or (normaliser(vals, directions) if len(vals) else None)) if front else 0.0
    states: dict[str, int] = {}
    for t in trials:
        key = t.user_attrs.get("status") or t.state.name.lower()
        states[key] = states.get(key, 0) + 1
    return {
        "study": study.study_name,
        "objectives": objectives,
        "constraints": cfg.get("constraints", []),
        "config": cfg,
        "counts": {"trials": len(trials), "evaluated": sum(evaluated(t) for t in trials), **states},
        "front": [trial_row(t) for t in front],
        "hypervolume": hv,
        "hypervolume_note": HV_NOTE if scale is None else HV_NOTE.replace("the trials compared", "the trials of all compared studies"),
        "fidelity": fid.to_dict() if fid is not None else None,
        "audit": study_audit(trials, fid, objectives) if fid is not None else None,
        "teacher": study.user_attrs.get("teacher_figures"),
        "trials": [trial_row(t) for t in trials],
    }
