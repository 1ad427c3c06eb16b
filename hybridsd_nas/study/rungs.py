"""Multi-fidelity studies in Optuna's storage: rungs, promotions, each candidate's highest rung, the audit.

A study with ``fidelity: {rungs: [40, 160, 640], promote: 0.3}`` scores every new candidate at the
first rung (its trial distils for 40 steps and leaves a checkpoint). A *promotion* is a trial of its
own: it has the candidate's parameters and the user attributes ``rung`` (the distillation steps it
reaches) and ``promotion_of`` (the trial it continues); it resumes the candidate's checkpoint and
scores it again. The policy (:func:`hybridsd_nas.study.fidelity.promotion_candidates`) decides, after
every trial, which candidates of a rung are among its best ``promote`` fraction.

Many workers share one storage. A promotion is enqueued as a WAITING trial and Optuna hands each
WAITING trial to one worker only (its RDB storage moves it to RUNNING in one conditional update).
Two workers may decide the same promotion at the same moment and enqueue it twice; the later of the
two (by trial number) sees its earlier twin when it starts and stands down (:func:`earlier_twin`).
A killed promotion is retried by the heartbeat's retry, which copies its user attributes; Ctrl-C
queues it again with them (``worker.requeue``). Neither is enqueued by the policy a second time,
since a candidate with any promotion trial to a rung, in any state, counts as promoted to it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import StudyConfig
from .fidelity import Fidelity, audit, promotion_candidates
from .metrics import METRICS
from .status import SCORED, TrialStatus

RUNG = "rung"  # user attribute: the distillation steps a trial's quality figures come from
PROMOTION_OF = "promotion_of"  # user attribute of a promotion: the trial of the rung below it
# what a promotion carries over when it is queued again (Ctrl-C) or copied from its source trial
PROMOTION_ATTRS = (RUNG, PROMOTION_OF, "candidate_key", "enqueued_as")
CHECKPOINTS = "rung-checkpoints"  # in the study's artifact folder: one folder per candidate key


def fidelity_of(config: dict[str, Any] | None) -> Fidelity | None:
    """The :class:`Fidelity` of a study from its stored config dict, or None."""
    f = (config or {}).get("fidelity")
    return None if f is None else Fidelity(rungs=f["rungs"], promote=f["promote"])


def is_promotion(t: FrozenTrial | optuna.trial.Trial) -> bool:
    return PROMOTION_OF in t.user_attrs


def rung_of(t: FrozenTrial, fidelity: Fidelity | None) -> int | None:
    """The distillation steps a trial's quality figures come from: its ``rung`` attribute, else the
    first rung of a multi-fidelity study, else None (a study without rungs)."""
    r = t.user_attrs.get(RUNG)
    if r is not None:
        return int(r)
    return fidelity.first if fidelity is not None else None


def checkpoint_root(cfg: StudyConfig) -> Path:
    """The folder of a study's rung checkpoints: in its artifact folder, which every worker of a study
    must share (as it shares the sample grids)."""
    return cfg.artifacts_dir() / CHECKPOINTS


def checkpoint_dir(cfg: StudyConfig, key: str) -> Path:
    """Where candidate ``key``'s distillation checkpoint lives between rungs."""
    return checkpoint_root(cfg) / key


def drop_checkpoint(cfg: StudyConfig, key: str) -> None:
    """Delete candidate ``key``'s checkpoint (it reached the highest rung: nothing continues it)."""
    shutil.rmtree(checkpoint_dir(cfg, key), ignore_errors=True)


def _scored(t: FrozenTrial) -> bool:
    return (t.state == TrialState.COMPLETE and t.user_attrs.get("status") in SCORED and "duplicate_of" not in t.user_attrs
            and t.values is not None)


def _finite(t: FrozenTrial) -> bool:
    return t.values is not None and all(math.isfinite(v) for v in t.values)


def _ranking(here: dict[str, FrozenTrial]) -> tuple[dict[str, tuple], dict[str, bool]]:
    """The objective values of a rung's trials with finite ones, and whether each is feasible (``ok``):
    what :func:`promotion_candidates` ranks."""
    scores = {k: tuple(t.values) for k, t in here.items() if _finite(t)}
    return scores, {k: here[k].user_attrs.get("status") == TrialStatus.OK for k in scores}


def _key(t: FrozenTrial) -> str:
    return str(t.user_attrs.get("candidate_key") or f"trial-{t.number}")


def by_rung(trials: Iterable[FrozenTrial], fidelity: Fidelity | None) -> dict[int | None, dict[str, FrozenTrial]]:
    """Scored trials by rung, then by candidate key, each rung in the order its trials finished."""
    out: dict[int | None, dict[str, FrozenTrial]] = {}
    done = sorted((t for t in trials if _scored(t)), key=lambda t: (t.datetime_complete or t.datetime_start, t.number))
    for t in done:
        out.setdefault(rung_of(t, fidelity), {}).setdefault(_key(t), t)
    return out


def highest_rung_trials(trials: Sequence[FrozenTrial], fidelity: Fidelity | None) -> list[FrozenTrial]:
    """Each scored candidate once, by its trial at the highest rung it reached (a study without rungs:
    its one scored trial), in trial-number order."""
    best: dict[str, FrozenTrial] = {}
    for t in trials:
        if not _scored(t):
            continue
        k = _key(t)
        have = best.get(k)
        if have is None or (rung_of(t, fidelity) or 0, t.number) > (rung_of(have, fidelity) or 0, have.number):
            best[k] = t
    return sorted(best.values(), key=lambda t: t.number)


def promoted_keys(trials: Iterable[FrozenTrial], rung: int) -> set[str]:
    """Candidates with a promotion trial to ``rung`` in any state (queued, running, done, failed)."""
    return {_key(t) for t in trials if is_promotion(t) and int(t.user_attrs.get(RUNG, -1)) == rung}


def enqueue_promotions(study: optuna.Study, fidelity: Fidelity) -> list[tuple[str, int]]:
    """Queue the promotions the policy asks for now; returns (candidate key, rung) of each queued.

    For each rung below the highest, the scored candidates of that rung in the order they finished
    are ranked by the study's objectives (feasible ones only, status ``ok``), and those of the best
    ``promote`` fraction without a promotion to the next rung yet get one."""
    trials = study.get_trials(deepcopy=False)
    rungs = by_rung(trials, fidelity)
    directions = [d.name.lower() for d in study.directions]
    queued = []
    for i, r in enumerate(fidelity.rungs[:-1]):
        here = rungs.get(r, {})
        if not here:
            continue
        nxt = fidelity.rungs[i + 1]
        scores, feasible = _ranking(here)
        for k in promotion_candidates(scores, feasible, fidelity.promote, promoted_keys(trials, nxt), directions):
            src = here[k]
            attrs = {a: src.user_attrs[a] for a in ("candidate_key", "enqueued_as") if a in src.user_attrs}
            study.enqueue_trial(dict(src.params), user_attrs={**attrs, RUNG: nxt, PROMOTION_OF: src.number})
            queued.append((k, nxt))
    return queued


def prune_checkpoints(study: optuna.Study, cfg: StudyConfig, everything: bool = False) -> list[str]:
    """Delete the rung checkpoints that no promotion is likely to need; returns their candidate keys.

    A candidate's checkpoint is kept while the candidate is among the best ``2 * promote`` of the
    rung it last reached (twice the fraction promoted: later arrivals can still lift it into the
    promoted fraction), or while a trial of it is queued or running. A promotion whose checkpoint is
    gone distils from the start to its rung, which gives the same student (the proxy's learning rate
    does not depend on the run's length, and the trainer's draws come from one seeded generator), at
    the cost of the steps redone. ``everything``: delete them all (the study is done)."""
    fid = cfg.fidelity
    root = checkpoint_root(cfg)
    if fid is None or not root.is_dir():
        return []
    keep: set[str] = set()
    if not everything:
        trials = study.get_trials(deepcopy=False)
        keep |= {_key(t) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING) and "candidate_key" in t.user_attrs}
        directions = [d.name.lower() for d in study.directions]
        rungs = by_rung(trials, fid)
        last = {_key(t): rung_of(t, fid) for t in highest_rung_trials(trials, fid)}
        for r in fid.rungs[:-1]:
            scores, feasible = _ranking({k: t for k, t in rungs.get(r, {}).items() if last.get(k) == r})
            keep |= set(promotion_candidates(scores, feasible, min(1.0, 2 * fid.promote), (), directions))
    removed = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def pending_promotions(study: optuna.Study) -> tuple[int, int]:
    """(queued, running) promotion trials of ``study``."""
    ts = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    waiting = sum(t.state == TrialState.WAITING and is_promotion(t) for t in ts)
    return waiting, sum(t.state == TrialState.RUNNING and is_promotion(t) for t in ts)


def earlier_twin(study: optuna.Study, number: int, key: str, rung: int) -> FrozenTrial | None:
    """An earlier promotion of candidate ``key`` to ``rung`` that is queued, running or scored (so
    trial ``number``, a twin enqueued by a concurrent decision, must not run), else None."""
    for t in study.get_trials(deepcopy=False):
        if t.number >= number or not is_promotion(t) or _key(t) != key or int(t.user_attrs.get(RUNG, -1)) != rung:
            continue
        if t.state in (TrialState.WAITING, TrialState.RUNNING) or _scored(t):
            return t
    return None


def source_trial(study: optuna.Study, number: int) -> FrozenTrial | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


def study_audit(trials: Sequence[FrozenTrial], fidelity: Fidelity | None, objectives: Sequence[dict[str, str]],
                k: int = 3, seed: int = 0) -> dict[str, Any] | None:
    """The proxy audit of a multi-fidelity study (None for a study without rungs).

    The metric audited is the first quality objective (the first objective when none is a quality
    metric). For each rung above the first, :func:`~hybridsd_nas.study.fidelity.audit` compares the
    first rung's scores with that rung's over the candidates scored at both; the headline is the
    highest rung where an audit is possible, else the highest rung reached, else a statement that
    nothing was promoted yet."""
    if fidelity is None:
        return None
    quality = [o for o in objectives if METRICS.get(o["metric"]).group == "quality"] if objectives else []
    obj = (quality or list(objectives))[0]
    names = [o["metric"] for o in objectives]
    j = names.index(obj["metric"])
    rungs = by_rung(trials, fidelity)
    first = {key: t.values[j] for key, t in rungs.get(fidelity.first, {}).items()}
    promotions = sum(1 for t in trials if is_promotion(t) and _scored(t))
    base = {"metric": obj["metric"], "direction": obj["direction"], "first_rung": fidelity.first, "rungs": list(fidelity.rungs),
            "promote": fidelity.promote, "promotions": promotions,
            "scored_per_rung": {str(r): len(rungs.get(r, {})) for r in fidelity.rungs}}
    per = []
    for r in fidelity.rungs[1:]:
        at = {key: t.values[j] for key, t in rungs.get(r, {}).items()}
        if not at:
            continue
        a = audit(first, at, lower_is_better=obj["direction"] == "minimize", k=k, seed=seed)
        if a["warning"]:  # audit() compares "the first rung" with "the highest"; here, with rung r
            a["warning"] = a["warning"].replace("against the highest", f"against the {r}-step rung")
        per.append({"rung": r, **a})
    if not per:
        return {**base, "possible": False, "n": 0, "highest_rung": None, "by_rung": [], "warning": None,
                "reason": (f"no promotions yet: no candidate has been scored beyond the first rung ({fidelity.first} steps), "
                           "so the first rung's ranking cannot be checked")}
    head = next((a for a in reversed(per) if a["possible"]), per[-1])
    return {**base, **{k_: v for k_, v in head.items() if k_ != "rung"}, "highest_rung": head["rung"], "by_rung": per}


def describe_audit(a: dict[str, Any] | None) -> str:
    """The audit in one paragraph of plain text (pareto.md, the CLI)."""
    if a is None:
        return ""
    if not a["possible"]:
        return f"Proxy audit ({a['metric']}, rungs {a['rungs']}): {a['reason']}."
    lo, hi = a["tau_interval_90"] or (float("nan"), float("nan"))
    txt = (f"Proxy audit ({a['metric']}): over the {a['n']} candidates scored at {a['first_rung']} and {a['highest_rung']} steps, "
           f"Kendall tau {a['kendall_tau']:.3f} (bootstrap 90% interval {lo:.3f} to {hi:.3f}, {a['n_boot']} resamples); "
           f"top-{a['top_k']} recall of the first rung against the {a['highest_rung']}-step rung {a['top_k_recall']:.2f}. "
           f"{a['promotions']} promotions; scored per rung: "
           + ", ".join(f"{r} steps: {n}" for r, n in a["scored_per_rung"].items()) + ".")
    if a.get("warning"):
        txt += f" WARNING: {a['warning']}."
    return txt
