"""Importance criteria: which units (GroupNorm groups, heads, feed-forward channels) to keep.

A criterion is a callable ``fn(model, groups, ctx) -> list[Tensor]``: for every group (one
prunable module, see :class:`hybridsd_nas.prune._engine.Group`) a 1-D tensor with one score per
unit, higher = more important. It runs on the unpruned student, before anything is cut, and must
leave the model as it found it (weights, ``requires_grad``, grads, mode). Register new ones with
:func:`register_importance`; :data:`IMPORTANCE` maps names to callables.

- ``magnitude``: L2 norm of all the weights that belong to the unit (the output rows of the
  producing layers, their biases and norm affine parameters, and the input columns of the
  consuming layer). Needs no data.
- ``taylor``: first-order Taylor, ``sum |w * dL/dw|`` over the unit's weights, accumulated over
  ``calib_batches`` batches of ``L = MSE(student(x), teacher(x))`` (the distillation loss). Needs
  ``teacher`` and ``example_inputs``. When the student computes exactly the teacher's function on a
  batch (pruning a student with no other edit: the loss and every gradient are zero), the target of
  that batch becomes ``teacher(x) + n`` with seeded Gaussian ``n`` of the output's standard
  deviation, so the score measures how strongly the output depends on the unit (noted in the
  record).
- ``latent-stats`` (LD-Pruner, as Hybrid SD scores its layers): remove one unit at a time (by
  zeroing its input channels at the consuming layer, which equals removing it: see
  :func:`hybridsd_nas.prune.masking`) and measure how far the U-Net output's statistics move:
  ``mean over samples and latent channels of |d mean| + |d std|`` (over the spatial positions),
  summed over the calibration batches. Cost: one forward of the calibration batch per unit scored
  (``units x calib_batches`` forwards, run ``latent_chunk`` units at a time in one batched
  forward); only modules whose ratio is below 1 are scored. On the tiny test config that is about
  300 forwards for ResNet groups and heads everywhere, and ~3,500 more for feed-forward channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.prune._targets import param_of, per_channel

ImportanceFn = Callable[[nn.Module, list, "Context"], list[torch.Tensor]]
IMPORTANCE: Registry[ImportanceFn] = Registry("importance criterion")


@dataclass
class Context:
    """What a criterion may use: calibration batches (U-Net forward kwargs), the teacher, a seed."""

    batches: list[dict[str, Any]]
    teacher: nn.Module | None
    seed: int = 0
    latent_chunk: int = 8
    notes: list[str] = field(default_factory=list)


def register_importance(name: str, *, help: str = "", replace: bool = False):
    """Decorator: register a criterion under ``name``; candidates, spaces and the CLI accept it at once."""
    return IMPORTANCE.register(name, help=help, replace=replace)


def get_importance(name: str) -> ImportanceFn:
    return IMPORTANCE.get(name)


def _per_unit(channel_scores: torch.Tensor, units: int) -> torch.Tensor:
    return channel_scores.reshape(units, -1).sum(1)


@register_importance("magnitude", help="L2 norm of the weights that belong to each unit (no data)")
@torch.no_grad()
def magnitude(model: nn.Module, groups: list, ctx: Context) -> list[torch.Tensor]:
    out = []
    for g in groups:
        sq = per_channel(g.module, g.target, lambda s, m=g.module: param_of(m, s).detach().float().pow(2))
        out.append(_per_unit(sq, g.units).sqrt())
    return out


def _forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(**batch, return_dict=False)[0]


def _need_data(name: str, ctx: Context, teacher: bool) -> None:
    missing = []
    if not ctx.batches:
        missing.append("example_inputs= (U-Net forward kwargs, e.g. hybridsd_nas.cost.unet_inputs(config, ..., device='cpu'))")
    if teacher and ctx.teacher is None:
        missing.append("teacher= (the U-Net to distil from)")
    if missing:
        raise HybridSDError(f"importance {name!r} needs {' and '.join(missing)}; or use importance 'magnitude', which needs no data")


@register_importance("taylor", help="first-order Taylor |w * dL/dw| of the distillation loss on calibration batches")
def taylor(model: nn.Module, groups: list, ctx: Context) -> list[torch.Tensor]:
    _need_data("taylor", ctx, teacher=True)
    params = {id(p): p for g in groups for p in g.module.parameters()}
    all_params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in all_params]
    training = model.training
    acc = [torch.zeros(g.units, dtype=torch.float64) for g in groups]
    try:
        model.eval()
        for p in all_params:
            p.requires_grad_(id(p) in params)
            p.grad = None
        for i, b in enumerate(ctx.batches):
            with torch.no_grad():
                target = _forward(ctx.teacher, b).float()
            with torch.enable_grad():
                out = _forward(model, b).float()
                loss = F.mse_loss(out, target)
                if loss.item() <= 1e-12 * float(target.pow(2).mean()):
                    gen = torch.Generator().manual_seed(ctx.seed + i)
                    noise = torch.randn(target.shape, generator=gen).to(target) * target.std()
                    loss = F.mse_loss(out, target + noise)
                    note = "taylor: the student equals the teacher on the calibration batches; target = teacher output + seeded noise"
                    if note not in ctx.notes:
                        ctx.notes.append(note)
                loss.backward()
            for g, a in zip(groups, acc):
                def wg(s, m=g.module):
                    p = param_of(m, s)
                    return None if p.grad is None else (p.detach() * p.grad).abs()

                a += _per_unit(per_channel(g.module, g.target, wg), g.units)
            for p in params.values():
                p.grad = None
    finally:
        for p, rg, grad in flags:
            p.requires_grad_(rg)
            p.grad = grad
        model.train(training)
    return acc


def _repeat_batch(x: Any, k: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() > 0 else x
    if isinstance(x, Mapping):
        return {key: _repeat_batch(v, k) for key, v in x.items()}
    return x


def _stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = out.float().flatten(2)
    return flat.mean(2), flat.std(2)


@contextlib.contextmanager
def _masks(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Multiply the input of each module path in ``masks`` by its mask (broadcast)."""
    hooks = []

    def hook(mask):
        def h(mod, args):
            return (args[0] * mask.to(args[0]),) + tuple(args[1:])

        return h

    try:
        for path, mask in masks.items():
            hooks.append(model.get_submodule(path).register_forward_pre_hook(hook(mask)))
        yield
    finally:
        for h in hooks:
            h.remove()


def _mask_shape(consumer: nn.Module, rows: int, width: int) -> tuple[int, ...]:
    if isinstance(consumer, nn.Conv2d):
        return (rows, width, 1, 1)
    return (rows, 1, width)  # Linear on (batch, tokens, width)


@register_importance("latent-stats", help="LD-Pruner: shift of the output statistics when the unit is removed")
@torch.no_grad()
def latent_stats(model: nn.Module, groups: list, ctx: Context) -> list[torch.Tensor]:
    _need_data("latent-stats", ctx, teacher=False)
    units = [(gi, u) for gi, g in enumerate(groups) for u in range(g.units)]
    acc = [torch.zeros(g.units, dtype=torch.float64) for g in groups]
    k_max = max(1, int(ctx.latent_chunk))
    training = model.training
    model.eval()
    try:
        for b in ctx.batches:
            mu0, sd0 = _stats(_forward(model, b))
            bsz = mu0.shape[0]
            for start in range(0, len(units), k_max):
                chunk = units[start:start + k_max]
                k = len(chunk)
                masks: dict[str, torch.Tensor] = {}
                for r, (gi, u) in enumerate(chunk):
                    g = groups[gi]
                    path = f"{g.path}.{g.target.consumer(g.module)}"
                    if path not in masks:
                        masks[path] = torch.ones(k, g.units * g.unit)
                    masks[path][r, u * g.unit:(u + 1) * g.unit] = 0
                full = {}
                for path, m in masks.items():
                    consumer = model.get_submodule(path)
                    full[path] = m.repeat_interleave(bsz, 0).reshape(_mask_shape(consumer, k * bsz, m.shape[1]))
                with _masks(model, full):
                    out = _forward(model, _repeat_batch(b, k))
                mu, sd = _stats(out)
                shift = ((mu - mu0.repeat(k, 1)).abs() + (sd - sd0.repeat(k, 1)).abs()).reshape(k, bsz, -1).mean((1, 2))
                for r, (gi, u) in enumerate(chunk):
                    acc[gi][u] += float(shift[r])
    finally:
        model.train(training)
    return acc
