"""Channel pruning of a built student: collect the groups, score, round, cut, repair, record."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.prune._importance import Context, _mask_shape, _masks, get_importance
from hybridsd_nas.prune._record import GroupRecord, PruneRecord
from hybridsd_nas.prune._targets import TARGETS, Target, channels_of


@dataclass
class Group:
    """One prunable module of the student and what the candidate asks of it."""

    target: Target
    stage: str
    block: str
    path: str
    module: nn.Module
    units: int
    unit: int  # channels per unit
    asked: float
    kept: int


def keep_count(ratio: float, units: int) -> int:
    """Units kept for a keep ratio: round half up, at least one, at most all."""
    return max(1, min(units, math.floor(ratio * units + 0.5)))


def stage_of(p, bp) -> str:
    """Stage key of a block plan: ``stageN`` (down block N and its mirror up block) or ``mid``."""
    kind = bp.base.kind
    if kind == "mid":
        return "mid"
    i = bp.base.index
    return f"stage{i}" if kind == "down" else f"stage{p.arch.n_stages - 1 - i}"


def collect_groups(model: nn.Module, p) -> list[Group]:
    """Every module of a target whose stage asks a keep ratio below 1, in module order."""
    groups: list[Group] = []
    for bp in p.blocks:
        stage = stage_of(p, bp)
        ratios = p.candidate.prune_ratios(stage)
        try:
            blk = model.get_submodule(bp.student_path)
        except AttributeError:
            raise HybridSDError(f"prune: the model has no {bp.student_path} ({bp.name}); was it built from this plan?") from None
        for name, m in blk.named_modules():
            for t in TARGETS.values():
                r = ratios.get(t.name, 1.0)
                if r < 1.0 and t.matches(m):
                    n, unit = t.units(m)
                    path = f"{bp.student_path}.{name}" if name else bp.student_path
                    groups.append(Group(t, stage, bp.name, path, m, n, unit, r, keep_count(r, n)))
    return groups


def _batches(example_inputs: Any, calib_batches: int, seed: int) -> list[dict[str, Any]]:
    """Calibration batches: a list of U-Net kwargs is used as given (its first ``calib_batches``);
    one dict gives itself plus ``calib_batches - 1`` variants whose ``sample`` and
    ``encoder_hidden_states`` are redrawn (seeded Gaussian with the same mean and std)."""
    if example_inputs is None:
        return []
    if isinstance(example_inputs, Mapping):
        out = [dict(example_inputs)]
        for i in range(1, max(1, calib_batches)):
            b = dict(example_inputs)
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            for key in ("sample", "encoder_hidden_states"):
                t = b.get(key)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                    b[key] = (torch.randn(t.shape, generator=gen) * t.float().std() + t.float().mean()).to(t)
            out.append(b)
        return out
    if isinstance(example_inputs, Sequence) and all(isinstance(b, Mapping) for b in example_inputs):
        return [dict(b) for b in example_inputs][: max(1, calib_batches)]
    raise HybridSDError(f"example_inputs must be U-Net forward kwargs (a dict) or a list of them, got {type(example_inputs).__name__}")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores (ties: lower index first), ascending."""
    s = [float(v) for v in scores]
    if any(math.isnan(v) for v in s):
        raise HybridSDError("importance scores contain NaN; check the calibration inputs and weights")
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return sorted(order[:k])


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters())


def fix_and_check(model: nn.Module) -> None:
    """Bring diffusers' bookkeeping attributes in line with the weights, and verify the result.

    Sets ``Downsample2D``/``Upsample2D`` ``.channels``/``.out_channels`` and ``GroupNorm``
    ``num_channels`` from their weights; raises if an ``Attention``'s heads no longer split its
    projections (``heads * dim_head != to_q.out_features``), a GroupNorm's groups do not divide its
    channels, or a conv/linear's declared widths differ from its weight."""

    problems = []
    for name, m in model.named_modules():
        if isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                m.channels = conv.in_channels
                m.out_channels = conv.out_channels
        elif isinstance(m, nn.GroupNorm):
            if m.affine:
                m.num_channels = m.weight.shape[0]
            if m.num_channels % m.num_groups:
                problems.append(f"{name}: GroupNorm of {m.num_channels} channels in {m.num_groups} groups")
        elif isinstance(m, nn.Conv2d):
            if m.weight.shape[0] != m.out_channels or m.weight.shape[1] * m.groups != m.in_channels:
                problems.append(f"{name}: Conv2d declares {m.in_channels}->{m.out_channels}, weight is {tuple(m.weight.shape)}")
        elif isinstance(m, nn.Linear):
            if tuple(m.weight.shape) != (m.out_features, m.in_features):
                problems.append(f"{name}: Linear declares {m.in_features}->{m.out_features}, weight is {tuple(m.weight.shape)}")
        elif isinstance(m, Attention):
            inner = m.to_q.out_features
            head_dim = round(m.scale ** -2) if getattr(m, "scale_qk", True) and m.scale else None
            if inner % m.heads or (head_dim is not None and m.heads * head_dim != inner) or m.inner_dim != inner:
                problems.append(f"{name}: Attention with {m.heads} heads (inner_dim {m.inner_dim}) over to_q width {inner}")
            if m.to_out is not None and m.to_out[0].in_features != inner:
                problems.append(f"{name}: Attention to_out takes {m.to_out[0].in_features} channels, to_q gives {inner}")
    if problems:
        raise HybridSDError(f"pruned U-Net is inconsistent: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def prune_student(
    model: nn.Module,
    plan,
    importance: str | None = None,
    example_inputs: Any = None,
    teacher: nn.Module | None = None,
    calib_batches: int = 2,
    seed: int = 0,
    latent_chunk: int = 16,
) -> PruneRecord:
    """Prune ``model`` (the student built from ``plan``, before pruning) in place to the plan's
    candidate keep ratios; return the record (also set as ``model.hybridsd_prune_record``).

    On the meta device only shapes are cut (the first units are kept; no importance, no data):
    the kept counts, hence params and MACs, are those a real pruning gives. Elsewhere ``importance``
    (default: the candidate's) scores the units on the unpruned model and each module keeps its
    best ones. ``example_inputs`` (U-Net forward kwargs, or a list of them) and ``teacher`` feed the
    data-driven criteria; ``calib_batches`` is how many batches they use."""
    t0 = time.perf_counter()
    cand = plan.candidate
    if calib_batches < 1:
        raise HybridSDError(f"calib_batches must be at least 1, got {calib_batches}")
    groups = collect_groups(model, plan)
    meta = _is_meta(model)
    name = None if meta else (importance or cand.importance or "magnitude")
    fn = get_importance(name) if name else None
    ctx = Context(_batches(example_inputs, calib_batches, seed), teacher, seed, latent_chunk)
    to_score = [g for g in groups if g.kept < g.units]
    keeps: dict[int, list[int]] = {id(g): list(range(g.units)) for g in groups}
    if meta:
        for g in to_score:
            keeps[id(g)] = list(range(g.kept))
    elif to_score:
        torch.manual_seed(seed)
        scores = fn(model, to_score, ctx)
        if len(scores) != len(to_score) or any(s.numel() != g.units for s, g in zip(scores, to_score)):
            raise HybridSDError(f"importance {name!r} returned scores of the wrong shape")
        for g, s in zip(to_score, scores):
            keeps[id(g)] = _top(s, g.kept)
    records = []
    for g in groups:
        keep = keeps[id(g)]
        g.target.apply(g.module, keep)
        records.append(GroupRecord(g.target.name, g.stage, g.block, g.path, tuple(g.target.touched(g.module)),
                                   g.units, g.unit, g.asked, len(keep), tuple(keep)))
    fix_and_check(model)
    notes = list(ctx.notes)
    if meta:
        notes.append("meta device: shapes only (first units kept, no importance)")
    record = PruneRecord(cand.to_dict(), cand.key, name, seed, len(ctx.batches) if name in ("taylor", "latent-stats") else 0,
                         tuple(records), seconds=round(time.perf_counter() - t0, 4), notes=tuple(notes))
    model.hybridsd_prune_record = record
    return record


def replay(model: nn.Module, record: PruneRecord | Mapping[str, Any]) -> nn.Module:
    """Apply a record to a freshly built, unpruned student of the same candidate (in place).

    The structure is then exactly the recorded one; with the same pre-pruning weights the output
    is that of the original pruning (the same units are kept)."""
    if not isinstance(record, PruneRecord):
        record = PruneRecord.from_dict(dict(record))
    for g in record.groups:
        try:
            m = model.get_submodule(g.path)
        except AttributeError:
            raise ConfigError(f"prune record: the model has no module {g.path}; was it built from candidate {record.candidate_key}?") from None
        t = TARGETS.get(g.target)
        if t is None:
            raise ConfigError(f"prune record: unknown target {g.target!r} at {g.path}; known: {', '.join(TARGETS)}")
        if not t.matches(m):
            raise ConfigError(f"prune record: {g.path} is a {type(m).__name__}, the record prunes its {g.target}")
        size = t.units(m)
        if size != (g.units, g.unit_channels):
            raise ConfigError(f"prune record: {g.path} has {size[0]} units of {size[1]} channels, the record expects "
                              f"{g.units} of {g.unit_channels} (already pruned, or another base?)")
        t.apply(m, list(g.keep))
    fix_and_check(model)
    model.hybridsd_prune_record = record
    return model


@contextlib.contextmanager
def masking(model: nn.Module, record: PruneRecord | Mapping[str, Any]):
    """Within the block, the *unpruned* ``model`` computes what the record's pruned model does:
    the cut units' channels are zeroed at the input of the layer that consumes them (ResNet
    ``conv2``, attention ``to_out[0]``, feed-forward ``net[2]``). Exact, because whole GroupNorm
    groups are cut (the kept groups keep their statistics), heads are independent, and the
    feed-forward activation is per channel."""
    if not isinstance(record, PruneRecord):
        record = PruneRecord.from_dict(dict(record))
    masks = {}
    for g in record.groups:
        m = model.get_submodule(g.path)
        t = TARGETS[g.target]
        path = f"{g.path}.{t.consumer(m)}"
        width = g.units * g.unit_channels
        mask = torch.zeros(width)
        mask[channels_of(list(g.keep), g.unit_channels)] = 1
        masks[path] = mask.reshape(_mask_shape(model.get_submodule(path), 1, width))
    with _masks(model, masks):
        yield model
