"""Calibration of a latency table against whole candidates measured on its device.

A table predicts a candidate as the sum of its units, each timed standalone, plus the teacher's
overhead (:mod:`hybridsd_nas.cost.lut`). What the sum misses varies with the candidate: on a GPU at
batch 1 the forward is bound by kernel dispatch, which grows with the number of units and not with
their standalone time; on a CPU, caches and thread scheduling inside a whole forward differ from a
unit timed alone. Calibration measures K >= :data:`MIN_CANDIDATES` whole candidates on the device
with the table's own statistic and fits

    latency_ms = intercept + a * units_ms + b * n_units

by least squares (``units_ms``: the sum of the candidate's units in the table, ``n_units``: how many
there are). With fewer than :data:`COUNT_TERM_FROM` candidates the ``n_units`` term is left out
(an affine map of the sum), so that the fit keeps residual degrees of freedom. The fit, the measured
points and each point's leave-one-out error are stored in the table (key ``calibration``, per
teacher), and predictions from it apply the correction wherever the table is read.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hybridsd_nas.arch import Candidate, UNetArch, describe, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.cost.inputs import unet_inputs
from hybridsd_nas.cost.lut import LatencyTable, apply_calibration, base_key, calibration_features
from hybridsd_nas.sources import vae_scale_factor

MIN_CANDIDATES = 5
COUNT_TERM_FROM = 8  # candidates from which the n_units term is fitted too


@dataclass
class CalibrationPoint:
    """One whole candidate measured on the device, beside what the table sums for it."""

    candidate: str
    candidate_key: str
    measured_ms: float
    units_ms: float
    n_units: int
    uncalibrated_ms: float  # units_ms + the teacher's overhead: the table's prediction without calibration


def terms_for(points: Sequence[CalibrationPoint]) -> list[str]:
    """The terms fitted besides the intercept: the count only from :data:`COUNT_TERM_FROM` points, and only
    when the counts differ (else it is not identifiable)."""
    if len(points) >= COUNT_TERM_FROM and len({p.n_units for p in points}) > 1:
        return ["units_ms", "n_units"]
    return ["units_ms"]


def fit(points: Sequence[CalibrationPoint], terms: Sequence[str] | None = None) -> dict[str, Any]:
    """Least-squares correction over ``points``: ``{"terms", "coef"}`` (``coef`` by name, ``intercept`` first);
    ``terms`` default to :func:`terms_for` the points."""
    if len(points) < 2:
        raise ConfigError(f"a calibration needs at least 2 measured candidates to fit, got {len(points)}")
    terms = list(terms or terms_for(points))
    x = np.array([calibration_features(p.units_ms, p.n_units, terms) for p in points])
    y = np.array([p.measured_ms for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"terms": terms, "coef": {"intercept": float(coef[0]), **{t: float(c) for t, c in zip(terms, coef[1:])}}}


def leave_one_out(points: Sequence[CalibrationPoint]) -> list[float]:
    """Each point's signed error in % when the correction (the terms the whole set fits) is fitted on the others."""
    terms, errs = terms_for(points), []
    for i, p in enumerate(points):
        cal = fit([q for j, q in enumerate(points) if j != i], terms)
        errs.append((apply_calibration(cal, p.units_ms, p.n_units) - p.measured_ms) / p.measured_ms * 100)
    return errs


def summarize(errors_pct: Iterable[float]) -> dict[str, float]:
    e = np.abs(np.asarray(list(errors_pct), dtype=float))
    return {"mean_abs_pct": round(float(e.mean()), 3), "max_abs_pct": round(float(e.max()), 3)} if e.size else {}


def measure_points(teacher: Any, candidates: Iterable[Candidate | str | None], table: LatencyTable, arch: UNetArch | None = None,
                   text_len: int = 77, progress: bool = False) -> list[CalibrationPoint]:
    """Measure each candidate's whole forward on the table's device (the table's statistic and re-measure
    rule) and read its unit sum from the table (units it lacks are timed and added)."""
    if table.portable or table.device is None:
        raise ConfigError(f"latency table {table.path} was opened to read; calibrate it on its device: hybridsd-nas lut calibrate "
                          f"--table {table.path} --device DEVICE")
    arch = arch or describe(teacher)
    vs = vae_scale_factor(teacher)
    bkey = base_key(arch)
    base = lambda: build_student(plan(arch, Candidate()))  # noqa: E731 - built only when the table lacks the overhead
    points = []
    for cand in tqdm(list(candidates), desc="measuring candidates", disable=not progress, leave=False):
        c = resolve_candidate(cand, arch)
        p = plan(arch, c)
        model = build_student(p)
        inputs = unet_inputs(model.config if p.expressible else arch.config, table.resolution, table.batch, text_len, vs)
        pred = table.predict(model, inputs, bkey, base_model=base, progress=progress, calibrated=False)
        whole = table.time_forward(model, inputs)
        points.append(CalibrationPoint(c.label, c.key, whole["ms"], pred["units_ms"], pred["n_units"], pred["latency_ms"]))
    return points


def calibration_record(points: Sequence[CalibrationPoint], statistic: str | None) -> dict[str, Any]:
    """What a table stores for a teacher: the fit over ``points``, the points with their leave-one-out and
    uncalibrated errors, and both errors' summaries."""
    loo = leave_one_out(points)
    raw = [(p.uncalibrated_ms - p.measured_ms) / p.measured_ms * 100 for p in points]
    cal = fit(points)
    cal["model"] = "latency_ms = intercept + " + " + ".join(f"coef[{t}] * {t}" for t in cal["terms"])
    cal.update({
        "candidates": len(points),
        "statistic": statistic,
        "points": [{**asdict(p), "loo_error_pct": round(e, 3), "uncalibrated_error_pct": round(r, 3)}
                   for p, e, r in zip(points, loo, raw)],
        "loo": summarize(loo),
        "uncalibrated": summarize(raw),
        "fitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return cal


def calibrate(teacher: Any, candidates: Sequence[Candidate | str | None], table: LatencyTable, arch: UNetArch | None = None,
              text_len: int = 77, progress: bool = False) -> dict[str, Any]:
    """Measure ``candidates`` (at least :data:`MIN_CANDIDATES`), fit the correction, store it in ``table``
    for ``teacher`` and return it (with the points and their leave-one-out errors)."""
    if len(candidates) < MIN_CANDIDATES:
        raise ConfigError(f"calibration needs at least {MIN_CANDIDATES} whole candidates measured on the device, got "
                          f"{len(candidates)}; give more --candidate (presets or space samples: --space NAME --count K)")
    arch = arch or describe(teacher)
    cal = calibration_record(measure_points(teacher, candidates, table, arch, text_len, progress), table.meta.get("statistic"))
    table.set_calibration(base_key(arch), cal)
    return cal
