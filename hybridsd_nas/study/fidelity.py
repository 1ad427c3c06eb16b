"""Multi-fidelity studies: which candidates go on to a longer distillation, and whether the short one ranked them well.

A multi-fidelity study scores every candidate at the first rung (a short distillation, e.g. 40 steps)
and continues only the promising ones from their checkpoint to the next rung (e.g. 400 steps), where
they are scored again. "Promising" is the best fraction ``promote`` of the feasible candidates that
have finished a rung so far, by non-dominated sorting of the study's objectives: asynchronous, as
trials arrive (ASHA-style successive halving), and a promotion is never taken back.

Pure functions on plain values (no Optuna, no torch), so that a study, a replay of recorded runs and
a test all run the same policy:

- :class:`Fidelity`: the rungs and the fraction, validated, with the YAML form ``{rungs: [40, 160, 640],
  promote: 0.3}``;
- :func:`nondominated_ranks`, :func:`crowding_distance`, :func:`selection_order`: the ordering;
- :func:`promotion_candidates`: whom to promote now;
- :func:`audit`: how well the first rung's ranking agreed with the highest rung's on the candidates
  scored at both. The first rung's score is a proxy whose rank fidelity is known to be limited (a
  Kendall tau of about 0.75 against long runs on the candidates it was measured on), so a study
  reports, from its own promoted candidates, whether that held.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from hybridsd_nas.core.errors import ConfigError

FIDELITY_KEYS = ("rungs", "promote")
AUDIT_WARN_TAU = 0.6  # below this Kendall tau the first rung's ranking is a weak guide to the highest rung's
AUDIT_MIN_CANDIDATES = 3  # fewer candidates scored at both rungs give no ranking worth a figure
_EPS = 1e-9  # promote * n is a product of floats: 0.07 * 100 (7.000000000000001) must give 7 places, not 8


@dataclass(frozen=True)
class Fidelity:
    """The rungs of a multi-fidelity study (distillation steps at which a candidate is scored,
    strictly increasing) and the fraction of a rung's feasible candidates promoted to the next one.

    Every candidate runs to ``rungs[0]``; a promoted one continues from its checkpoint, so reaching
    ``rungs[i]`` costs ``rungs[i]`` steps in all, not the sum of the rungs."""

    rungs: tuple[int, ...]
    promote: float

    def __post_init__(self) -> None:
        rungs = self.rungs
        if isinstance(rungs, (str, bytes, Mapping)) or not isinstance(rungs, Iterable):
            raise ConfigError(f"fidelity.rungs: must be a list of step counts, positive and strictly increasing "
                              f"(e.g. [40, 160, 640]), got {rungs!r}")
        rungs = tuple(rungs)
        if not rungs:
            raise ConfigError("fidelity.rungs: must hold at least one step count (e.g. [40, 160, 640]), got []")
        out = []
        for i, r in enumerate(rungs):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or isinstance(r, float) and not r.is_integer():
                raise ConfigError(f"fidelity.rungs[{i}]: must be a whole number of distillation steps, got {r!r}")
            if r <= 0:
                raise ConfigError(f"fidelity.rungs[{i}]: must be a positive number of steps, got {r!r}")
            if out and r <= out[-1]:
                raise ConfigError(f"fidelity.rungs: must be strictly increasing, got {list(rungs)!r} "
                                  f"({int(r)} after {out[-1]} at rungs[{i}])")
            out.append(int(r))
        object.__setattr__(self, "rungs", tuple(out))
        p = self.promote
        if isinstance(p, str):  # YAML 1.1 reads 3e-1 (no sign in the exponent) as a string
            try:
                p = float(p)
            except ValueError:
                pass
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p):
            raise ConfigError(f"fidelity.promote: must be a number in (0, 1], the fraction of a rung promoted, got {self.promote!r}")
        if not 0 < p <= 1:
            raise ConfigError(f"fidelity.promote: must be in (0, 1], the fraction of a rung promoted, got {p!r}")
        object.__setattr__(self, "promote", float(p))

    @classmethod
    def from_dict(cls, d: Any, source: str = "fidelity") -> Fidelity:
        """The YAML form ``{rungs: [40, 160, 640], promote: 0.3}``; ``source`` names where it came from in
        the one-line :class:`ConfigError` of a malformed one."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: must be a mapping with keys {', '.join(FIDELITY_KEYS)}, got {type(d).__name__}")
        unknown = sorted(str(k) for k in set(d) - set(FIDELITY_KEYS))
        if unknown:
            raise ConfigError(f"{source}.{unknown[0]}: unknown key; valid keys: {', '.join(FIDELITY_KEYS)}")
        missing = [k for k in FIDELITY_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing key {missing[0]!r}; valid keys: {', '.join(FIDELITY_KEYS)} (all required)")
        try:
            return cls(rungs=d["rungs"], promote=d["promote"])
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(f"{source}{msg[len('fidelity'):]}" if msg.startswith("fidelity") else msg) from None

    def to_dict(self) -> dict[str, Any]:
        return {"rungs": list(self.rungs), "promote": self.promote}

    @property
    def first(self) -> int:
        return self.rungs[0]

    @property
    def highest(self) -> int:
        return self.rungs[-1]

    def budget(self, n_feasible: int) -> int:
        """How many of ``n_feasible`` candidates that finished a rung belong to its best fraction:
        ``ceil(promote * n_feasible)`` (so the first candidate of a rung is always among them)."""
        return promote_budget(self.promote, n_feasible)


def promote_budget(promote: float, n_feasible: int) -> int:
    """``ceil(promote * n_feasible)``, robust to the product's rounding (0.07 * 100 gives 7); 0 for none."""
    if not 0 < promote <= 1:
        raise ConfigError(f"promote: must be in (0, 1], the fraction of a rung promoted, got {promote!r}")
    return 0 if n_feasible <= 0 else min(n_feasible, max(1, math.ceil(promote * n_feasible - _EPS)))


def _minimise_signs(minimize: Sequence[Any] | None, m: int) -> np.ndarray:
    """+1 for a minimised objective, -1 for a maximised one; ``minimize`` holds bools (True: minimise)
    or the study's direction names ("minimize", "maximize"); None minimises every objective."""
    if minimize is None:
        return np.ones(m)
    if isinstance(minimize, (str, bool)):
        minimize = [minimize]
    if len(minimize) != m:
        raise ValueError(f"{len(minimize)} directions given for {m} objectives")
    signs = []
    for d in minimize:
        if isinstance(d, str):
            if d not in ("minimize", "maximize"):
                raise ValueError(f"direction {d!r} is not one of minimize, maximize")
            signs.append(1.0 if d == "minimize" else -1.0)
        else:
            signs.append(1.0 if d else -1.0)
    return np.array(signs)


def _as_points(points: Any) -> np.ndarray:
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"points must be an (n, m) array, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("points must be finite (leave failed or infeasible candidates out before ranking)")
    return p


def nondominated_ranks(points: Any, minimize: Sequence[Any] | None = None) -> np.ndarray:
    """The non-dominated rank of each row of ``points`` (n candidates x m objectives): 0 for the Pareto
    front, 1 for the front of what is left without it, and so on. A row dominates another when it is
    no worse in every objective and better in one; equal rows share a rank. ``minimize``: one bool per
    objective (True: lower is better) or "minimize"/"maximize"; None minimises all. O(n^2 m), meant
    for the tens to few hundreds of candidates of one rung."""
    p = _as_points(points)
    n = len(p)
    if n == 0:
        return np.zeros(0, dtype=int)
    z = p * _minimise_signs(minimize, p.shape[1])
    le = np.all(z[:, None, :] <= z[None, :, :], axis=2)
    lt = np.any(z[:, None, :] < z[None, :, :], axis=2)
    dominates = le & lt  # [i, j]: i dominates j
    count = dominates.sum(axis=0)  # how many rows dominate each row
    ranks = np.full(n, -1, dtype=int)
    front = np.flatnonzero(count == 0)
    r = 0
    while front.size:
        ranks[front] = r
        count = count - dominates[front].sum(axis=0)
        count[ranks >= 0] = -1
        front = np.flatnonzero(count == 0)
        r += 1
    return ranks


def crowding_distance(points: Any) -> np.ndarray:
    """NSGA-II's crowding distance of the rows of one front: per objective, the gap between a row's two
    neighbours divided by the objective's range, summed over objectives. The extremes of an objective
    with a range get infinity (a front's ends are kept); an objective on which the rows are all equal
    adds nothing, so tied rows stay tied; a front of one or two rows is all infinite. The direction of
    an objective does not change it."""
    p = _as_points(points)
    n, m = p.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(p[:, j], kind="stable")
        f = p[order, j]
        span = f[-1] - f[0]
        if span <= 0:
            continue
        d[order[0]] = d[order[-1]] = np.inf
        d[order[1:-1]] += (f[2:] - f[:-2]) / span
    return d


def selection_order(points: Any, minimize: Sequence[Any] | None = None) -> np.ndarray:
    """The row indices of ``points`` from most to least promising: by non-dominated rank (lower first),
    within a rank by crowding distance within that front (larger first: spread along the front is kept
    before crowded points), and a remaining tie by row order (a study passes its candidates in the order
    they finished the rung, so an earlier one goes first). With one objective this is the order of the
    values, ties by row order."""
    p = _as_points(points)
    n = len(p)
    if n == 0:
        return np.zeros(0, dtype=int)
    ranks = nondominated_ranks(p, minimize)
    crowd = np.zeros(n)
    for r in np.unique(ranks):
        idx = np.flatnonzero(ranks == r)
        crowd[idx] = crowding_distance(p[idx])
    # np.lexsort sorts by the last key first; -inf for infinite crowding keeps the ends first
    return np.lexsort((np.arange(n), -crowd, ranks))


def promotion_candidates(scores: Mapping[Hashable, Any], feasible: Mapping[Hashable, bool] | None, promote: float,
                         already: Iterable[Hashable] = (), directions: Sequence[Any] | None = None) -> list[Hashable]:
    """The candidates to promote from a rung now: those of the best ``ceil(promote * n_feasible)``
    feasible candidates of ``scores`` that are not ``already`` promoted, most promising first.

    ``scores`` maps a candidate (any hashable key) to its objective values at this rung (a tuple, or a
    number for one objective), in the order the candidates finished the rung. The feasible ones (those
    ``feasible`` maps to True; with ``feasible`` None, all) with finite values are ordered by
    :func:`selection_order`: non-dominated rank ascending, then crowding distance within the front
    descending, then the order of ``scores``. ``n_feasible`` counts them all, promoted or not: an
    already promoted candidate still holds its place in the best fraction, which is what makes the
    asynchronous policy promote at most about ``promote`` of a rung once enough candidates have
    arrived (and the first one always, as ``ceil`` of anything positive is at least 1). An infeasible
    candidate, one missing from ``feasible`` or one with a NaN or infinite value is never promoted and
    does not count. ``directions``: one bool per objective (True: minimise) or "minimize"/"maximize";
    None minimises all."""
    promote_budget(promote, 1)  # validates promote even when nothing is feasible
    done = set(already)
    keys, rows = [], []
    width = None
    for k, v in scores.items():
        if feasible is not None and not feasible.get(k, False):
            continue
        row = np.atleast_1d(np.asarray(v, dtype=float))
        if width is None:
            width = row.size
        elif row.size != width:
            raise ValueError(f"candidate {k!r} has {row.size} objective values, the others {width}")
        if not np.all(np.isfinite(row)):
            continue
        keys.append(k)
        rows.append(row)
    if not keys:
        return []
    order = selection_order(np.vstack(rows), directions)
    best = [keys[i] for i in order[:promote_budget(promote, len(keys))]]
    return [k for k in best if k not in done]


def _tau_b_many(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b (scipy's default variant) of each row pair of ``x`` and ``y`` (b x n), at once;
    NaN where one side has every pair tied."""
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    iu = np.triu_indices(x.shape[1], 1)
    sx, sy = sx[:, iu[0], iu[1]], sy[:, iu[0], iu[1]]
    s = np.sum(sx * sy, axis=1)
    den = np.sqrt(np.sum(sx != 0, axis=1) * np.sum(sy != 0, axis=1).astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, s / np.where(den > 0, den, 1.0), np.nan)


def _top(values: np.ndarray, k: int, lower_is_better: bool) -> set[int]:
    order = np.argsort(values if lower_is_better else -values, kind="stable")  # a tie: the earlier candidate
    return set(order[:k].tolist())


def audit(first: Mapping[Hashable, float], highest: Mapping[Hashable, float], lower_is_better: bool = True, k: int = 3,
          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How well the first rung's scores ranked the candidates that the highest rung also scored.

    Over the candidates in both ``first`` and ``highest`` with finite values (those promoted all the
    way): Kendall's tau-b between the two rungs' scores (``scipy.stats.kendalltau``); its 90% bootstrap
    interval (``n_boot`` resamples of the candidates with replacement, seeded by ``seed``; the 5th and
    95th percentiles of the resampled taus, resamples whose tau is undefined left out); the top-``k``
    recall, the share of the highest rung's best ``k`` that the first rung's best ``k`` also holds (ties
    to the earlier candidate in ``first``'s order); and ``warning``, one line when tau is below
    ``AUDIT_WARN_TAU`` (or undefined), else None. ``lower_is_better`` applies to both rungs' scores.

    The candidates audited are the promoted ones, a selection by the first rung itself: their range
    of first-rung scores is narrow, so the tau here is usually lower than over all candidates, and a
    low one says the first rung cannot order the candidates it promotes, not that it failed to promote
    the right ones. With fewer than ``AUDIT_MIN_CANDIDATES`` candidates scored at both rungs the dict
    says that the audit is not possible and why (``possible`` False, ``reason``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = [c for c in first if c in highest and math.isfinite(float(first[c])) and math.isfinite(float(highest[c]))]
    n = len(keys)
    out: dict[str, Any] = {"possible": False, "n": n, "kendall_tau": None, "kendall_p": None, "tau_interval_90": None,
                           "n_boot": 0, "top_k": min(k, n), "top_k_recall": None, "warning": None, "reason": None}
    if n < AUDIT_MIN_CANDIDATES:
        out["reason"] = (f"only {n} candidate{'s' if n != 1 else ''} scored at both rungs; an audit needs at least "
                         f"{AUDIT_MIN_CANDIDATES}")
        return out
    x = np.array([float(first[c]) for c in keys])
    y = np.array([float(highest[c]) for c in keys])
    res = kendalltau(x, y)
    tau, p = float(res[0]), float(res[1])
    interval = None
    used = 0
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        taus = _tau_b_many(x[idx], y[idx])
        taus = taus[np.isfinite(taus)]
        used = int(taus.size)
        if used:
            interval = [float(np.percentile(taus, 5)), float(np.percentile(taus, 95))]
    kk = min(k, n)
    recall = len(_top(x, kk, lower_is_better) & _top(y, kk, lower_is_better)) / kk
    warning = None
    if not math.isfinite(tau):
        warning = f"rank agreement undefined over the {n} candidates scored at both rungs (a rung's scores are all tied)"
    elif tau < AUDIT_WARN_TAU:
        warning = (f"the first rung ranks the {n} candidates scored at both rungs at Kendall tau {tau:.2f} against the "
                   f"highest (< {AUDIT_WARN_TAU}): its order among them is a weak guide; promote a larger fraction or "
                   f"score longer at the first rung")
    out.update({"possible": True, "kendall_tau": tau, "kendall_p": p, "tau_interval_90": interval, "n_boot": used,
                "top_k": kk, "top_k_recall": recall, "warning": warning})
    return out
