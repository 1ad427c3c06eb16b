"""Running a study: one call of :func:`run_study` is one worker.

Several workers (processes or machines) given the same storage URL share the study: Optuna's RDB
storage hands each its own trials, heartbeats reveal a worker that died mid-trial, and its trial is
retried with the same candidate. The trial budget is the number of *evaluated* trials in the study
(new candidates scored; rejections and repeats are cheap and recorded but not counted), so rerunning
the same command after a crash or Ctrl-C resumes towards the same total.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
from diffusers.utils import logging as diffusers_logging
from optuna.trial import TrialState
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from hybridsd_nas.arch import resolve_candidate
from hybridsd_nas.core.errors import ConfigError, HybridSDError

from .config import Constraint, StudyConfig
from .evaluator import Evaluator
from .metrics import METRICS
from .objective import Surplus, TrialFailed, TrialObjective
from .results import pareto_front
from .rungs import PROMOTION_ATTRS, enqueue_promotions, is_promotion, pending_promotions, prune_checkpoints
from .status import StopReason, TrialStatus, evaluated
from .storage import load_or_create_study, open_storage, redact_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CHEAP_STREAK = 200  # rejected or already-seen candidates in a row before a worker gives up


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(evaluated trials, running trials of new candidates): promotions count in neither."""
    ts = study.get_trials(deepcopy=False)
    return sum(evaluated(t) for t in ts), sum(t.state == TrialState.RUNNING and not is_promotion(t) for t in ts)


def enqueue_known(cfg: StudyConfig, study: optuna.Study, ev: Evaluator) -> list[str]:
    """Enqueue the named candidates once per study (skipped when a trial with the same choices exists)."""
    if not cfg.enqueue or study.user_attrs.get("enqueued"):
        return []
    points = {pt.candidate.key: pt for pt in ev.space.enumerate(ev.arch)} if ev.space.is_discrete(ev.arch) else {}
    done = []
    for name in cfg.enqueue:
        cand = resolve_candidate(name, ev.arch)
        pt = points.get(cand.key)
        if pt is None:
            raise ConfigError(f"{cfg.source}: enqueue: {name!r} is not a point of space {ev.space.name!r}"
                              + (f"; its presets: {', '.join(sorted(ev.space.presets(ev.arch))) or '(none)'}" if points else
                                 " (a continuous space: enqueue takes discrete spaces only)"))
        study.enqueue_trial(dict(pt.params), user_attrs={"enqueued_as": name}, skip_if_exists=True)
        done.append(name)
    study.set_user_attr("enqueued", done)
    return done


def requeue(study: optuna.Study, trial: optuna.trial.Trial | None) -> None:
    """After Ctrl-C: put the interrupted trial's choices back at the head of the queue."""
    if trial is None:
        return
    ft = next((t for t in study.get_trials(deepcopy=False) if t.number == trial.number), None)
    if ft is not None and ft.state == TrialState.FAIL and ft.params and ft.user_attrs.get("status") == TrialStatus.INTERRUPTED:
        keep = {k: ft.user_attrs[k] for k in PROMOTION_ATTRS if k in ft.user_attrs} if is_promotion(ft) else {}
        study.enqueue_trial(ft.params, user_attrs={**keep, "retry_of": ft.number})


def rejection_cause(trials: list[optuna.trial.FrozenTrial], cfg: StudyConfig, ev: Evaluator) -> dict[str, Any] | None:
    """The one cost constraint that rejected every rejected trial of ``trials`` (a worker's streak of
    cheap trials), with the closest figure any of them reached; None when they were rejected for
    several reasons (or none was rejected)."""
    given = [c for c in cfg.constraints if METRICS.get(c.metric).group == "cost"]
    absolute = ev.constraints("cost")  # the same order, fractions of the teacher made absolute
    hits: list[tuple[int, float]] = []
    for t in trials:
        if t.user_attrs.get("status") != TrialStatus.REJECTED:
            continue
        i = next((i for i, c in enumerate(absolute) if c.metric in t.user_attrs and c.violation(t.user_attrs[c.metric]) > 0), None)
        if i is None:  # rejected as invalid or by a pre-filter
            return None
        hits.append((i, float(t.user_attrs[absolute[i].metric])))
    if not hits or len({i for i, _ in hits}) > 1:
        return None
    i = hits[0][0]
    c: Constraint = absolute[i]
    closest = min((v for _, v in hits), key=c.violation)
    return {"metric": c.metric, "constraint": c.describe(), "given": given[i].describe(), "closest": closest,
            "rejected": len(hits), "trials": len(trials)}


def wandb_run(cfg: StudyConfig, worker: str):
    """A Weights & Biases run of this worker in the study's group, or None when ``wandb: off``."""
    if cfg.wandb == "off":
        return None
    try:
        import wandb  # optional logging; its import takes about a second, paid only by studies that log

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "hybridsd-nas"), group=cfg.name, name=worker,
                          mode=cfg.wandb, dir=str(cfg.results_dir), config=cfg.to_dict(), reinit="finish_previous")
    except Exception as e:
        raise HybridSDError(f"wandb {cfg.wandb}: cannot start a run ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                            "set wandb: offline, or log in for online") from None


def run_study(cfg: StudyConfig, storage: str | None = None, n_trials: int | None = None, timeout: float | None = None,
              progress: bool = True, device: str = "cpu", poll_seconds: float | None = None,
              on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Work on the study until it has ``n_trials`` evaluated trials (default: the config's; see
    :func:`~hybridsd_nas.study.status.evaluated`) or the time budget is spent. Returns a summary of
    what this worker did and where the study stands."""
    target = n_trials if n_trials is not None else cfg.trials
    budget = timeout if timeout is not None else cfg.timeout
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported below, one line each
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    store = open_storage(cfg, storage)
    ev = Evaluator(cfg, device=device)
    study = load_or_create_study(cfg, store)
    enqueue_known(cfg, study, ev)
    ev.latency_table()  # latency.mode lut: the table is read, or built (or waited for) once, before any trial
    if "teacher_figures" not in study.user_attrs and not ev.hybrid:  # the teacher's point on the report's plots
        study.set_user_attr("teacher_figures", ev.teacher_marker())
    art_dir = cfg.artifacts_dir()
    art_dir.mkdir(parents=True, exist_ok=True)
    artifact_store = optuna.artifacts.FileSystemArtifactStore(str(art_dir))
    me = worker_id()
    run = wandb_run(cfg, me)

    def log(row: dict[str, Any]) -> None:
        if row["status"] == TrialStatus.FAILED:
            tqdm.write(f"trial {row['number']} failed: {row['reason']}", file=sys.stderr)
        if run is not None:
            run.log({k: v for k, v in row.items() if isinstance(v, (int, float))} | {"status": row["status"]})
        if on_trial is not None:
            on_trial(row)

    obj = TrialObjective(cfg, ev, target, me, artifact_store, on_trial=log)
    poll = poll_seconds if poll_seconds is not None else max(1.0, cfg.heartbeat_interval / 2)
    deadline = None if budget is None else time.monotonic() + budget
    mine: list[int] = []
    finished, _ = _counts(study)
    bar = tqdm(total=target, initial=min(finished, target or finished), desc=f"study {cfg.name}", unit="trial",
               disable=not progress, dynamic_ncols=True)
    interrupted = False
    stop_reason = StopReason.BUDGET
    failures: list[str] = []
    cheap = 0
    streak: list[optuna.trial.FrozenTrial] = []  # the cheap trials counted by ``cheap``
    rejected_by = None
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            if cfg.fidelity is not None:
                enqueue_promotions(study, cfg.fidelity)
                prune_checkpoints(study, cfg)
            finished, running = _counts(study)
            queued, promoting = pending_promotions(study) if cfg.fidelity is not None else (0, 0)
            bar.n = min(finished, target) if target else finished
            bar.set_postfix(front=len(pareto_front(study, cfg)), running=running + promoting, refresh=True,
                            **({"promotions": queued + promoting} if cfg.fidelity is not None else {}))
            if deadline is not None and time.monotonic() >= deadline:
                stop_reason = StopReason.TIMEOUT
                break
            if target is not None and finished >= target and not queued:
                if promoting:  # the last promotions run elsewhere; they may promote further, or die
                    time.sleep(poll)
                    continue
                stop_reason = StopReason.TRIALS
                break
            if target is not None and finished + running >= target and not queued:
                time.sleep(poll)  # the last trials run elsewhere; wait in case a worker dies
                continue
            try:
                study.optimize(obj, n_trials=1, catch=(TrialFailed, Surplus), gc_after_trial=False, show_progress_bar=False)
            except KeyboardInterrupt:
                interrupted = True
                requeue(study, obj.current)
                break
            if obj.current is not None:
                mine.append(obj.current.number)
                last = next(t for t in study.get_trials(deepcopy=False) if t.number == obj.current.number)
                if last.state == TrialState.FAIL and last.user_attrs.get("status") == TrialStatus.FAILED:
                    failures.append(f"trial {last.number}: {last.user_attrs.get('reason')}")
                elif last.state in FINISHED:
                    failures.clear()
                cheap = 0 if evaluated(last) or is_promotion(last) else cheap + 1
                if cheap:
                    streak.append(last)
                else:
                    streak.clear()
                if len(failures) >= cfg.max_failures:
                    stop_reason = StopReason.FAILURES
                    break
                if cheap >= CHEAP_STREAK:
                    stop_reason = StopReason.EXHAUSTED
                    rejected_by = rejection_cause(streak, cfg, ev)
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if run is not None:
            run.finish()
    finished, running = _counts(study)
    stopped = StopReason.INTERRUPTED if interrupted else stop_reason
    if cfg.fidelity is not None and stopped == StopReason.TRIALS:  # done: no promotion is queued or running
        prune_checkpoints(study, cfg, everything=True)
    return {"study": cfg.name, "storage": redact_url(cfg.storage_url(storage)), "worker": me, "trials_run": mine,
            "evaluated": finished, "running": running, "target": target, "stopped": stopped.value,
            "front_size": len(pareto_front(study, cfg)), "failures": failures, "rejected_by": rejected_by}
