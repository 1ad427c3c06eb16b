"""One proxy run, as stage functions over a :class:`ProxyRun`, and :func:`run_proxy` composing them up
to a chosen :class:`Stage`.

1. :func:`prepare`: resolve the teacher once, plan and build the student with inherited weights,
   encode the training data;
2. :func:`score_zero_cost`: the zero-cost pre-filters, before any training (a ``prefilter`` may
   skip the candidate here);
3. :func:`distill_student`: the short distillation;
4. :func:`score_heldout`: the held-out output MSE, the ranking score (no sampling);
5. :func:`score_samples`: samples on the evaluation set, scored against the teacher's samples (and
   real images, a classifier, a CLIP model where the set has them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler

from hybridsd_nas.arch import Plan
from hybridsd_nas.build import student_of
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.data import DataSpec, encode_source
from hybridsd_nas.data.evalset import EvalSet
from hybridsd_nas.distill import (
    DistillConfig,
    DistillData,
    checked_data_spec,
    distill,
    fashion_mnist_data,
    perceptual_term,
)
from hybridsd_nas.proxy.sampling import eval_set_for, evaluate_student
from hybridsd_nas.proxy.scores import heldout_score, zero_cost_scores
from hybridsd_nas.proxy.settings import ProxySettings
from hybridsd_nas.sources import Teacher, resolve_teacher, vae_scale_factor


class Stage(IntEnum):
    """How far :func:`run_proxy` goes; each stage includes the ones before it."""

    ZERO_COST = 1  # the student as inherited: zero-cost scores only, no training
    DISTILL = 2  # the short distillation, no score after it
    HELDOUT = 3  # the held-out output MSE (the ranking score)
    SAMPLES = 4  # sampling: FID, KID, adherence


@dataclass
class ProxyRun:
    """What the stages share: the resolved teacher, its pipeline, the plan, the student, the data."""

    teacher: Teacher
    settings: ProxySettings
    device: str
    pipe: Any
    plan: Plan
    student: Any
    data: DistillData
    heldout: Any  # held-out examples of the same source (Fashion-MNIST: its test split)
    scheduler: Any
    sampler_steps: int
    guidance: float
    eval_set: EvalSet | None = None  # None when the run does not sample


@dataclass
class ProxyResult:
    """The figures of one proxy run; ``to_dict()`` is the JSON the CLI and studies record."""

    candidate: dict[str, Any]
    candidate_key: str
    teacher: str
    settings: dict[str, Any]
    status: RunStatus = RunStatus.OK
    reason: str | None = None
    zero_cost: dict[str, float] = field(default_factory=dict)
    zero_cost_seconds: float | None = None
    distill: dict[str, Any] = field(default_factory=dict)  # distill_seconds, distill_final_loss, feature_rule
    heldout: dict[str, float] = field(default_factory=dict)  # heldout_mse, heldout_mse_high, heldout_seconds
    evaluation: dict[str, Any] = field(default_factory=dict)  # proxy_fid, kid, fid_real, adherence, ...
    provenance: dict[str, Any] = field(default_factory=dict)  # what it was measured on: teacher, data, evaluation set
    student: Any = field(default=None, repr=False)  # the (distilled) student module
    images: Any = field(default=None, repr=False)  # the student's samples (uint8, N x 3 x H x W), at SAMPLES

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.OK

    @property
    def figures(self) -> dict[str, Any]:
        """Every score, flat: zero-cost aside, the names a study's metrics and constraints use."""
        return {**self.distill, **self.heldout, **self.evaluation}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"candidate": self.candidate, "candidate_key": self.candidate_key, "teacher": self.teacher,
                             "settings": self.settings, "zero_cost": self.zero_cost,
                             "zero_cost_seconds": self.zero_cost_seconds, "status": self.status.value, "reason": self.reason,
                             "provenance": self.provenance}
        d.update(self.figures)
        return d


def proxy_data(pipe, teacher: Teacher, spec: DataSpec, s: ProxySettings) -> tuple[Any, Any]:
    """The distillation data and the held-out examples the ranking score reads: Fashion-MNIST's train
    split (``s.data_images`` images) and test split; any other source is split, its last
    ``s.heldout_latents`` examples held out."""
    if spec.kind == "fashion-mnist":
        return (fashion_mnist_data(pipe, n=spec.limit or s.data_images, seed=s.seed),
                fashion_mnist_data(pipe, n=s.heldout_latents, seed=s.seed, split="test"))
    data = encode_source(spec, pipe, seed=s.seed, sampling=teacher.sampling_settings())
    n, h = len(data), s.heldout_latents
    if n < 2 * h:
        raise ConfigError(f"data {spec.describe()}: {n} examples; the proxy holds out {h} (heldout_latents) and needs "
                          f"at least as many to train on: give {2 * h} or more, or lower heldout_latents")
    return data.subset(0, n - h), data.subset(n - h, n)


def prepare(teacher: Teacher | str, candidate: Any, settings: ProxySettings | None = None, base: str | None = None,
            device: str = "cpu", sampling: bool = True) -> tuple[ProxyRun, ProxyResult]:
    """Stage 1: everything the later stages use, and the result they fill in. With ``sampling`` the
    evaluation set is resolved first, so a teacher without one fails before any model is loaded."""
    s = settings or ProxySettings()
    t = resolve_teacher(teacher)
    spec = checked_data_spec(s.data, t)
    es = eval_set_for(t, s) if sampling else None
    d = student_of(t, candidate, base_unet=base, device=device)
    t, pipe, p, student, cand = d.teacher, d.pipe, d.plan, d.student, d.plan.candidate
    steps, guidance = t.sampling_settings(s.sampler_steps, s.guidance)
    data, held = proxy_data(pipe, t, spec, s)
    run = ProxyRun(t, s, device, pipe, p, student, data, held, DDPMScheduler.from_config(pipe.scheduler.config), steps,
                   guidance, es)
    result = ProxyResult(cand.to_dict(), cand.key, t.spec,
                         {**s.as_dict(), "sampler_steps": steps, "guidance": guidance,
                          "sampler": type(pipe.scheduler).__name__, "device": device, "dtype": "float32"},
                         student=student)
    result.provenance = {"teacher": t.spec, "teacher_fingerprint": t.fingerprint, "data": data.source,
                         "data_spec": spec.to_dict(), "heldout": held.source,
                         "resolution": int(pipe.unet.config.sample_size) * vae_scale_factor(pipe),
                         "sampler": type(pipe.scheduler).__name__, "sampler_steps": steps, "guidance": guidance,
                         "eval_set": es.to_dict() if es is not None else None}
    return run, result


def score_zero_cost(run: ProxyRun, result: ProxyResult) -> None:
    """Stage 2: zero-cost scores of the student as inherited."""
    t0 = time.perf_counter()
    result.zero_cost = zero_cost_scores(run.student, run.pipe.unet, run.data, run.scheduler, seed=run.settings.seed)
    result.zero_cost_seconds = round(time.perf_counter() - t0, 3)


def distill_config(s: ProxySettings, steps: int | None = None, checkpoint_every: int = 0) -> DistillConfig:
    """The proxy's distillation recipe (``steps`` defaults to ``s.distill_steps``)."""
    return DistillConfig(steps=s.distill_steps if steps is None else steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                         weights=s.weights, lr_schedule=s.lr_schedule, lr_warmup_steps=s.lr_warmup_steps,
                         checkpoint_every=checkpoint_every, keep_checkpoints=1)


def distill_student(run: ProxyRun, result: ProxyResult, progress: bool = False, checkpoint_dir: str | Path | None = None,
                    save_checkpoint: bool = True) -> None:
    """Stage 3: the short distillation; a failed run sets the result's status and reason.

    With ``checkpoint_dir`` the run continues from the checkpoint there when there is one (same
    candidate, teacher and data, else a one-line error) and, with ``save_checkpoint``, leaves its end
    state there, so that a later call with more ``distill_steps`` continues it (a multi-fidelity
    study's promotion). With the proxy's length-free learning rate the result equals a run of that many
    steps from the start."""
    s = run.settings
    every = s.distill_steps if checkpoint_dir is not None and save_checkpoint else 0
    cfg = distill_config(s, checkpoint_every=every)
    perc, dec = perceptual_term(run.pipe, run.teacher, device=run.device) if s.weights.perceptual > 0 else (None, None)
    identity = {"candidate": run.plan.candidate.key, "teacher": run.teacher.fingerprint, "data": run.data.source}
    res = distill(run.student, run.pipe.unet, run.plan, run.data, run.scheduler, cfg, progress=progress,
                  perceptual=perc, decode=dec, checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None,
                  identity=identity if checkpoint_dir is not None else None)
    result.status, result.reason = RunStatus(res.status), res.reason
    result.distill = {"distill_seconds": round(res.seconds, 2),
                      "distill_final_loss": res.curve[-1]["loss"] if res.curve else None, "feature_rule": res.feature_rule}
    if checkpoint_dir is not None:
        result.distill["resumed_from_step"] = res.resumed_from


def score_heldout(run: ProxyRun, result: ProxyResult) -> None:
    """Stage 4: the held-out output MSE of the distilled student (the ranking score)."""
    result.heldout = heldout_score(run.student, run.pipe, run.scheduler, run.settings, run.heldout)


def score_samples(run: ProxyRun, result: ProxyResult, keep_images: bool = False) -> None:
    """Stage 5: sampling scores against the teacher's samples and real images."""
    ev = evaluate_student(run.teacher, run.pipe, run.student, run.settings, run.sampler_steps, run.guidance,
                          device=run.device, return_images=keep_images, eval_set=run.eval_set)
    result.images = ev.pop("images", None)
    result.evaluation = ev


def run_proxy(teacher: Teacher | str, candidate: Any, settings: ProxySettings | None = None, base: str | None = None,
              device: str = "cpu", until: Stage = Stage.SAMPLES, progress: bool = False, keep_images: bool = False,
              prefilter: Callable[[dict[str, float]], str | None] | None = None, checkpoint_dir: str | Path | None = None,
              save_checkpoint: bool = True) -> ProxyResult:
    """Score one candidate up to stage ``until``. ``prefilter`` sees the zero-cost scores first and
    returns a reason to skip the candidate (status ``skipped``) or None. ``checkpoint_dir`` and
    ``save_checkpoint``: see :func:`distill_student`."""
    run, result = prepare(teacher, candidate, settings, base, device, sampling=until >= Stage.SAMPLES)
    score_zero_cost(run, result)
    if prefilter is not None and (why := prefilter(result.zero_cost)):
        result.status, result.reason = RunStatus.SKIPPED, why
        return result
    if until <= Stage.ZERO_COST:
        return result
    distill_student(run, result, progress=progress, checkpoint_dir=checkpoint_dir, save_checkpoint=save_checkpoint)
    if not result.ok or until <= Stage.DISTILL:
        return result
    score_heldout(run, result)
    if until >= Stage.SAMPLES:
        score_samples(run, result, keep_images=keep_images)
    return result
