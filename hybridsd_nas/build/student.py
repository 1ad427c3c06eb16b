"""Build a student U-Net from a plan: from a diffusers config where one expresses it, else by
module surgery on the base; weights inherited from a teacher through the plan's mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from hybridsd_nas.arch import Plan, describe, instantiate, plan, resolve_candidate
from hybridsd_nas.core.errors import InvalidCandidateError
from hybridsd_nas.prune import prune_student
from hybridsd_nas.sources import Teacher, load_pretrained_unet, resolve_teacher


class SkippedResnet(nn.Module):
    """Stands for a removed ResNet unit: passes its input through (channels must already match)."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        return input_tensor


class SkippedTransformer(nn.Module):
    """Stands for a removed Transformer unit: returns its input in the Transformer2DModel form."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        if return_dict:
            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


def apply_surgery(model: nn.Module, p: Plan) -> nn.Module:
    """Turn a U-Net with the base's layout into the student of ``p``, in place."""
    base = p.arch
    kept = len(p.down)
    d = base.n_stages - kept

    def edit(blk: nn.Module, bp) -> None:
        resnets = list(blk.resnets)
        attns = list(getattr(blk, "attentions", None) or [])
        new_r, new_a = [], []
        for j in bp.kept:
            lname = f"{bp.name}.{j}"
            new_r.append(SkippedResnet() if f"{lname}.resnet" in bp.skip_units else resnets[j])
            if attns:
                a = attns[j] if j < len(attns) else None
                if a is not None and f"{lname}.attn" in bp.skip_units:
                    a = SkippedTransformer()
                elif a is not None and bp.depth_of(j) < len(a.transformer_blocks):
                    a.transformer_blocks = nn.ModuleList(list(a.transformer_blocks)[: bp.depth_of(j)])
                new_a.append(a)
        blk.resnets = nn.ModuleList(new_r)
        if attns:
            blk.attentions = nn.ModuleList(new_a)
        sampler_attr = "downsamplers" if bp.base.kind == "down" else "upsamplers"
        if getattr(blk, sampler_attr, None) is not None and not bp.keep_sampler:
            setattr(blk, sampler_attr, None)

    downs = list(model.down_blocks)[:kept]
    ups = list(model.up_blocks)[d:]
    for blk, bp in zip(downs, p.down):
        edit(blk, bp)
    for blk, bp in zip(ups, p.up):
        edit(blk, bp)
    model.down_blocks = nn.ModuleList(downs)
    model.up_blocks = nn.ModuleList(ups)
    model.num_upsamplers = sum(1 for b in ups if getattr(b, "upsamplers", None) is not None)
    if p.mid is None:
        model.mid_block = None
    else:
        mid = model.mid_block
        mid.resnets = nn.ModuleList(
            [SkippedResnet() if f"mid.{j}.resnet" in p.mid.skip_units else r for j, r in enumerate(mid.resnets)]
        )
        attns = list(getattr(mid, "attentions", None) or [])
        if attns:
            new = []
            for j, a in enumerate(attns):
                if a is not None and f"mid.{j}.attn" in p.mid.skip_units:
                    a = SkippedTransformer()
                elif a is not None and p.mid.depth_of(j) < len(a.transformer_blocks):
                    a.transformer_blocks = nn.ModuleList(list(a.transformer_blocks)[: p.mid.depth_of(j)])
                new.append(a)
            mid.attentions = nn.ModuleList(new)
    return model


def build_student(
    p: Plan,
    teacher: nn.Module | dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    force_surgery: bool = False,
    prune: bool = True,
    prune_kwargs: dict[str, Any] | None = None,
    base_unet: nn.Module | dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build the student of a plan. With ``teacher`` (a module or a state dict of the base), its
    weights are inherited through the plan's mapping; without, weights are diffusers' init (or
    uninitialised on ``meta``). A channel-pruned candidate is then pruned
    (:func:`hybridsd_nas.prune.prune_student`; on ``meta`` its shapes only, exactly as a real
    pruning would leave them); ``prune=False`` stops before pruning. For a recombination,
    ``base_unet`` (the compressed Base U-Net, BK-SDM-Base-compatible) fills the candidate's
    ``base_blocks``; without it they keep the teacher's weights by the default mapping, which is
    the Base a teacher yields before any training."""
    if p.structure_config is not None and not force_surgery:
        model = instantiate(p.structure_config, device=device, dtype=dtype)
    else:
        model = apply_surgery(instantiate(p.arch.config, device=device, dtype=dtype), p)
    model.hybridsd_candidate = p.candidate  # what built it travels with it
    if teacher is not None:
        sd = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
        student_keys = list(model.state_dict().keys())
        model.load_state_dict(p.remap_state_dict(sd, student_keys), strict=True, assign=str(device) == "meta")
    if base_unet is not None and p.candidate.base_blocks:
        load_base_blocks(model, p, base_unet)
    if p.candidate.prune and prune:
        prune_student(model, p, **(prune_kwargs or {}))
    return model.eval()


def _block_prefixes(p: Plan) -> dict[str, tuple[str, str]]:
    """Block name -> (student module path, base module path)."""
    out = {bp.name: (bp.student_path, bp.base.path) for bp in p.down + p.up}
    if p.mid is not None:
        out["mid"] = ("mid_block", "mid_block")
    return out


def load_base_blocks(model: nn.Module, p: Plan, base_unet: nn.Module | dict[str, torch.Tensor]) -> None:
    """Copy the candidate's ``base_blocks`` from a compressed Base U-Net into ``model``."""
    sd = base_unet.state_dict() if isinstance(base_unet, nn.Module) else base_unet
    target = model.state_dict()
    prefixes = _block_prefixes(p)
    new = {}
    for name in p.candidate.base_blocks:
        s_path, b_path = prefixes[name]
        keys = [k for k in target if k.startswith(s_path + ".")]
        for k in keys:
            bk = b_path + k[len(s_path):]
            if bk not in sd or sd[bk].shape != target[k].shape:
                got = "missing" if bk not in sd else f"shape {tuple(sd[bk].shape)}"
                raise InvalidCandidateError(
                    f"base_blocks: the Base U-Net does not fit block {name}: {bk} is {got}, "
                    f"the student needs {tuple(target[k].shape)} (a Base with BK-SDM-Base topology is expected)"
                )
            new[k] = sd[bk]
    model.load_state_dict(new, strict=False)


_PART_PREFIXES = {
    "conv_in": ("conv_in.",),
    "time_embedding": ("time_proj.", "time_embedding.", "add_embedding.", "add_time_proj.", "class_embedding."),
    "conv_out": ("conv_norm_out.", "conv_out."),
}


def apply_frozen(model: nn.Module, p: Plan) -> list[str]:
    """Turn off gradients of the candidate's ``frozen`` parts; returns the frozen parameter names."""
    prefixes = _block_prefixes(p)
    pre: list[str] = []
    for name in p.candidate.frozen:
        pre += list(_PART_PREFIXES.get(name, ())) or [prefixes[name][0] + "."]
    frozen = []
    for n, param in model.named_parameters():
        if n.startswith(tuple(pre)):
            param.requires_grad_(False)
            frozen.append(n)
    return frozen


@dataclass
class Distillable:
    """A student ready to train: the teacher it comes from (resolved once), its loaded pipeline, the
    validated plan, and the student with inherited weights (from ``base_unet`` for a recombination's
    Base blocks)."""

    teacher: Teacher
    pipe: Any
    plan: Plan
    student: nn.Module


def student_of(teacher: Teacher | str, candidate: Any, base_unet: str | None = None, device: str = "cpu") -> Distillable:
    """Resolve the teacher, plan the candidate on its U-Net (rejecting an impossible one before any
    weight is read), load the pipeline and build the student with the teacher's weights."""
    t = resolve_teacher(teacher)
    arch = describe(t.path)
    p = plan(arch, resolve_candidate(candidate, arch))
    pipe = t.pipeline(device=device)
    base = load_pretrained_unet(base_unet, device=device) if base_unet else None
    return Distillable(t, pipe, p, build_student(p, teacher=pipe.unet, device=device, base_unet=base))
