"""The final training of a chosen candidate: a long distillation from the teacher, with periodic
checkpoints and resume, exported at the end so that it loads back exactly."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from diffusers import DDPMScheduler
from torch import nn

from hybridsd_nas.arch import describe, resolve_candidate
from hybridsd_nas.build import student_of
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.cost import estimate_cost
from hybridsd_nas.data import SPEC_FORMS, DataSpec, encode_source, parse_data_spec, validate_source
from hybridsd_nas.data.evalset import EvalSet, resolve_eval_set, teacher_default_data
from hybridsd_nas.distill.data import DistillData
from hybridsd_nas.distill.losses import perceptual_term
from hybridsd_nas.distill.trainer import (
    CHECKPOINTS,
    HALF,
    DistillConfig,
    DistillResult,
    averaged_weights,
    check_precision,
    check_resume,
    checkpoints,
    distill,
    has_moving_average,
    micro_batch,
    refuse_fresh_start,
)
from hybridsd_nas.export import export_unet
from hybridsd_nas.metrics.evaluation import SampleScorer
from hybridsd_nas.metrics.sampling import generate, save_grid, teacher_samples
from hybridsd_nas.sources import Teacher, resolve_teacher

DATA_SOURCES = (*SPEC_FORMS, "teacher-samples")
FASHION_MNIST_IMAGES = 4096  # Fashion-MNIST images of a final training unless the spec says ?limit=
TEACHER_SAMPLES = 256  # samples of the teacher's evaluation prompts for teacher-samples


def data_spec(spec: str | DataSpec | None, teacher: Teacher, resize: bool = False) -> DataSpec:
    """The source a ``--data`` string names: any data spec (:func:`hybridsd_nas.data.parse_data_spec`;
    Fashion-MNIST with 4096 images unless it says ``?limit=``), or ``teacher-samples``: 256 samples of
    the teacher's evaluation prompts. Without one, the teacher's own (``data`` in its
    ``evaluation.json``: Fashion-MNIST for the embedded ``tiny``); a teacher with none needs one named."""
    if spec is None:
        spec = teacher_default_data(teacher)
        if spec is None:
            raise ConfigError(f"teacher {teacher.spec!r} names no training data of its own; give one: --data SPEC "
                              f"(data: in a study), one of {', '.join(DATA_SOURCES)}")
    if isinstance(spec, DataSpec):
        s = spec
    elif spec == "teacher-samples":
        prompts = teacher.asset("eval_prompts.json")
        if prompts is None:
            raise ConfigError(f"teacher {teacher.spec!r} ships no eval_prompts.json for teacher-samples; "
                              "name a prompt file instead: --data prompts:FILE")
        s = parse_data_spec(f"prompts:{prompts}", resize).with_defaults(count=TEACHER_SAMPLES)
    else:
        s = parse_data_spec(spec, resize)
    return s.with_defaults(limit=FASHION_MNIST_IMAGES) if s.kind == "fashion-mnist" else s


def teacher_resolution(teacher: Teacher) -> int | None:
    """The resolution the teacher's data is encoded at (its VAE's ``sample_size``), read from its
    directory without loading it; None where it has no local VAE config."""
    cfg = teacher.local_dir / "vae" / "config.json" if teacher.local_dir else None
    if cfg is None or not cfg.is_file():
        return None
    size = json.loads(cfg.read_text()).get("sample_size")
    return int(size[0] if isinstance(size, list) else size) if size else None


def checked_data_spec(spec: str | DataSpec | None, teacher: Teacher, resize: bool = False) -> DataSpec:
    """:func:`data_spec`, then the whole source checked at the teacher's resolution (one-line
    ConfigErrors), before any model is loaded."""
    s = data_spec(spec, teacher, resize)
    validate_source(s, teacher_resolution(teacher), resize)
    return s


def distill_data(pipe, teacher: Teacher, spec: str | DataSpec | None, seed: int = 0, resize: bool = False,
                 progress: bool = False) -> DistillData:
    """The training data a spec names (see :func:`data_spec`), encoded by ``pipe`` (cached on disk)."""
    return encode_source(data_spec(spec, teacher, resize), pipe, seed=seed, sampling=teacher.sampling_settings(),
                         progress=progress)


@dataclass
class FinalTraining:
    """What :func:`distill_candidate` did: the distillation's result, where the export went (None when
    the run did not end ok, or in a process other than the main one: the last checkpoint stays in
    ``work_dir``), and the data it trained on."""

    result: DistillResult
    out: Path | None
    work_dir: Path
    data: str
    label: str

    @property
    def ok(self) -> bool:
        return self.result.status == RunStatus.OK

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.result.status, "reason": self.result.reason, "out": str(self.out) if self.out else None,
                "work_dir": str(self.work_dir), "data": self.data, "candidate": self.label,
                **{k: v for k, v in self.result.as_dict().items() if k not in ("curve", "status", "reason")}}


def training_device(device: str = "auto") -> torch.device:
    """The device this process trains on: ``auto`` is accelerate's (the process's GPU, else the CPU);
    in several processes of ``accelerate launch`` on GPUs each takes its own (``cuda:LOCAL_RANK``)
    whatever ``cuda`` device was named; otherwise ``device``."""
    state = PartialState(cpu=device == "cpu")
    if device == "auto" or (state.num_processes > 1 and device.startswith("cuda")):
        return state.device
    return torch.device(device)


def validator(t: Teacher, pipe, eval_set: EvalSet, samples: int, seed: int, out_dir: Path, device: str | torch.device,
              averaged: bool = False) -> Callable[[int, nn.Module], dict[str, Any]]:
    """``validate(step, student)`` for :func:`distill`: the student's samples on the first ``samples``
    rows of the evaluation set (fixed seeds, the teacher's sampler settings) against the teacher's
    samples on the same rows: FID and KID (and, where the set allows, adherence and FID against real
    images), and a grid of the first 32 samples in ``out_dir/step-NNNNNNN.png``. The teacher's
    samples are made now, while the teacher is still in float32. With ``averaged`` the student is
    scored holding its moving average."""
    steps, guidance = t.sampling_settings()
    rows = eval_set.rows(samples)
    t_imgs = teacher_samples(t, pipe, [r["prompt"] for r in rows], seed, steps, guidance)
    scorer = SampleScorer(eval_set, rows, t_imgs, device=str(device), kid_subset=min(50, samples), seed=seed)

    def validate(step: int, student: nn.Module) -> dict[str, Any]:
        t0 = time.perf_counter()
        # during the run the average is swapped in; at the end the student already holds it
        with averaged_weights(student) if averaged and has_moving_average(student) else contextlib.nullcontext():
            imgs = generate(pipe, student, scorer.prompts, seed, steps, guidance)
        out_dir.mkdir(parents=True, exist_ok=True)
        grid = save_grid(imgs[:32], out_dir / f"step-{step:07d}.png")
        figs = scorer(imgs)
        return {"fid_teacher": figs.pop("fid"), "kid_teacher": figs.pop("kid"), **figs, "samples": len(imgs),
                "sampler_steps": steps, "guidance": guidance, "grid": str(grid),
                "seconds": round(time.perf_counter() - t0, 2)}

    return validate


def training_card(label: str, t: Teacher, data: str, res: DistillResult, cost: dict[str, Any], hours: float) -> str:
    """The exported student's model card: what it was distilled from, on what, for how long, and how."""
    c, tp = res.config, res.throughput or {}
    images = res.steps_done * c["batch_size"]
    lines = [f"# {label}", "", f"A student U-Net distilled from `{t.spec}` (fingerprint `{t.fingerprint}`) by hybridsd_nas.", "",
             "## Training", "",
             f"- Data: {data}",
             f"- Steps: {res.steps_done} at a global batch of {c['batch_size']} ({images} images seen), "
             f"{hours:.2f} h of this run's wall time",
             f"- Layout: {tp.get('processes', 1)} process(es) on {tp.get('device', '?')}, micro-batch {tp.get('micro_batch', '?')}, "
             f"gradient accumulation {c['gradient_accumulation']}, mixed precision {c['mixed_precision']}, "
             f"gradient checkpointing {c['gradient_checkpointing']}",
             f"- Optimizer: {c['optimizer']}, lr {c['lr']} ({c['lr_schedule']}, warm-up {c['lr_warmup_steps']}), "
             f"weight decay {c['weight_decay']}, gradient clip {c['grad_clip']}, guidance dropout {c['p_uncond']}, seed {c['seed']}",
             f"- Losses: {', '.join(f'{k} x{v}' for k, v in c['weights'].items() if v)}",
             f"- Exported weights: {'EMA, decay ' + str(c['ema_decay']) if res.ema else 'the last step'}",
             f"- Throughput: {tp.get('images_per_s')} images/s over {tp.get('steps')} steps of the last stretch",
             f"- Cost: {cost.get('params', 0) / 1e6:.2f} M params, {cost.get('macs', 0) / 1e9:.2f} GMACs per U-Net forward"]
    if res.curve:
        last = res.curve[-1]
        lines.append(f"- Final loss {last['loss']:.4g} at step {last['step']} "
                     f"({', '.join(f'{k} {v:.4g}' for k, v in last.items() if k not in ('step', 'loss', 'lr'))})")
    if res.validation:
        v = res.validation[-1]
        shown = {k: v[k] for k in ("fid_teacher", "kid_teacher", "fid_real", "adherence", "adherence_teacher") if k in v}
        lines += ["", "## Validation", "",
                  f"At step {v['step']}, {v.get('samples')} samples ({v.get('sampler_steps')} steps, guidance {v.get('guidance')}): "
                  + ", ".join(f"{k} {val:.4g}" for k, val in shown.items()) + "."]
    lines += ["", "Load it with `hybridsd_nas.load_unet(path)` (or diffusers' `UNet2DConditionModel.from_pretrained` "
              "where `hybridsd_nas.json` says `format: diffusers`).", ""]
    return "\n".join(lines)


def distill_candidate(teacher: Teacher | str, candidate: Any, out: str | Path, config: DistillConfig,
                      data: str | DataSpec | None = None, base_unet: str | None = None, device: str = "cpu",
                      resume: bool = False, overwrite: bool = False, perceptual_net: str | None = None, progress: bool = True,
                      resize: bool = False, log_with: Sequence[Any] | None = None, validation_samples: int = 64,
                      eval_prompts: str | Path | None = None, classifier: str | Path | None = None) -> FinalTraining:
    """Distil ``candidate`` from ``teacher`` for ``config.steps`` steps and export the student to
    ``out`` when the run ends ok. The library form of ``hybridsd-nas distill``, and the loop the
    study's proxy runs short.

    Checked before any model loads (one-line ConfigErrors): the data (any spec, see
    :func:`data_spec`; ``resize`` upscales images smaller than the resolution), the mixed precision
    on this device, the global batch against processes x accumulation, an existing ``out`` without
    ``overwrite``, and the run directory ``OUT.work``: a resume must find a checkpoint of the same
    candidate, teacher, data and recipe; a fresh start must not find one (``overwrite`` removes it).

    Checkpoints go to ``OUT.work/checkpoints`` every ``config.checkpoint_every`` steps; trackers
    (``log_with``) to ``OUT.work/logs``; with ``config.validate_every`` a validation pass on
    ``validation_samples`` rows of the evaluation set (``eval_prompts``, else the teacher's own)
    writes grids to ``OUT.work/validation``. Under ``accelerate launch`` every process trains its
    slice of each global batch and the main process exports. With mixed precision the teacher runs
    frozen in that precision."""
    t = resolve_teacher(teacher)
    spec = checked_data_spec(data, t, resize)
    dev = training_device(device)
    check_precision(config.mixed_precision, dev)
    state = PartialState()
    micro_batch(config, state.num_processes)
    arch = describe(t.path)
    cand = resolve_candidate(candidate, arch)
    out = Path(out)
    work = out.with_name(out.name + ".work")
    identity = {"candidate": cand.key, "teacher": t.fingerprint, "data": spec.describe()}
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if resume:
        check_resume(work, config, identity)
    elif checkpoints(work):
        if not overwrite:
            refuse_fresh_start(work)
        if state.is_main_process:
            shutil.rmtree(work / CHECKPOINTS)
        state.wait_for_everyone()
    es = resolve_eval_set(t, eval_prompts, classifier) if config.validate_every else None
    d = student_of(t, cand, base_unet=base_unet, device=str(dev))
    pipe, p, student = d.pipe, d.plan, d.student
    train = distill_data(pipe, t, spec, config.seed, resize, progress=progress and state.is_main_process)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    perc, dec = perceptual_term(pipe, t, perceptual_net, device=dev) if config.weights.perceptual > 0 else (None, None)
    validate = None
    if es is not None and state.is_main_process:
        validate = validator(t, pipe, es, validation_samples, config.seed, work / "validation", dev,
                             averaged=bool(config.ema_decay))
    if config.mixed_precision != "no":  # the frozen teacher in half precision (after its float32 validation samples)
        pipe.unet.to(dtype=HALF[config.mixed_precision])
    t0 = time.perf_counter()
    res = distill(student, pipe.unet, p, train, sched, config, progress=progress, checkpoint_dir=work, resume=resume,
                  perceptual=perc, decode=dec, validate=validate, log_with=log_with, identity=identity)
    if res.status != RunStatus.OK or not state.is_main_process:
        return FinalTraining(res, None, work, train.source, cand.label)
    cost = estimate_cost(t.path, cand, arch=p.arch).to_dict()
    card = training_card(cand.label, t, train.source, res, cost, (time.perf_counter() - t0) / 3600)
    path = export_unet(student, p, out, teacher_id=t.spec, cost=cost, overwrite=overwrite, card=card,
                       extra={"distill": {k: v for k, v in res.as_dict().items() if k != "curve"}, "data": train.source,
                              "data_provenance": train.provenance, "teacher_fingerprint": t.fingerprint,
                              "loss_curve": res.curve})
    return FinalTraining(res, Path(path), work, train.source, cand.label)
