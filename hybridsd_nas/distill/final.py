"""The final training of a chosen candidate: a long distillation from the teacher, with periodic
checkpoints and resume, exported at the end so that it loads back exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler

from hybridsd_nas.build import student_of
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.cost import estimate_cost
from hybridsd_nas.data import SPEC_FORMS, DataSpec, encode_source, parse_data_spec, validate_source
from hybridsd_nas.data.evalset import teacher_default_data
from hybridsd_nas.distill.data import DistillData
from hybridsd_nas.distill.losses import perceptual_term
from hybridsd_nas.distill.trainer import DistillConfig, DistillResult, distill
from hybridsd_nas.export import export_unet
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
    the run did not end ok: its last checkpoint stays in ``work_dir``), and the data it trained on."""

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


def distill_candidate(teacher: Teacher | str, candidate: Any, out: str | Path, config: DistillConfig,
                      data: str | DataSpec | None = None, base_unet: str | None = None, device: str = "cpu",
                      resume: bool = False, overwrite: bool = False, perceptual_net: str | None = None, progress: bool = True,
                      resize: bool = False) -> FinalTraining:
    """Distil ``candidate`` from ``teacher`` for ``config.steps`` steps, checkpointing into
    ``OUT.work`` every ``config.checkpoint_every`` steps (``resume`` picks up from there), and export
    the student to ``out`` when the run ends ok. The data (any spec, see :func:`data_spec`; ``resize``
    upscales images smaller than the resolution) is checked before the teacher is loaded."""
    t = resolve_teacher(teacher)
    spec = checked_data_spec(data, t, resize)
    d = student_of(t, candidate, base_unet=base_unet, device=device)
    pipe, p, student, cand = d.pipe, d.plan, d.student, d.plan.candidate
    train = distill_data(pipe, t, spec, config.seed, resize, progress=progress)
    work = Path(out).with_name(Path(out).name + ".work")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    perc, dec = perceptual_term(pipe, t, perceptual_net, device=device) if config.weights.perceptual > 0 else (None, None)
    res = distill(student, pipe.unet, p, train, sched, config, progress=progress, checkpoint_dir=work, resume=resume,
                  perceptual=perc, decode=dec)
    if res.status != RunStatus.OK:
        return FinalTraining(res, None, work, train.source, cand.label)
    cost = estimate_cost(t.path, cand, arch=p.arch).to_dict()
    path = export_unet(student, p, out, teacher_id=t.spec, cost=cost, overwrite=overwrite,
                       extra={"distill": {k: v for k, v in res.as_dict().items() if k != "curve"}, "data": train.source,
                              "data_provenance": train.provenance, "loss_curve": res.curve})
    return FinalTraining(res, Path(path), work, train.source, cand.label)
