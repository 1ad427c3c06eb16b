"""The final training of a chosen candidate: a long distillation from the teacher, with periodic
checkpoints and resume, exported at the end so that it loads back exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler

from hybridsd_nas.build import student_of
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.cost import estimate_cost
from hybridsd_nas.distill.data import DistillData, fashion_mnist_data, folder_data, teacher_sample_data
from hybridsd_nas.distill.losses import perceptual_term
from hybridsd_nas.distill.trainer import DistillConfig, DistillResult, distill
from hybridsd_nas.export import export_unet
from hybridsd_nas.sources import Teacher

DATA_SOURCES = ("fashion-mnist", "teacher-samples", "a folder of image-caption pairs")


def distill_data(pipe, teacher: Teacher, spec: str | None, seed: int = 0) -> DistillData:
    """The training data a spec names: ``fashion-mnist`` (the default), ``teacher-samples`` (the
    teacher's own samples on its evaluation prompts), or a folder of image-caption pairs."""
    if spec in (None, "default", "fashion-mnist"):
        return fashion_mnist_data(pipe, n=4096, seed=seed)
    if spec == "teacher-samples":
        prompts = [r["prompt"] for r in teacher.eval_prompts()] if teacher.has_eval_prompts else ["a photo"]
        return teacher_sample_data(pipe, prompts, n=256, seed=seed)
    return folder_data(pipe, spec)


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
                      data: str | None = None, base_unet: str | None = None, device: str = "cpu", resume: bool = False,
                      overwrite: bool = False, perceptual_net: str | None = None, progress: bool = True) -> FinalTraining:
    """Distil ``candidate`` from ``teacher`` for ``config.steps`` steps, checkpointing into
    ``OUT.work`` every ``config.checkpoint_every`` steps (``resume`` picks up from there), and export
    the student to ``out`` when the run ends ok."""
    d = student_of(teacher, candidate, base_unet=base_unet, device=device)
    t, pipe, p, student, cand = d.teacher, d.pipe, d.plan, d.student, d.plan.candidate
    train = distill_data(pipe, t, data, config.seed)
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
                              "loss_curve": res.curve})
    return FinalTraining(res, Path(path), work, train.source, cand.label)
