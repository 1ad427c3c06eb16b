"""The typed architecture description of a U-Net: blocks, layers, units (A-SDM's three tiers).

``describe(config)`` instantiates the U-Net on the meta device (no memory, no weights) and reads
the structure off the modules, so every rule diffusers applies (per-block head counts, transformer
depth, linear projections, asymmetric depth lists) holds here by construction.

Names: blocks are ``down0..downN-1``, ``mid``, ``up0..upN-1`` (diffusers' indices). A layer is a
ResNet unit plus, where present, the Transformer unit after it; ``down1.0`` is layer 0 of down
block 1. Units are ``down1.0.resnet`` and ``down1.0.attn``. The mid block
(ResNet, Transformer, ResNet) has layer ``mid.0`` = ResNet + Transformer and ``mid.1`` = ResNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel

from hybridsd_nas.core.errors import ConfigError, InvalidCandidateError
from hybridsd_nas.core.runtime import quiet
from hybridsd_nas.sources import load_unet_config

UnitKind = Literal["resnet", "attn"]


@dataclass(frozen=True)
class UnitDesc:
    """One ResNet or Transformer unit. ``path`` is its module path in the base U-Net."""

    name: str
    kind: UnitKind
    path: str
    in_channels: int
    out_channels: int
    depth: int = 0  # transformer blocks (attn only)
    heads: int = 0  # attention heads (attn only)
    head_dim: int = 0
    params: int = 0


@dataclass(frozen=True)
class LayerDesc:
    name: str  # "down1.0"
    block: str
    index: int
    resnet: UnitDesc
    attn: UnitDesc | None

    @property
    def units(self) -> tuple[UnitDesc, ...]:
        return (self.resnet,) if self.attn is None else (self.resnet, self.attn)

    @property
    def in_channels(self) -> int:
        return self.resnet.in_channels

    @property
    def out_channels(self) -> int:
        return self.resnet.out_channels


@dataclass(frozen=True)
class BlockDesc:
    name: str  # "down0", "mid", "up3"
    kind: Literal["down", "mid", "up"]
    index: int  # diffusers index (0 for mid)
    type: str  # diffusers class name
    path: str  # "down_blocks.0", "mid_block"
    in_channels: int
    out_channels: int
    layers: tuple[LayerDesc, ...]
    sampler: str | None = None  # path of the down/upsampler, if any
    sampler_channels: int = 0
    params: int = 0

    def layer(self, index: int) -> LayerDesc:
        return self.layers[index]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: caches key on the object
class UNetArch:
    """What a U-Net is made of, read from its config without weights."""

    config: Mapping[str, Any] = field(repr=False)
    source: str
    down: tuple[BlockDesc, ...]
    mid: BlockDesc | None
    up: tuple[BlockDesc, ...]
    conv_in_channels: int
    out_norm_channels: int
    params: int

    @property
    def blocks(self) -> tuple[BlockDesc, ...]:
        return self.down + ((self.mid,) if self.mid else ()) + self.up

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block(self, name: str) -> BlockDesc:
        for b in self.blocks:
            if b.name == name:
                return b
        raise InvalidCandidateError(f"block {name!r} does not exist in {self.source}; blocks: {', '.join(self.block_names)}")

    @property
    def n_stages(self) -> int:
        return len(self.down)

    def layers(self) -> list[LayerDesc]:
        return [layer for b in self.blocks for layer in b.layers]

    def summary(self) -> str:
        rows = []
        for b in self.blocks:
            units = []
            for layer in b.layers:
                u = "R" + (f"+T{layer.attn.depth}" if layer.attn else "")
                units.append(u)
            s = f" {b.sampler.split('.')[-2][:-1]}" if b.sampler else ""
            rows.append(f"{b.name:<5} {b.type:<24} {b.in_channels:>5}->{b.out_channels:<5} [{' '.join(units)}]{s}")
        return "\n".join(rows)


def instantiate(config: Mapping[str, Any], device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """Build a ``UNet2DConditionModel`` from a config; on ``meta`` this costs no memory."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with quiet(), torch.device(device):
            model = UNet2DConditionModel.from_config(cfg)
    except (ValueError, TypeError, AssertionError, KeyError) as e:
        raise ConfigError(f"diffusers cannot build this U-Net config: {str(e).splitlines()[0]}") from None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _nparams(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _attn_unit(name: str, path: str, attn: torch.nn.Module) -> UnitDesc:
    blocks = getattr(attn, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ConfigError(f"{path}: unsupported attention module {type(attn).__name__}")
    a1 = blocks[0].attn1
    inner = a1.to_q.out_features
    return UnitDesc(
        name=name,
        kind="attn",
        path=path,
        in_channels=attn.in_channels,
        out_channels=attn.out_channels if attn.out_channels is not None else attn.in_channels,
        depth=len(blocks),
        heads=a1.heads,
        head_dim=inner // a1.heads,
        params=_nparams(attn),
    )


def _resnet_unit(name: str, path: str, r: torch.nn.Module) -> UnitDesc:
    return UnitDesc(name, "resnet", path, r.in_channels, r.out_channels, params=_nparams(r))


def _block(kind: str, index: int, path: str, blk: torch.nn.Module) -> BlockDesc:
    name = "mid" if kind == "mid" else f"{kind}{index}"
    resnets = list(blk.resnets)
    attns = list(getattr(blk, "attentions", []) or [])
    # Layer j = ResNet j + the Transformer after it, if any. In the mid block (ResNet, then
    # Transformer/ResNet pairs) that makes layer 0 = resnet0 + attn0 and layer 1 = resnet1.
    layers = []
    for j, r in enumerate(resnets):
        a = attns[j] if j < len(attns) else None
        layers.append(
            LayerDesc(
                f"{name}.{j}",
                name,
                j,
                _resnet_unit(f"{name}.{j}.resnet", f"{path}.resnets.{j}", r),
                None if a is None else _attn_unit(f"{name}.{j}.attn", f"{path}.attentions.{j}", a),
            )
        )
    sampler, s_ch = None, 0
    samplers = getattr(blk, "downsamplers" if kind == "down" else "upsamplers", None)
    if samplers:
        sampler = f"{path}.{'downsamplers' if kind == 'down' else 'upsamplers'}.0"
        s_ch = samplers[0].channels
    in_ch = resnets[0].in_channels if kind != "up" else layers[0].in_channels
    return BlockDesc(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        index=index,
        type=type(blk).__name__,
        path=path,
        in_channels=in_ch,
        out_channels=resnets[-1].out_channels,
        layers=tuple(layers),
        sampler=sampler,
        sampler_channels=s_ch,
        params=_nparams(blk),
    )


def describe_module(model: torch.nn.Module, config: Mapping[str, Any], source: str) -> UNetArch:
    """Read the architecture off an instantiated base U-Net (any device)."""
    down = tuple(_block("down", i, f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks))
    mid = _block("mid", 0, "mid_block", model.mid_block) if model.mid_block is not None else None
    up = tuple(_block("up", i, f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks))
    return UNetArch(
        config=dict(config),
        source=source,
        down=down,
        mid=mid,
        up=up,
        conv_in_channels=model.conv_in.out_channels,
        out_norm_channels=model.conv_out.in_channels,
        params=_nparams(model),
    )


def describe(spec: Any) -> UNetArch:
    """The architecture of a U-Net spec (preset, zoo name, dict, config.json, directory, hub id)."""
    cfg, source = load_unet_config(spec)
    return describe_module(instantiate(cfg), cfg, source)
