"""The three prunable inner widths of a diffusers U-Net and how each is cut through torch-pruning.

A *target* is a kind of module whose inner width can shrink while its input and output widths
stay as they are (so block channels and skip connections never change):

- ``resnet``: a ``ResnetBlock2D``'s inner channels: ``conv1`` out, ``time_emb_proj`` out, ``norm2``,
  ``conv2`` in. The unit of pruning is one ``norm2`` group (whole GroupNorm groups are cut, so the
  groups that stay normalise over exactly the channels they did before);
- ``heads``: an ``Attention``'s heads: ``to_q``/``to_k``/``to_v`` out and ``to_out[0]`` in, one
  unit = one head (``dim_head`` channels); ``heads``, ``inner_dim``, ``inner_kv_dim`` and
  ``sliceable_head_dim`` are set to match;
- ``ff``: a ``FeedForward``'s inner width: the activation's ``proj`` out (both halves of a gated
  GEGLU/SwiGLU projection) and ``net[2]`` in; one unit = one channel.

For each kind, :class:`Target` says where channel ``c`` lives in every parameter (for the
importance criteria), which module consumes the width (zeroing that input channel is what removing
it does: see :func:`hybridsd_nas.prune.masking`), and applies the cut with torch-pruning's
``prune_*_channels`` functions, then repairs the attributes those functions do not know about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from hybridsd_nas.core.errors import HybridSDError


class UnsupportedModuleError(HybridSDError, ValueError):
    """A module of a prunable kind whose variant the pruning engine does not handle."""


@dataclass(frozen=True)
class Slice:
    """Channel ``c`` of a target lives at index ``offset + c`` along ``dim`` of ``module.param``."""

    module: str  # path relative to the target module ("conv1", "to_out.0")
    param: str
    dim: int
    offset: int = 0


class Target:
    """How one kind of module is pruned. ``units(m)`` -> (number of units, channels per unit)."""

    name: str = ""

    def matches(self, m: nn.Module) -> bool:
        raise NotImplementedError

    def units(self, m: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def slices(self, m: nn.Module) -> list[Slice]:
        raise NotImplementedError

    def consumer(self, m: nn.Module) -> str:
        """Path (relative to ``m``) of the module whose input channels are this width."""
        raise NotImplementedError

    def touched(self, m: nn.Module) -> list[str]:
        return sorted({s.module for s in self.slices(m)})

    def apply(self, m: nn.Module, keep_units: list[int]) -> None:
        """Keep only ``keep_units`` (sorted unit indices) of ``m``, in place."""
        raise NotImplementedError


def channels_of(units: list[int], unit: int) -> list[int]:
    return [u * unit + i for u in units for i in range(unit)]


def _removed(n: int, keep: list[int]) -> list[int]:
    k = set(keep)
    return [i for i in range(n) if i not in k]


def _restore_grad_flags(m: nn.Module, flags: dict[str, bool]) -> None:
    # torch-pruning returns fresh nn.Parameters (requires_grad=True); frozen stays frozen
    for n, p in m.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


class ResnetTarget(Target):
    name = "resnet"

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, ResnetBlock2D)

    def units(self, m: nn.Module) -> tuple[int, int]:
        c = m.conv1.out_channels
        g = m.norm2.num_groups
        if m.norm2.num_channels != c or c % g or m.conv2.in_channels != c:
            raise UnsupportedModuleError(f"ResnetBlock2D with conv1 out {c}, norm2 {m.norm2.num_channels}/{g} groups, conv2 in {m.conv2.in_channels}: widths do not line up")
        if getattr(m, "time_embedding_norm", "default") not in ("default", "scale_shift"):
            raise UnsupportedModuleError(f"ResnetBlock2D time_embedding_norm {m.time_embedding_norm!r}; supported: default, scale_shift")
        return g, c // g

    def slices(self, m: nn.Module) -> list[Slice]:
        c = m.conv1.out_channels
        s = [Slice("conv1", "weight", 0)]
        if m.conv1.bias is not None:
            s.append(Slice("conv1", "bias", 0))
        if m.time_emb_proj is not None:
            offsets = (0, c) if m.time_embedding_norm == "scale_shift" else (0,)
            for o in offsets:
                s.append(Slice("time_emb_proj", "weight", 0, o))
                if m.time_emb_proj.bias is not None:
                    s.append(Slice("time_emb_proj", "bias", 0, o))
        if m.norm2.affine:
            s += [Slice("norm2", "weight", 0), Slice("norm2", "bias", 0)]
        s.append(Slice("conv2", "weight", 1))
        return s

    def consumer(self, m: nn.Module) -> str:
        return "conv2"

    def apply(self, m: nn.Module, keep_units: list[int]) -> None:
        g, unit = self.units(m)
        c = g * unit
        keep = channels_of(keep_units, unit)
        rm = _removed(c, keep)
        if not rm:
            return
        flags = {n: p.requires_grad for n, p in m.named_parameters()}
        tp.prune_conv_out_channels(m.conv1, rm)
        if m.time_emb_proj is not None:
            rm_t = rm + ([c + i for i in rm] if m.time_embedding_norm == "scale_shift" else [])
            tp.prune_linear_out_channels(m.time_emb_proj, rm_t)
        tp.prune_groupnorm_out_channels(m.norm2, rm)
        m.norm2.num_groups = len(keep_units)  # torch-pruning leaves num_groups; whole groups were cut
        tp.prune_conv_in_channels(m.conv2, rm)
        _restore_grad_flags(m, flags)


class HeadsTarget(Target):
    name = "heads"

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, Attention)

    def units(self, m: nn.Module) -> tuple[int, int]:
        inner = m.to_q.out_features
        h = m.heads
        if h < 1 or inner % h:
            raise UnsupportedModuleError(f"Attention with {h} heads over to_q width {inner}: not a whole number of channels per head")
        if getattr(m, "fused_projections", False) or getattr(m, "to_qkv", None) is not None:
            raise UnsupportedModuleError("Attention with fused projections; unfuse them (unfuse_qkv_projections) before pruning")
        if getattr(m, "added_kv_proj_dim", None) is not None:
            raise UnsupportedModuleError("Attention with added key/value projections (added_kv_proj_dim); supported: SD/SDXL self and cross attention")
        if m.to_k.out_features != inner or m.to_v.out_features != inner:
            raise UnsupportedModuleError(f"Attention with grouped key/value heads ({m.to_k.out_features} vs {inner}); supported: as many key/value heads as query heads")
        for nname in ("norm_q", "norm_k"):
            norm = getattr(m, nname, None)
            shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
            if norm is not None and isinstance(shape, (tuple, list, torch.Size)) and h > 1 and tuple(shape)[-1] == inner:
                raise UnsupportedModuleError(f"Attention whose {nname} normalises across heads; supported: per-head or no q/k norm")
        return h, inner // h

    def slices(self, m: nn.Module) -> list[Slice]:
        s = []
        for p in ("to_q", "to_k", "to_v"):
            lin = getattr(m, p)
            s.append(Slice(p, "weight", 0))
            if lin.bias is not None:
                s.append(Slice(p, "bias", 0))
        s.append(Slice("to_out.0", "weight", 1))
        return s

    def consumer(self, m: nn.Module) -> str:
        return "to_out.0"

    def apply(self, m: nn.Module, keep_units: list[int]) -> None:
        h, d = self.units(m)
        rm = _removed(h * d, channels_of(keep_units, d))
        if not rm:
            return
        flags = {n: p.requires_grad for n, p in m.named_parameters()}
        for p in ("to_q", "to_k", "to_v"):
            tp.prune_linear_out_channels(getattr(m, p), rm)
        tp.prune_linear_in_channels(m.to_out[0], rm)
        # what torch-pruning does not know: the head split the processors read
        m.heads = len(keep_units)
        m.inner_dim = m.heads * d
        m.inner_kv_dim = m.heads * d
        m.sliceable_head_dim = m.heads
        _restore_grad_flags(m, flags)


_GATED = ("GEGLU", "SwiGLU")
_PLAIN = ("GELU", "ApproximateGELU", "LinearActivation")


class FFTarget(Target):
    name = "ff"

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, FeedForward)

    def _parts(self, m: nn.Module) -> tuple[nn.Module, nn.Linear, bool]:
        act = m.net[0]
        kind = type(act).__name__
        if kind not in _GATED + _PLAIN or not isinstance(getattr(act, "proj", None), nn.Linear):
            raise UnsupportedModuleError(f"FeedForward with activation {kind}; supported: {', '.join(_GATED + _PLAIN)}")
        out = m.net[2]
        if not isinstance(out, nn.Linear):
            raise UnsupportedModuleError(f"FeedForward whose net[2] is {type(out).__name__}, not Linear")
        return act, out, kind in _GATED

    def units(self, m: nn.Module) -> tuple[int, int]:
        act, out, gated = self._parts(m)
        inner = out.in_features
        if act.proj.out_features != inner * (2 if gated else 1):
            raise UnsupportedModuleError(f"FeedForward proj width {act.proj.out_features} does not match net[2] input {inner}")
        return inner, 1

    def slices(self, m: nn.Module) -> list[Slice]:
        act, out, gated = self._parts(m)
        inner = out.in_features
        s = []
        for o in ((0, inner) if gated else (0,)):  # GEGLU: hidden half, then gate half
            s.append(Slice("net.0.proj", "weight", 0, o))
            if act.proj.bias is not None:
                s.append(Slice("net.0.proj", "bias", 0, o))
        s.append(Slice("net.2", "weight", 1))
        return s

    def consumer(self, m: nn.Module) -> str:
        return "net.2"

    def apply(self, m: nn.Module, keep_units: list[int]) -> None:
        act, out, gated = self._parts(m)
        inner = out.in_features
        rm = _removed(inner, keep_units)
        if not rm:
            return
        flags = {n: p.requires_grad for n, p in m.named_parameters()}
        tp.prune_linear_out_channels(act.proj, rm + ([inner + i for i in rm] if gated else []))
        tp.prune_linear_in_channels(out, rm)
        _restore_grad_flags(m, flags)


TARGETS: dict[str, Target] = {t.name: t for t in (ResnetTarget(), HeadsTarget(), FFTarget())}


def param_of(m: nn.Module, s: Slice) -> torch.Tensor:
    return getattr(m.get_submodule(s.module), s.param)


def per_channel(m: nn.Module, target: Target, fn) -> torch.Tensor:
    """Sum over the target's slices of ``fn(param_slice_moved_to_dim0)`` reduced per channel.

    ``fn(name, tensor)`` gets the parameter (or anything derived from it: see importance) with
    the channel dimension first, cut to the target's width; returns a (channels, ...) tensor."""
    n, unit = target.units(m)
    width = n * unit
    total = torch.zeros(width, dtype=torch.float64)
    for s in target.slices(m):
        t = fn(s)
        if t is None:
            continue
        t = t.movedim(s.dim, 0).narrow(0, s.offset, width)
        total += t.reshape(width, -1).double().sum(1).cpu()
    return total
