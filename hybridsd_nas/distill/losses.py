"""Distillation losses: task, output KD, feature KD at every down/up block output (BK-SDM), mid-block
output supervision (A-SDM's semantic-aware supervision), and an optional perceptual term.

Feature maps are paired by rule, and the rule is reported: a student block is paired with the
teacher block it was built from (the plan's mapping, so BK-SDM-Tiny's up0 pairs with the teacher's
up1); a teacher block the student lacks (removed stage, removed mid block) is skipped; a pair whose
shapes differ is skipped. Channel pruning here cuts inner widths only, so block outputs keep their
shapes and stay paired.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridsd_nas.arch import Plan
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.metrics.adherence import load_classifier
from hybridsd_nas.sources import Teacher, resolve_teacher


@dataclass
class LossWeights:
    task: float = 1.0  # MSE(student's prediction, the scheduler's target: the noise, or the velocity for v_prediction)
    out_kd: float = 1.0  # MSE(student's prediction, teacher's prediction)
    feat_kd: float = 1.0  # sum over paired down/up block outputs
    mid: float = 0.0  # MSE of mid-block outputs (A-SDM)
    perceptual: float = 0.0  # frozen feature network on predicted clean images

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FeaturePair:
    student: str  # module path in the student
    teacher: str  # module path in the teacher
    kind: str  # "block" or "mid"
    status: str = "paired"  # or "skipped: <reason>"


@dataclass
class FeatureTaps:
    """Forward hooks that keep the outputs of the paired blocks of a student and its teacher: only
    inside :meth:`recording` (so a forward recomputed by gradient checkpointing, or any other forward,
    keeps nothing), and only until :func:`feature_losses` has read them."""

    pairs: list[FeaturePair]
    student_out: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_out: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    active: bool = True  # hooks keep outputs; ``recording`` turns this on for a block only

    @contextmanager
    def recording(self) -> Iterator[None]:
        was, self.active = self.active, True
        try:
            yield
        finally:
            self.active = was

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def report(self) -> list[dict[str, str]]:
        return [asdict(p) for p in self.pairs]


def predicted_x0(prediction_type: str, noisy: torch.Tensor, pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean latents a model output implies at noise level ``alpha_bar`` (broadcastable):
    ``epsilon``: (x_t - sqrt(1 - a) eps) / sqrt(a); ``v_prediction``: sqrt(a) x_t - sqrt(1 - a) v."""
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * pred
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; supported: epsilon, v_prediction")


def x0_error(prediction_type: str, err: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The squared error of the implied clean latents, from the squared error ``err`` of two model
    outputs on the same noisy latents: x (1 - a) / a for ``epsilon``, x (1 - a) for ``v_prediction``."""
    if prediction_type == "epsilon":
        return err * (1 - alpha_bar) / alpha_bar
    if prediction_type == "v_prediction":
        return err * (1 - alpha_bar)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; supported: epsilon, v_prediction")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def feature_pairs(plan: Plan, student_has_mid: bool, teacher_has_mid: bool) -> list[FeaturePair]:
    pairs = [FeaturePair(bp.student_path, bp.base.path, "block") for bp in plan.down + plan.up]
    kept_down = {bp.base.path for bp in plan.down}
    kept_up = {bp.base.path for bp in plan.up}
    for b in plan.arch.down:
        if b.path not in kept_down:
            pairs.append(FeaturePair("-", b.path, "block", "skipped: the student has no such block (stage removed)"))
    for b in plan.arch.up:
        if b.path not in kept_up:
            pairs.append(FeaturePair("-", b.path, "block", "skipped: the student has no such block (stage removed)"))
    if teacher_has_mid:
        if student_has_mid:
            pairs.append(FeaturePair("mid_block", "mid_block", "mid"))
        else:
            pairs.append(FeaturePair("-", "mid_block", "mid", "skipped: the student has no mid block"))
    return pairs


def attach_taps(student: nn.Module, teacher: nn.Module, plan: Plan, kinds: set[str] | None = None) -> FeatureTaps:
    """Hooks on the paired blocks of ``kinds`` ("block", "mid"; default both): the pairs a loss with
    weight 0 does not read are reported but not hooked. With ``kinds`` given, the hooks keep outputs
    only inside ``taps.recording()``."""
    taps = FeatureTaps(feature_pairs(plan, student.mid_block is not None, teacher.mid_block is not None))
    if kinds is not None:
        taps.active = False
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    for p in taps.pairs:
        if p.status != "paired" or (kinds is not None and p.kind not in kinds):
            continue
        def keep(store, key):
            def hook(_m, _a, out):
                if taps.active:
                    store[key] = _first(out)
            return hook
        taps.handles.append(s_mods[p.student].register_forward_hook(keep(taps.student_out, p.student)))
        taps.handles.append(t_mods[p.teacher].register_forward_hook(keep(taps.teacher_out, p.teacher)))
    return taps


def feature_losses(taps: FeatureTaps) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sum of block-output MSEs, mid-block MSE) from the last forward of both models."""
    feat, mid = None, None
    for p in taps.pairs:
        if p.status != "paired":
            continue
        s, t = taps.student_out.get(p.student), taps.teacher_out.get(p.teacher)
        if s is None or t is None:
            continue
        if s.shape != t.shape:
            p.status = f"skipped: shapes differ (student {tuple(s.shape)}, teacher {tuple(t.shape)})"
            continue
        loss = F.mse_loss(s.float(), t.float())
        if p.kind == "mid":
            mid = loss
        else:
            feat = loss if feat is None else feat + loss
    taps.student_out.clear()
    taps.teacher_out.clear()
    return feat, mid


def perceptual_term(pipe, teacher: "Teacher | str", net: str | None = None, device: str | torch.device = "cpu"):
    """``(perceptual, decode)`` for :func:`hybridsd_nas.distill.distill`'s perceptual loss.

    ``decode`` maps latents to images in [0, 1] through the pipeline's VAE decoder (frozen);
    ``perceptual`` maps images to the features of a frozen classifier (a directory with
    ``model.safetensors`` + ``config.json``, as the embedded teacher's ``eval_classifier``; the
    default is the one in the ``teacher`` pipeline's directory). The loss is the MSE between the features of the student's and
    the teacher's predicted clean images.
    """

    if net is None:
        default = resolve_teacher(teacher).classifier_dir
        net = str(default) if default is not None else f"{teacher}/eval_classifier"
    if not Path(net).is_dir():
        raise HybridSDError(f"perceptual network {net!r} is not a directory; give a classifier directory "
                            "(model.safetensors + config.json, e.g. the tiny teacher's eval_classifier)")
    clf = load_classifier(net).to(device).eval().requires_grad_(False)
    vae = pipe.vae.eval().requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    res = clf.resolution

    def decode(latents: torch.Tensor) -> torch.Tensor:
        img = vae.decode(latents / scale, return_dict=False)[0]
        return ((img.float().clamp(-1, 1) + 1) / 2)

    def perceptual(images: torch.Tensor) -> torch.Tensor:
        x = images.mean(1, keepdim=True)
        if x.shape[-1] != res:
            x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
        return clf.features(x).flatten(1)

    return perceptual, decode
