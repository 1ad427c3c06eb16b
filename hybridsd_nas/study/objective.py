"""The function Optuna calls per trial: suggest a point, reuse a twin's figures, count the cost and
reject over-budget candidates before any proxy work, run the proxy, record everything.

Every trial ends with a :class:`~hybridsd_nas.study.status.TrialStatus` in its ``status`` user
attribute (and a ``reason`` unless it is ``ok``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hybridsd_nas.core.errors import HybridSDError, InvalidCandidateError
from hybridsd_nas.metrics.sampling import save_grid

from .config import StudyConfig
from .evaluator import Evaluator, check_constraints, cost_figures
from .metrics import METRICS
from .rungs import PROMOTION_OF, RUNG, checkpoint_dir, drop_checkpoint, earlier_twin, is_promotion, source_trial
from .status import SCORED, TrialStatus, evaluated

# what a trial records about its candidate's cost besides the figures (a promotion copies them from its source)
COST_ATTRS = ("build", "cost_measured", "latency", "accounting", "pipeline")
# figures of the proxy's result recorded as user attributes (study metrics and their companions)
PROXY_FIGURES = ("proxy_fid", "kid", "fid_real", "paired_mse", "heldout_mse", "adherence", "kid_std", "adherence_teacher",
                 "clip_score", "clip_score_teacher", "cmmd", "kid_real", "distill_final_loss")
PROXY_TIMINGS = ("zero_cost_seconds", "distill_seconds", "heldout_seconds", "eval_seconds")  # parts of proxy_seconds


class TrialFailed(Exception):
    """The proxy of a trial failed (NaN, out of memory, bad candidate): the trial is FAIL, the study goes on."""


class Surplus(Exception):
    """Another worker took the last trial of the budget between our check and our trial's start."""


class TrialObjective:
    """The function Optuna calls per trial."""

    def __init__(self, cfg: StudyConfig, evaluator: Evaluator, target: int | None, worker: str,
                 artifact_store=None, on_trial: Callable[[dict[str, Any]], None] | None = None):
        self.cfg, self.ev, self.target, self.worker = cfg, evaluator, target, worker
        self.store = artifact_store
        self.on_trial = on_trial
        self.current: optuna.trial.Trial | None = None
        self.quality = cfg.needs("quality")
        self.sample = cfg.needs_sampling()
        self.zero_cost = cfg.needs("zero_cost")
        self.fidelity = cfg.fidelity

    def _surplus(self, trial: optuna.trial.Trial) -> bool:
        if self.target is None:
            return False
        ts = trial.study.get_trials(deepcopy=False)
        done = sum(evaluated(t) for t in ts)
        ahead = sum(t.state == TrialState.RUNNING and t.number < trial.number and not is_promotion(t) for t in ts)
        return done + ahead >= self.target

    def __call__(self, trial: optuna.trial.Trial):
        self.current = trial
        trial.set_user_attr("worker", self.worker)
        me = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        if "failed_trial" in me.system_attrs:  # a retry of a trial whose worker died
            trial.set_user_attr("retry_of", me.system_attrs["failed_trial"])
        try:
            return self._promote(trial) if is_promotion(trial) else self._run(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("status", TrialStatus.INTERRUPTED.value)
            trial.set_user_attr("reason", "stopped by Ctrl-C; its choices were queued again")
            raise

    def _run(self, trial: optuna.trial.Trial):
        t_start = time.perf_counter()
        if self._surplus(trial):
            self._stand_down(trial, "the trial budget was taken by other workers")
        timings: dict[str, float] = {}
        try:
            pt = self.ev.space.suggest(trial, self.ev.arch)
        except InvalidCandidateError as e:
            self._finish(trial, TrialStatus.REJECTED, f"invalid candidate: {e}", {}, timings, t_start)
            raise optuna.TrialPruned(f"invalid candidate: {e}") from None
        cand = pt.candidate
        key = self.ev.key(pt)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("candidate_key", key)
        trial.set_user_attr("label", self.ev.label(cand))
        if "schedule" in pt.extra:
            trial.set_user_attr("schedule", dict(pt.extra["schedule"]))

        busy = self._in_flight(trial, key)
        if busy is not None:
            # Workers with one sampler seed draw the same candidates; the first to record it scores it,
            # and this worker's sampler is reseeded so that the two streams part.
            trial.study.sampler.reseed_rng()
            self._stand_down(trial, f"trial {busy} is scoring the same candidate now")
        twin = self._twin(trial, key)
        if twin is not None:
            figures = {k: twin.user_attrs[k] for k in twin.user_attrs if k in METRICS}
            trial.set_user_attr("duplicate_of", twin.number)
            self._finish(trial, TrialStatus.DUPLICATE, f"same candidate as trial {twin.number}; its figures are reused", figures,
                         timings, t_start)
            for k in ("constraint_violations", "sample_grid_artifact", "provenance"):
                if k in twin.user_attrs:
                    trial.set_user_attr(k, twin.user_attrs[k])
            return self._values(figures)

        t0 = time.perf_counter()
        cost = self.ev.cost(cand)
        whole = self.ev.pipeline_figures(cand, pt.extra.get("schedule"), cost) if self.ev.pipeline_metrics else None
        timings["cost_seconds"] = time.perf_counter() - t0
        figures = cost_figures(cost)
        if self.ev.hybrid:
            sc = self.ev.schedule_figures(pt, cost)
            figures.update({m: sc[m] for m in ("cloud_share", "edge_macs")})
            trial.set_user_attr("accounting", sc["accounting"])
        if whole is not None:  # the whole request: pipeline_latency_ms, peak_memory_mb, and how they were found
            trial.set_user_attr("pipeline", whole.pop("record"))
            figures.update(whole)
        trial.set_user_attr("build", cost.build)
        trial.set_user_attr("cost_measured", {k: v for k, v in cost.measured.items() if k != "method"})
        if cost.latency is not None:
            trial.set_user_attr("latency", {k: v for k, v in cost.latency.items() if not isinstance(v, (list, dict))})
        why = check_constraints(self.ev.constraints("cost"), figures)
        if why:
            self._finish(trial, TrialStatus.REJECTED, why, figures, timings, t_start)
            raise optuna.TrialPruned(why)

        if self.fidelity is not None:
            trial.set_user_attr(RUNG, self.fidelity.first)
        pre = list(self.cfg.prefilter) + self.ev.constraints("zero_cost")
        return self._score(trial, cand, pt, figures, timings, t_start, pre, steps=None)

    def _promote(self, trial: optuna.trial.Trial):
        """A promotion: the candidate of trial ``promotion_of`` distilled on from its checkpoint to ``rung``
        steps and scored again; its cost figures are the source trial's."""
        t_start = time.perf_counter()
        rung, src_no = int(trial.user_attrs[RUNG]), int(trial.user_attrs[PROMOTION_OF])
        pt = self.ev.space.suggest(trial, self.ev.arch)  # the enqueued parameters: the source's candidate
        cand, key = pt.candidate, self.ev.key(pt)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("candidate_key", key)
        trial.set_user_attr("label", self.ev.label(cand))
        twin = earlier_twin(trial.study, trial.number, key, rung)
        if twin is not None:
            self._stand_down(trial, f"trial {twin.number} runs the same promotion to {rung} steps")
        src = source_trial(trial.study, src_no)
        if src is None or src.user_attrs.get("candidate_key") != key:
            self._finish(trial, TrialStatus.FAILED, f"promotion of trial {src_no}: that trial is missing or holds another "
                         "candidate", {}, {}, t_start)
            raise TrialFailed(f"promotion source {src_no} mismatch")
        figures = {m: src.user_attrs[m] for m in METRICS if m in src.user_attrs and METRICS.get(m).group == "cost"}
        for k in COST_ATTRS:
            if k in src.user_attrs:
                trial.set_user_attr(k, src.user_attrs[k])
        return self._score(trial, cand, pt, figures, {}, t_start, [], steps=rung)

    def _score(self, trial, cand, pt, figures: dict[str, Any], timings: dict[str, float], t_start: float, pre: list,
               steps: int | None):
        """The proxy's figures of ``cand`` (a multi-fidelity study: distilled to ``steps``, or its first
        rung, through the candidate's checkpoint), then the quality constraints; the trial's values."""
        ckpt, save = None, True
        if self.fidelity is not None:
            steps = steps or self.fidelity.first
            ckpt = checkpoint_dir(self.cfg, self.ev.key(pt))
            save = steps < self.fidelity.highest
        if self.quality or self.zero_cost:
            t0 = time.perf_counter()
            try:
                res = self.ev.proxy(cand, (lambda z: check_constraints(pre, z)) if pre else None, self.quality, point=pt,
                                    sample=self.sample, steps=steps, checkpoint_dir=ckpt, save_checkpoint=save)
                timings["proxy_seconds"] = time.perf_counter() - t0
            except HybridSDError as e:
                self._finish(trial, TrialStatus.FAILED, f"{type(e).__name__}: {e}", figures, timings, t_start)
                raise TrialFailed(str(e)) from None
            except RuntimeError as e:  # out of memory and kin
                self._finish(trial, TrialStatus.FAILED, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", figures, timings,
                             t_start)
                raise TrialFailed(str(e)) from None
            figures.update(res.get("zero_cost", {}))
            for k in PROXY_TIMINGS:
                if res.get(k) is not None:
                    timings[k] = float(res[k])
            # the proxy's own result statuses (ok, skipped, interrupted, failed), not trial statuses
            if res["status"] == "interrupted":
                raise KeyboardInterrupt
            if res["status"] == "skipped":
                self._finish(trial, TrialStatus.REJECTED, f"pre-filter: {res['reason']}", figures, timings, t_start)
                raise optuna.TrialPruned(res["reason"])
            if res["status"] != "ok":
                self._finish(trial, TrialStatus.FAILED, f"proxy {res['status']}: {res.get('reason')}", figures, timings, t_start)
                raise TrialFailed(str(res.get("reason")))
            for k in PROXY_FIGURES:
                if res.get(k) is not None:
                    figures[k] = float(res[k])
            if res.get("resumed_from_step") is not None:
                trial.set_user_attr("resumed_from_step", int(res["resumed_from_step"]))
            if res.get("provenance"):  # what it was measured on: teacher, data, evaluation set, sampler
                trial.set_user_attr("provenance", res["provenance"])
            if "images" in res and self.store is not None:
                timings["artifact_seconds"] = self._upload_grid(trial, res["images"])
            bad = [m for m in (o.metric for o in self.cfg.objectives) if m in figures and not math.isfinite(figures[m])]
            if bad:
                self._finish(trial, TrialStatus.FAILED, f"{bad[0]} is not finite ({figures[bad[0]]})", figures, timings, t_start)
                raise TrialFailed(f"{bad[0]} is not finite")
        late = self.ev.constraints("quality")
        viol = [c.violation(figures[c.metric]) for c in late]
        if late:
            trial.set_user_attr("constraint_violations", [v if math.isfinite(v) else 1e30 for v in viol])
        status = TrialStatus.OK if all(v <= 0 for v in viol) else TrialStatus.INFEASIBLE
        if ckpt is not None and (not save or status != TrialStatus.OK):  # nothing will continue it
            drop_checkpoint(self.cfg, self.ev.key(pt))
        self._finish(trial, status, check_constraints(late, figures), figures, timings, t_start)
        return self._values(figures)

    @staticmethod
    def _stand_down(trial, why: str):
        """End ``trial`` without running anything (status ``surplus``): another trial does its work."""
        trial.set_user_attr("status", TrialStatus.SURPLUS.value)
        trial.set_user_attr("reason", f"{why}; nothing was run")
        raise Surplus()

    def _in_flight(self, trial, key: str) -> int | None:
        """The number of another running trial that scores candidate ``key`` (not a promotion), if any.
        Each of two trials records its key before it looks, so at least one of two concurrent ones sees
        the other."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number != trial.number and not is_promotion(t) and t.user_attrs.get("candidate_key") == key:
                return t.number
        return None

    def _twin(self, trial, key: str):
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if is_promotion(t):  # a repeat reuses the figures of the candidate's first scoring
                continue
            if t.user_attrs.get("candidate_key") == key and t.user_attrs.get("status") in SCORED:
                return t
        return None

    def _values(self, figures: dict[str, Any]):
        vals = [float(figures[o.metric]) for o in self.cfg.objectives]
        return vals[0] if len(vals) == 1 else vals

    def _upload_grid(self, trial, images) -> float:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            path = save_grid(images[:32], Path(d) / f"trial-{trial.number}-samples.png")
            aid = optuna.artifacts.upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                                                   mimetype="image/png")
        trial.set_user_attr("sample_grid_artifact", aid)
        return time.perf_counter() - t0

    def _finish(self, trial, status: TrialStatus, reason: str | None, figures: dict[str, Any], timings: dict[str, float],
                t_start: float):
        for k, v in figures.items():
            trial.set_user_attr(k, v)
        total = time.perf_counter() - t_start
        timings = {k: round(v, 4) for k, v in timings.items()}
        timings["trial_seconds"] = round(total, 4)
        # the framework's own share: everything but cost counting, the proxy (build, distillation,
        # sampling, metrics) and the artifact upload
        work = sum(timings.get(k, 0.0) for k in ("cost_seconds", "proxy_seconds", "artifact_seconds"))
        timings["overhead_seconds"] = round(max(total - work, 0.0), 4)
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("status", status.value)
        if reason:
            trial.set_user_attr("reason", reason)
        if self.on_trial is not None:
            self.on_trial({"number": trial.number, "status": status.value, "reason": reason, **figures})
