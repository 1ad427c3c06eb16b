"""Running a study: Optuna over a search space, cost first, then the quality proxy.

One call of :func:`run_study` is one worker. Several workers (processes or machines) given the same
storage URL share the study: Optuna's RDB storage hands each its own trials, heartbeats reveal a
worker that died mid-trial, and its trial is retried with the same candidate. The trial budget is
the number of *evaluated* trials in the study (new candidates scored; rejections and repeats are
cheap and recorded but not counted), so rerunning the same command after a crash or Ctrl-C resumes
towards the same total.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import warnings

import optuna
from optuna.trial import TrialState

# heartbeats, retries and metric names are marked experimental by Optuna; they are what we rely on
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

from ..errors import ConfigError, HybridSDError
from .config import METRICS, UNSAMPLED, StudyConfig

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CHEAP_STREAK = 200  # rejected or already-seen candidates in a row before a worker gives up


def evaluated(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that scored a new candidate: what the trial budget counts. Rejections (from the
    cost engine or a pre-filter) and repeats of a scored candidate are cheap and not counted."""
    return t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs


class TrialFailed(Exception):
    """The proxy of a trial failed (NaN, out of memory, bad candidate): the trial is FAIL, the study goes on."""


class _Surplus(Exception):
    """Another worker took the last trial of the budget between our check and our trial's start."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- storage, sampler, study -------------------------------------------------------------------
def open_storage(cfg: StudyConfig, url: str | None = None) -> optuna.storages.RDBStorage:
    """RDB storage (SQLite file or a server URL) with heartbeats and retry of dead workers' trials."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = cfg.storage_url(url)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.heartbeat_grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )
    except Exception as e:  # bad URL, server down, missing driver
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot open the study storage {_redact(url)!r} ({type(e).__name__}: {msg}); "
                          "give sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB") from None


def _redact(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _constraints_func(t: optuna.trial.FrozenTrial) -> list[float]:
    return list(t.user_attrs.get("constraint_violations", [0.0]))


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s, o = cfg.sampler, cfg.sampler_options
    cons = _constraints_func if any(METRICS[c.metric][0] == "quality" for c in cfg.constraints) else None
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=o.get("population_size", 16), constraints_func=cons)
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constraints_func=cons,
                                          n_startup_trials=o.get("n_startup_trials", 10))
    if s == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed, constraints_func=cons, n_startup_trials=o.get("n_startup_trials", 10))
    if s == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=cfg.seed)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def load_or_create_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    directions = [o.direction for o in cfg.objectives]
    study = optuna.create_study(study_name=cfg.name, storage=storage, directions=directions,
                                sampler=make_sampler(cfg), load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"{cfg.source}: objectives: study {cfg.name!r} in this storage has directions "
                          f"{[d.name.lower() for d in study.directions]}, not {directions}; give the study another name")
    old = study.user_attrs.get("config")
    if old is not None:
        mine = _identity(cfg.to_dict())
        theirs = _identity(old)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"{cfg.source}: study {cfg.name!r} already exists with other settings ({', '.join(diff)}); "
                              "give the study another name or another storage")
    else:
        study.set_user_attr("config", json.loads(json.dumps(cfg.to_dict(), default=str)))
        study.set_metric_names([o.metric for o in cfg.objectives])
    return study


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    """The settings that change what a trial means (not budgets, storage or logging)."""
    skip = {"trials", "timeout", "max_failures", "storage", "artifacts", "wandb", "heartbeat_interval", "heartbeat_grace", "max_retry",
            "source", "description", "enqueue"}
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in skip}, default=str))


# -- evaluating one candidate ------------------------------------------------------------------
class Evaluator:
    """Cost, zero-cost scores and the proxy for the points of one study's space."""

    def __init__(self, cfg: StudyConfig, device: str = "cpu"):
        from ..arch import describe
        from ..proxy import ProxySettings
        from ..spaces import load_space

        self.cfg, self.device = cfg, device
        self.arch = describe(cfg.teacher)
        self.space = load_space(cfg.space)
        from .hybrid import HYBRID_METRICS

        self.hybrid = self.space.kind == "hybrid-schedule"
        used = [o.metric for o in cfg.objectives] + [c.metric for c in cfg.constraints]
        if not self.hybrid and any(m in HYBRID_METRICS for m in used):
            m = next(m for m in used if m in HYBRID_METRICS)
            raise ConfigError(f"{cfg.source}: {m} is a figure of hybrid schedules; it needs a hybrid-schedule space "
                              f"(space {self.space.name!r} is {self.space.kind})")
        for c in cfg.constraints:
            if c.metric in HYBRID_METRICS and c.of == "teacher":
                raise ConfigError(f"{cfg.source}: constraints: {c.metric} takes no 'of: teacher' "
                                  "(cloud_share is already a share of the all-cloud run; give edge_macs in MACs)")
        if self.hybrid and any(m in UNSAMPLED for m in used):
            m = next(m for m in used if m in UNSAMPLED)
            raise ConfigError(f"{cfg.source}: {m} is a figure of one distilled U-Net; a hybrid-schedule space is ranked by "
                              "the figures of its samples (proxy_fid, kid, fid_real, paired_mse, adherence)")
        if self.hybrid and cfg.enqueue:
            raise ConfigError(f"{cfg.source}: enqueue: names candidates of layer-removal or recombination spaces; "
                              f"space {self.space.name!r} is a hybrid-schedule space (leave enqueue out)")
        self.settings = ProxySettings(**cfg.proxy)
        self._lut = None
        self._teacher_cost: dict[str, Any] | None = None
        self._schedule_cost = None
        self._hybrid_proxy = None

    def key(self, pt) -> str:
        """What makes two trials the same evaluation: the candidate, and for schedules the schedule too."""
        if self.hybrid:
            from .hybrid import point_key

            return point_key(pt)
        return pt.candidate.key

    def schedule_figures(self, pt, cost: dict[str, Any]) -> dict[str, Any]:
        """Cloud/edge figures of a schedule point (its small U-Net's ``cost`` given)."""
        from .hybrid import ScheduleCost

        if self._schedule_cost is None:
            self._schedule_cost = ScheduleCost(self.cfg.teacher, self.cfg.resolution)
        return self._schedule_cost(pt.extra["schedule"], int(cost["macs"]), int(self.teacher_figures()["macs"]))

    def teacher_figures(self) -> dict[str, Any]:
        """The teacher's own cost figures (the no-op candidate), counted once."""
        if self._teacher_cost is None:
            from ..arch import Candidate

            self._teacher_cost = _cost_figures(self.cost(Candidate()))
        return self._teacher_cost

    def constraints(self, group: str) -> list:
        """The config's constraints on metrics of ``group``, fractions of the teacher made absolute."""
        out = []
        for c in self.cfg.constraints:
            if METRICS[c.metric][0] != group:
                continue
            if c.of == "teacher":
                c = c.absolute(float(self.teacher_figures()[c.metric]))
            out.append(c)
        return out

    def measured(self) -> dict[str, Any]:
        c = self.cfg
        return {"cost": {"resolution": c.resolution, "batch": c.batch, "method": "meta-device count, no weights"},
                "latency": None if c.latency_mode == "off" else {"mode": c.latency_mode, "device": c.latency_device,
                                                                 "dtype": c.latency_dtype, "batch": c.batch},
                "proxy": {**self.settings.as_dict(), "device": self.device, "dtype": "float32"}}

    def cost(self, candidate) -> dict[str, Any]:
        from ..cost import LatencyTable, estimate_cost

        c = self.cfg
        lut = None
        if c.latency_mode == "lut":
            if self._lut is None:
                import torch

                from ..cost.latency import parse_dtype

                first = estimate_cost(c.teacher, candidate, resolution=c.resolution, batch=c.batch, arch=self.arch)
                dt = parse_dtype(c.latency_dtype) if c.latency_dtype else (torch.float16 if c.latency_device.startswith("cuda") else torch.float32)
                self._lut = LatencyTable(c.latency_device, dt, first["measured"]["resolution"], c.batch, path=c.latency_table)
            lut = self._lut
        return estimate_cost(c.teacher, candidate, resolution=c.resolution, batch=c.batch, latency=c.latency_mode,
                             device=c.latency_device, dtype=c.latency_dtype, lut=lut, arch=self.arch)

    def proxy(self, candidate, prefilter: Callable[[dict[str, float]], str | None] | None, quality: bool,
              point=None, sample: bool = True) -> dict[str, Any]:
        """The proxy's figures of one candidate; ``sample=False`` stops after the distillation and its
        held-out score (no student samples, no FID: the default proxy's 40 steps and held-out score, the
        ranking score, cost 7.8% of a long distillation, results/proxy_fidelity_ema_reference.md)."""
        from ..proxy import run_proxy

        if self.hybrid:
            from .hybrid import HybridProxy

            if self._hybrid_proxy is None:
                self._hybrid_proxy = HybridProxy(self.cfg.teacher, self.settings, self.device, self.cfg.base)
            return self._hybrid_proxy(point, prefilter, quality)
        return run_proxy(self.cfg.teacher, candidate, self.settings, base=self.cfg.base, device=self.device,
                         return_images=quality and sample, zero_cost_only=not quality, prefilter=prefilter, evaluate=sample)


def _cost_figures(cost: dict[str, Any]) -> dict[str, Any]:
    out = {k: cost[k] for k in ("params", "macs", "macs_conv_linear") if k in cost}
    if "latency_ms" in cost:
        out["latency_ms"] = cost["latency_ms"]
    return out


def _check(constraints, figures: dict[str, Any]) -> str | None:
    for c in constraints:
        if c.metric in figures and c.violation(figures[c.metric]) > 0:
            return f"{c.metric} = {figures[c.metric]:.6g} breaks {c.describe()}"
    return None


def save_grid(images, path: Path, cols: int = 8) -> Path:
    """A PNG grid of uint8 images (N, H, W, 3) or (N, 3, H, W)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(images)
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    n, h, w = a.shape[:3]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, a.shape[3]), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = a[i]
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
    return path


class Objective:
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

    def _surplus(self, trial: optuna.trial.Trial) -> bool:
        if self.target is None:
            return False
        ts = trial.study.get_trials(deepcopy=False)
        done = sum(evaluated(t) for t in ts)
        ahead = sum(t.state == TrialState.RUNNING and t.number < trial.number for t in ts)
        return done + ahead >= self.target

    def __call__(self, trial: optuna.trial.Trial):
        self.current = trial
        trial.set_user_attr("worker", self.worker)
        me = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        if "failed_trial" in me.system_attrs:  # a retry of a trial whose worker died
            trial.set_user_attr("retry_of", me.system_attrs["failed_trial"])
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            trial.set_user_attr("reason", "stopped by Ctrl-C; its choices were queued again")
            raise

    def _run(self, trial: optuna.trial.Trial):
        from ..errors import InvalidCandidateError

        t_start = time.perf_counter()
        if self._surplus(trial):
            trial.set_user_attr("status", "surplus")
            trial.set_user_attr("reason", "the trial budget was taken by other workers; nothing was run")
            raise _Surplus()
        timings: dict[str, float] = {}
        try:
            pt = self.ev.space.suggest(trial, self.ev.arch)
        except InvalidCandidateError as e:
            self._finish(trial, "rejected", f"invalid candidate: {e}", {}, timings, t_start)
            raise optuna.TrialPruned(f"invalid candidate: {e}") from None
        cand = pt.candidate
        key = self.ev.key(pt)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("candidate_key", key)
        if "schedule" in pt.extra:
            trial.set_user_attr("schedule", dict(pt.extra["schedule"]))

        twin = self._twin(trial, key)
        if twin is not None:
            figures = {k: twin.user_attrs[k] for k in twin.user_attrs if k in METRICS}
            trial.set_user_attr("duplicate_of", twin.number)
            self._finish(trial, "duplicate", f"same candidate as trial {twin.number}; its figures are reused", figures, timings, t_start)
            for k in ("constraint_violations", "sample_grid_artifact"):
                if k in twin.user_attrs:
                    trial.set_user_attr(k, twin.user_attrs[k])
            return self._values(figures)

        t0 = time.perf_counter()
        cost = self.ev.cost(cand)
        timings["cost_seconds"] = time.perf_counter() - t0
        figures = _cost_figures(cost)
        if self.ev.hybrid:
            sc = self.ev.schedule_figures(pt, cost)
            figures.update({m: sc[m] for m in ("cloud_share", "edge_macs")})
            trial.set_user_attr("accounting", sc["accounting"])
        trial.set_user_attr("build", cost.get("build"))
        trial.set_user_attr("cost_measured", {k: v for k, v in cost["measured"].items() if k != "method"})
        if "latency" in cost:
            trial.set_user_attr("latency", {k: v for k, v in cost["latency"].items() if not isinstance(v, (list, dict))})
        why = _check(self.ev.constraints("cost"), figures)
        if why:
            self._finish(trial, "rejected", why, figures, timings, t_start)
            raise optuna.TrialPruned(why)

        if self.quality or self.zero_cost:
            pre = list(self.cfg.prefilter) + self.ev.constraints("zero_cost")
            t0 = time.perf_counter()
            try:
                res = self.ev.proxy(cand, (lambda z: _check(pre, z)) if pre else None, self.quality, point=pt, sample=self.sample)
                timings["proxy_seconds"] = time.perf_counter() - t0
            except HybridSDError as e:
                self._finish(trial, "failed", f"{type(e).__name__}: {e}", figures, timings, t_start)
                raise TrialFailed(str(e)) from None
            except RuntimeError as e:  # out of memory and kin
                self._finish(trial, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", figures, timings, t_start)
                raise TrialFailed(str(e)) from None
            figures.update(res.get("zero_cost", {}))
            for k in ("zero_cost_seconds", "distill_seconds", "heldout_seconds", "eval_seconds"):  # parts of proxy_seconds
                if res.get(k) is not None:
                    timings[k] = float(res[k])
            if res["status"] == "interrupted":
                raise KeyboardInterrupt
            if res["status"] == "skipped":
                self._finish(trial, "rejected", f"pre-filter: {res['reason']}", figures, timings, t_start)
                raise optuna.TrialPruned(res["reason"])
            if res["status"] != "ok":
                self._finish(trial, "failed", f"proxy {res['status']}: {res.get('reason')}", figures, timings, t_start)
                raise TrialFailed(str(res.get("reason")))
            for k in ("proxy_fid", "kid", "fid_real", "paired_mse", "heldout_mse", "adherence", "kid_std", "adherence_teacher",
                      "distill_final_loss"):
                if res.get(k) is not None:
                    figures[k] = float(res[k])
            if "images" in res and self.store is not None:
                timings["artifact_seconds"] = self._upload_grid(trial, res["images"])
            bad = [m for m in (o.metric for o in self.cfg.objectives) if m in figures and not math.isfinite(figures[m])]
            if bad:
                self._finish(trial, "failed", f"{bad[0]} is not finite ({figures[bad[0]]})", figures, timings, t_start)
                raise TrialFailed(f"{bad[0]} is not finite")
        late = self.ev.constraints("quality")
        viol = [c.violation(figures[c.metric]) for c in late]
        if late:
            trial.set_user_attr("constraint_violations", [v if math.isfinite(v) else 1e30 for v in viol])
        self._finish(trial, "ok" if all(v <= 0 for v in viol) else "infeasible", _check(late, figures), figures, timings, t_start)
        return self._values(figures)

    def _twin(self, trial, key: str):
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("candidate_key") == key and t.user_attrs.get("status") in ("ok", "infeasible"):
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

    def _finish(self, trial, status: str, reason: str | None, figures: dict[str, Any], timings: dict[str, float], t_start: float):
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
        trial.set_user_attr("status", status)
        if reason:
            trial.set_user_attr("reason", reason)
        if self.on_trial is not None:
            self.on_trial({"number": trial.number, "status": status, "reason": reason, **figures})


# -- the worker loop ---------------------------------------------------------------------------
def _counts(study: optuna.Study) -> tuple[int, int]:
    ts = study.get_trials(deepcopy=False)
    return sum(evaluated(t) for t in ts), sum(t.state == TrialState.RUNNING for t in ts)


def enqueue_known(cfg: StudyConfig, study: optuna.Study, ev: Evaluator) -> list[str]:
    """Enqueue the named candidates once per study (skipped when a trial with the same choices exists)."""
    if not cfg.enqueue or study.user_attrs.get("enqueued"):
        return []
    from ..arch import resolve_candidate

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


def run_study(cfg: StudyConfig, storage: str | None = None, n_trials: int | None = None, timeout: float | None = None,
              progress: bool = True, device: str = "cpu", poll_seconds: float | None = None,
              on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Work on the study until it has ``n_trials`` evaluated trials (default: the config's; see
    :func:`evaluated`) or the time budget is spent. Returns a summary of what this worker did and where the study stands."""
    from tqdm.auto import tqdm

    from .results import pareto_front

    target = n_trials if n_trials is not None else cfg.trials
    budget = timeout if timeout is not None else cfg.timeout
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported below, one line each
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    store = open_storage(cfg, storage)
    ev = Evaluator(cfg, device=device)
    study = load_or_create_study(cfg, store)
    enqueue_known(cfg, study, ev)
    art_dir = cfg.artifacts_dir()
    art_dir.mkdir(parents=True, exist_ok=True)
    artifact_store = optuna.artifacts.FileSystemArtifactStore(str(art_dir))
    me = worker_id()
    run = _wandb_run(cfg, me)

    def log(row: dict[str, Any]) -> None:
        if row["status"] == "failed":
            tqdm.write(f"trial {row['number']} failed: {row['reason']}", file=sys.stderr)
        if run is not None:
            run.log({k: v for k, v in row.items() if isinstance(v, (int, float))} | {"status": row["status"]})
        if on_trial is not None:
            on_trial(row)

    obj = Objective(cfg, ev, target, me, artifact_store, on_trial=log)
    poll = poll_seconds if poll_seconds is not None else max(1.0, cfg.heartbeat_interval / 2)
    deadline = None if budget is None else time.monotonic() + budget
    mine: list[int] = []
    finished, _ = _counts(study)
    bar = tqdm(total=target, initial=min(finished, target or finished), desc=f"study {cfg.name}", unit="trial",
               disable=not progress, dynamic_ncols=True)
    interrupted = False
    stop_reason = "budget"
    failures: list[str] = []
    cheap = 0
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            finished, running = _counts(study)
            bar.n = min(finished, target) if target else finished
            bar.set_postfix(front=len(pareto_front(study, cfg)), running=running, refresh=True)
            if target is not None and finished >= target:
                stop_reason = "trials"
                break
            if deadline is not None and time.monotonic() >= deadline:
                stop_reason = "timeout"
                break
            if target is not None and finished + running >= target:
                time.sleep(poll)  # the last trials run elsewhere; wait in case a worker dies
                continue
            try:
                study.optimize(obj, n_trials=1, catch=(TrialFailed, _Surplus), gc_after_trial=False, show_progress_bar=False)
            except KeyboardInterrupt:
                interrupted = True
                _requeue(study, obj.current)
                break
            if obj.current is not None:
                mine.append(obj.current.number)
                last = next(t for t in study.get_trials(deepcopy=False) if t.number == obj.current.number)
                if last.state == TrialState.FAIL and last.user_attrs.get("status") == "failed":
                    failures.append(f"trial {last.number}: {last.user_attrs.get('reason')}")
                elif last.state in FINISHED:
                    failures.clear()
                cheap = 0 if evaluated(last) else cheap + 1
                if len(failures) >= cfg.max_failures:
                    stop_reason = "failures"
                    break
                if cheap >= CHEAP_STREAK:
                    stop_reason = "exhausted"
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if run is not None:
            run.finish()
    finished, running = _counts(study)
    return {"study": cfg.name, "storage": _redact(cfg.storage_url(storage)), "worker": me, "trials_run": mine,
            "evaluated": finished, "running": running, "target": target,
            "stopped": "interrupted" if interrupted else stop_reason, "front_size": len(pareto_front(study, cfg)),
            "failures": failures}


def _requeue(study: optuna.Study, trial: optuna.trial.Trial | None) -> None:
    """After Ctrl-C: put the interrupted trial's choices back at the head of the queue."""
    if trial is None:
        return
    ft = next((t for t in study.get_trials(deepcopy=False) if t.number == trial.number), None)
    if ft is not None and ft.state == TrialState.FAIL and ft.params and ft.user_attrs.get("status") == "interrupted":
        study.enqueue_trial(ft.params, user_attrs={"retry_of": ft.number})


def _wandb_run(cfg: StudyConfig, worker: str):
    if cfg.wandb == "off":
        return None
    try:
        import wandb

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "hybridsd-nas"), group=cfg.name, name=worker,
                          mode=cfg.wandb, dir=str(cfg.results_dir), config=cfg.to_dict(), reinit="finish_previous")
    except Exception as e:
        raise HybridSDError(f"wandb {cfg.wandb}: cannot start a run ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                            "set wandb: offline, or log in for online") from None
