"""Params and MACs of a candidate in closed form, from its plan: no model, no forward.

Every module of a diffusers ``UNet2DConditionModel`` of the SD family (SD-1.x, SD-2.x, SDXL and
the candidates of each: layer, unit and stage removal, shallower transformers, recombinations,
channel pruning) has a parameter count and a MAC count that are polynomials in its widths and in
the spatial size it sees. Summing them over the plan's kept units, with the spatial sizes followed
through the down and up paths as ``forward`` does (odd latents included), gives the very integers
the traced count (:func:`hybridsd_nas.cost.count_macs`) returns, in both conventions and per block.

Channel pruning is closed form as well: a keep ratio fixes how many units stay (whole GroupNorm
groups, heads, feed-forward channels: :func:`hybridsd_nas.prune.keep_count`); the importance
criterion only chooses which ones, and that changes no shape.

What is not modelled is refused, never approximated. :func:`analytic_support` names the first
config feature outside the family (another block type, class or encoder-projection embeddings,
GLIGEN attention, a config key this module does not know, ...) and checks the closed-form
parameter count of every unit, every block and the whole base against the modules ``describe``
read; :func:`analytic_count` raises :class:`NotAnalyticError` with that reason, and
:func:`~hybridsd_nas.cost.estimate_cost` then counts by tracing and says why.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from diffusers import UNet2DConditionModel

from hybridsd_nas.arch import BlockDesc, BlockPlan, Plan, UNetArch, UnitDesc
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost.inputs import latent_size
from hybridsd_nas.cost.macs import MacCount, _block_order
from hybridsd_nas.prune import keep_count, stage_of

METHOD = "closed form from the plan (no model, no forward)"

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# Config keys whose value the closed form reads from the architecture description (widths, depths,
# heads, block types) or from the config below, and keys that change neither a shape nor a matrix
# product (activations, scales, epsilons, dropout, attention upcasting). Any other key of
# ``UNet2DConditionModel`` must keep its diffusers default, else the base is refused.
_READ = frozenset({
    "sample_size", "in_channels", "out_channels", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "resnet_time_scale_shift", "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "time_embedding_dim", "conv_in_kernel", "conv_out_kernel", "downsample_padding", "only_cross_attention",
    "mid_block_only_cross_attention",
})
_NEUTRAL = frozenset({
    "center_input_sample", "flip_sin_to_cos", "freq_shift", "mid_block_scale_factor", "act_fn", "norm_eps",
    "upcast_attention", "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_act_fn", "timestep_post_act",
    "dropout", "addition_embed_type_num_heads",  # the last only sizes addition_embed_type "text", refused below
})


class NotAnalyticError(HybridSDError, ValueError):
    """A base U-Net (or candidate) whose params and MACs the closed form does not cover exactly."""


@dataclass(frozen=True)
class _Base:
    """What the closed form needs of a base beyond its architecture description."""

    in_channels: int
    out_channels: int
    conv_in_kernel: int
    conv_out_kernel: int
    c0: int  # conv_in out = conv_out in (block_out_channels[0])
    groups: int  # norm_num_groups: ResNet norms, the pruning unit of a ResNet's inner width
    temb: int  # time embedding width fed to every ResNet
    time_in: int  # sinusoidal timestep width
    add_in: int  # SDXL text_time: projection_class_embeddings_input_dim (0 without)
    cross: int  # encoder_hidden_states width
    linear_proj: bool
    scale_shift: bool
    down_padding: int


@lru_cache(maxsize=1)
def _unet_defaults() -> dict[str, Any]:
    sig = inspect.signature(UNet2DConditionModel.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self" and p.default is not inspect.Parameter.empty}


def _config_reason(cfg: Mapping[str, Any]) -> str | None:
    defaults = _unet_defaults()
    for key, default in defaults.items():
        if key in _READ or key in _NEUTRAL:
            continue
        if cfg.get(key, default) != default:
            return f"config {key}={cfg[key]!r} is not modelled (only its default {default!r} is)"
    if cfg["addition_embed_type"] not in (None, "text_time"):
        return f"addition_embed_type {cfg['addition_embed_type']!r} is not modelled; modelled: null, 'text_time'"
    if cfg["addition_embed_type"] == "text_time" and not cfg.get("projection_class_embeddings_input_dim"):
        return "addition_embed_type 'text_time' without projection_class_embeddings_input_dim"
    if cfg["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        return f"resnet_time_scale_shift {cfg['resnet_time_scale_shift']!r} is not modelled; modelled: default, scale_shift"
    if cfg["norm_num_groups"] is None:
        return "norm_num_groups null (no output norm) is not modelled"
    oca = cfg["only_cross_attention"]
    if any(oca) if isinstance(oca, (list, tuple)) else oca:
        return "only_cross_attention is not modelled"
    if cfg["mid_block_only_cross_attention"]:
        return "mid_block_only_cross_attention is not modelled"
    cad = cfg["cross_attention_dim"]
    if isinstance(cad, (list, tuple)) and len(set(cad)) != 1:
        return f"per-block cross_attention_dim {list(cad)} is not modelled"
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if not isinstance(cfg[key], int) or cfg[key] < 1 or cfg[key] % 2 == 0:
            return f"{key} {cfg[key]!r} is not modelled (only odd kernels, which keep the latent size)"
    return None


def _base_of(arch: UNetArch) -> _Base:
    cfg = {**_unet_defaults(), **{k: v for k, v in arch.config.items() if not k.startswith("_")}}
    reason = _config_reason(cfg)
    if reason is None:
        kinds = {"down": _DOWN_TYPES, "mid": _MID_TYPES, "up": _UP_TYPES}
        for b in arch.blocks:
            if b.type not in kinds[b.kind]:
                reason = f"{b.name} is a {b.type}; modelled {b.kind} blocks: {', '.join(kinds[b.kind])}"
                break
    if reason is not None:
        raise NotAnalyticError(reason)
    c0 = arch.conv_in_channels
    cad = cfg["cross_attention_dim"]
    return _Base(
        in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        conv_in_kernel=cfg["conv_in_kernel"], conv_out_kernel=cfg["conv_out_kernel"], c0=c0,
        groups=int(cfg["norm_num_groups"]), temb=int(cfg["time_embedding_dim"] or 4 * c0), time_in=c0,
        add_in=int(cfg["projection_class_embeddings_input_dim"] or 0) if cfg["addition_embed_type"] == "text_time" else 0,
        cross=int(cad[0] if isinstance(cad, (list, tuple)) else cad), linear_proj=bool(cfg["use_linear_projection"]),
        scale_shift=cfg["resnet_time_scale_shift"] == "scale_shift", down_padding=int(cfg["downsample_padding"]),
    )


# -- per module: (params, conv MACs, linear MACs, attention matmul MACs, thop LayerNorm ops) ----------
# ``n`` is batch x height x width of the feature map the module sees, ``batch`` the batch alone.

def _resnet(b: _Base, cin: int, cout: int, inner: int, n: int, batch: int) -> tuple[int, int, int, int, int]:
    """A ``ResnetBlock2D`` whose inner width (conv1 out, norm2, conv2 in) is ``inner``."""
    t = 2 * inner if b.scale_shift else inner  # time_emb_proj rows
    short = cin != cout  # a 1x1 conv_shortcut where the widths differ
    params = 2 * cin + (cin * 9 + 1) * inner + (b.temb + 1) * t + 2 * inner + (inner * 9 + 1) * cout
    conv = n * 9 * inner * (cin + cout)
    if short:
        params += (cin + 1) * cout
        conv += n * cin * cout
    return params, conv, batch * b.temb * t, 0, 0


def _transformer(b: _Base, c: int, heads: int, head_dim: int, depth: int, heads_kept: int, ff_kept: int | None,
                 n: int, batch: int, tokens: int, text_len: int) -> tuple[int, int, int, int, int]:
    """A ``Transformer2DModel`` of ``depth`` ``BasicTransformerBlock``s (self-attention, cross-attention,
    GEGLU feed-forward) over ``c`` channels, ``heads_kept`` of its heads and ``ff_kept`` feed-forward
    channels left by pruning; ``tokens`` = height x width of one latent."""
    d = heads * head_dim  # the blocks' width
    a = heads_kept * head_dim  # q/k/v width
    f = 4 * d if ff_kept is None else ff_kept
    x = b.cross
    proj = 2 * c * d
    params = 2 * c + proj + d + c  # GroupNorm, proj_in and proj_out with biases
    per_block = (6 * d  # three affine LayerNorms
                 + 3 * d * a + a * d + d  # attn1: q, k, v (no bias), out (bias)
                 + d * a + 2 * x * a + a * d + d  # attn2: q from the latent, k and v from the text
                 + d * 2 * f + 2 * f + f * d + d)  # GEGLU proj (value and gate halves), out
    params += depth * per_block
    lin_block = n * (3 * d * a + a * d) + n * (2 * d * a) + batch * text_len * 2 * x * a + n * 3 * d * f
    attn_block = 2 * n * a * tokens + 2 * n * a * text_len  # QK^T and AV, self and cross
    proj_macs = n * proj
    conv, linear = (0, proj_macs) if b.linear_proj else (proj_macs, 0)
    return params, conv, linear + depth * lin_block, depth * attn_block, depth * 3 * 4 * n * d


def _conv(cin: int, cout: int, k: int, n_out: int) -> tuple[int, int, int, int, int]:
    return (cin * k * k + 1) * cout, n_out * cin * cout * k * k, 0, 0, 0


def _embedding(b: _Base, batch: int) -> tuple[int, int, int, int, int]:
    """The timestep MLP, and SDXL's added-condition MLP beside it."""
    t = b.temb
    params = (b.time_in + 1) * t + (t + 1) * t
    linear = batch * (b.time_in * t + t * t)
    if b.add_in:
        params += (b.add_in + 1) * t + (t + 1) * t
        linear += batch * (b.add_in * t + t * t)
    return params, 0, linear, 0, 0


# -- the base check ---------------------------------------------------------------------------------

def _unit_params(b: _Base, u: UnitDesc) -> int:
    if u.kind == "resnet":
        return _resnet(b, u.in_channels, u.out_channels, u.out_channels, 0, 0)[0]
    return _transformer(b, u.in_channels, u.heads, u.head_dim, u.depth, u.heads, None, 0, 0, 0, 0)[0]


def _sampler_params(blk: BlockDesc) -> int:
    return _conv(blk.sampler_channels, blk.sampler_channels, 3, 0)[0] if blk.sampler else 0


@lru_cache(maxsize=64)
def _checked(arch: UNetArch) -> tuple[_Base | None, str | None]:
    try:
        b = _base_of(arch)
    except NotAnalyticError as e:
        return None, str(e)
    total = _conv(b.in_channels, b.c0, b.conv_in_kernel, 0)[0] + _embedding(b, 0)[0] + 2 * b.c0
    total += _conv(b.c0, b.out_channels, b.conv_out_kernel, 0)[0]
    for blk in arch.blocks:
        got = _sampler_params(blk)
        for layer in blk.layers:
            for u in layer.units:
                p = _unit_params(b, u)
                if p != u.params:
                    return None, f"{u.name} ({u.path}) has {u.params} params, the closed form gives {p}: a variant it does not model"
                got += p
        if got != blk.params:
            return None, f"{blk.name} ({blk.path}) has {blk.params} params, the closed form gives {got}: a variant it does not model"
        total += got
    if total != arch.params:
        return None, f"{arch.source} has {arch.params} params, the closed form gives {total}: a part it does not model"
    return b, None


def analytic_support(arch: UNetArch) -> str | None:
    """Why the closed form cannot cost candidates of ``arch`` exactly; None when it can (cached)."""
    return _checked(arch)[1]


# -- a candidate ------------------------------------------------------------------------------------

def _mid_heads(p: Plan, u: UnitDesc) -> tuple[int, int]:
    """Heads of the mid Transformer as built. A student built from a stock config takes them from the
    last entry of its (cut) head list, as diffusers does, which is not the base's when stages were
    removed and the list differs there; the width stays the mid block's."""
    cfg = p.structure_config
    if cfg is None:
        return u.heads, u.head_dim
    nh = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", _unet_defaults()["attention_head_dim"])
    heads = int(nh[-1] if isinstance(nh, (list, tuple)) else nh)
    return (u.heads, u.head_dim) if heads == u.heads else (heads, u.in_channels // heads)


def _down_size(h: int, pad: int) -> int:
    return (h + 1 - 3) // 2 + 1 if pad == 0 else (h + 2 * pad - 3) // 2 + 1  # padding 0: diffusers pads (0, 1) first


def analytic_count(p: Plan, resolution: int, batch: int = 1, text_len: int = 77, vae_scale: int = 8) -> MacCount:
    """Params and MACs of the student of ``p`` for one forward of ``batch`` latents of ``resolution``
    pixels with ``text_len`` text tokens; the same :class:`MacCount` as the traced count, by block
    under the base's block names. Raises :class:`NotAnalyticError` where the closed form does not
    cover the base exactly."""
    b, reason = _checked(p.arch)
    if b is None:
        raise NotAnalyticError(f"{p.arch.source}: {reason}")
    if batch < 1:
        raise HybridSDError(f"batch must be at least 1, got {batch}")
    lat = latent_size(resolution, vae_scale)
    groups: dict[str, list[int]] = {}

    def add(group: str, figs: tuple[int, int, int, int, int]) -> None:
        g = groups.setdefault(group, [0, 0, 0, 0, 0])
        for i, v in enumerate(figs):
            g[i] += v

    def units(bp: BlockPlan, h: int, w: int) -> None:
        ratios = p.candidate.prune_ratios(stage_of(p, bp)) if p.candidate.prune else {}
        r_res, r_heads, r_ff = ratios.get("resnet", 1.0), ratios.get("heads", 1.0), ratios.get("ff", 1.0)
        n = batch * h * w
        for j in bp.kept:
            layer = bp.base.layers[j]
            r = layer.resnet
            if r.name not in bp.skip_units:
                inner = r.out_channels
                if r_res < 1.0:
                    inner = keep_count(r_res, b.groups) * (inner // b.groups)
                add(bp.name, _resnet(b, r.in_channels, r.out_channels, inner, n, batch))
            a = layer.attn
            if a is not None and a.name not in bp.skip_units:
                heads, head_dim = _mid_heads(p, a) if bp.base.kind == "mid" else (a.heads, a.head_dim)
                hk = keep_count(r_heads, heads) if r_heads < 1.0 else heads
                fk = keep_count(r_ff, 4 * heads * head_dim) if r_ff < 1.0 else None
                add(bp.name, _transformer(b, a.in_channels, heads, head_dim, bp.depth_of(j), hk, fk, n, batch, h * w, text_len))

    h = w = lat
    add("conv_in", _conv(b.in_channels, b.c0, b.conv_in_kernel, batch * h * w))
    add("embed", _embedding(b, batch))
    skips = [(h, w)]
    for bp in p.down:
        units(bp, h, w)
        skips += [(h, w)] * len(bp.kept)
        if bp.keep_sampler:
            h, w = _down_size(h, b.down_padding), _down_size(w, b.down_padding)
            c = bp.base.sampler_channels
            add(bp.name, _conv(c, c, 3, batch * h * w))
            skips.append((h, w))
    if p.mid is not None:
        units(p.mid, h, w)
    factor = 2 ** sum(1 for bp in p.up if bp.keep_sampler)
    forward_size = lat % factor != 0  # forward() then hands each upsampler the size of the skip it meets next
    for k, bp in enumerate(p.up):
        units(bp, h, w)
        del skips[len(skips) - len(bp.kept):]
        if bp.keep_sampler:
            h, w = skips[-1] if forward_size and k < len(p.up) - 1 else (2 * h, 2 * w)
            c = bp.base.sampler_channels
            add(bp.name, _conv(c, c, 3, batch * h * w))
    out = _conv(b.c0, b.out_channels, b.conv_out_kernel, batch * h * w)
    add("out", (out[0] + 2 * b.c0, *out[1:]))  # with conv_norm_out's affine GroupNorm

    by_block: dict[str, dict[str, int]] = {}
    for name in sorted(groups, key=_block_order):
        params, conv, linear, attn, norm = groups[name]
        if params or conv or linear or attn:
            by_block[name] = {"params": params, "macs": conv + linear + attn, "macs_conv_linear": conv + linear + norm,
                              "attention_matmul": attn}
    tot = [sum(g[i] for g in groups.values()) for i in range(5)]
    return MacCount(params=tot[0], macs=tot[1] + tot[2] + tot[3], macs_conv_linear=tot[1] + tot[2] + tot[4], conv=tot[1],
                    linear=tot[2], attention_matmul=tot[3], norm_thop=tot[4], by_block=by_block)
