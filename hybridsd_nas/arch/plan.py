"""From (base architecture, candidate) to a validated build plan.

The plan says, for every block of the student, which layers of the base it keeps and which of
their units it replaces by identity, the transformer depth of each kept Transformer unit, and
which downsamplers/upsamplers remain. Validation walks the skip connections exactly as diffusers'
``UNet2DConditionModel.forward`` does (a stack: each down layer and downsampler pushes its output,
each up layer pops one and concatenates it) and rejects, before anything is built, a candidate
whose channels no longer meet, naming the block and the reason.

The same plan gives the weight mapping (student module path <- base module path; BK-SDM's
``copy_weight_from_teacher`` is the case of the ``bk-sdm-*`` presets) and, where a stock diffusers
config can express the student, that config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from hybridsd_nas.arch.candidate import Candidate
from hybridsd_nas.arch.model import BlockDesc, UNetArch
from hybridsd_nas.core.errors import InvalidCandidateError, NotExpressibleError


@dataclass(frozen=True)
class BlockPlan:
    base: BlockDesc
    student_path: str  # "up_blocks.0"
    kept: tuple[int, ...]  # kept layer indices of the base block
    skip_units: frozenset[str]  # unit names replaced by identity ("down1.0.attn")
    depth: tuple[tuple[int, int], ...]  # (base layer index, transformer depth) for kept attn units
    keep_sampler: bool

    @property
    def name(self) -> str:
        return self.base.name

    def depth_of(self, j: int) -> int:
        return dict(self.depth).get(j, 0)


@dataclass(frozen=True)
class Plan:
    arch: UNetArch
    candidate: Candidate
    down: tuple[BlockPlan, ...]
    mid: BlockPlan | None
    up: tuple[BlockPlan, ...]
    config: dict[str, Any] | None = field(repr=False)
    config_reason: str | None  # why no stock config expresses it (None when one does)
    mapping: tuple[tuple[str, str], ...] = field(repr=False)
    structure_config: dict[str, Any] | None = field(default=None, repr=False)  # layers/depth only, before pruning

    @property
    def blocks(self) -> tuple[BlockPlan, ...]:
        return self.down + ((self.mid,) if self.mid else ()) + self.up

    @property
    def expressible(self) -> bool:
        return self.config is not None

    def diffusers_config(self) -> dict[str, Any]:
        if self.config is None:
            raise NotExpressibleError(f"candidate {self.candidate.label}: {self.config_reason}")
        return copy.deepcopy(self.config)

    def teacher_key(self, student_key: str) -> str:
        """The base (teacher) state-dict key that fills a student state-dict key."""
        for s, t in self.mapping:
            if student_key.startswith(s):
                return t + student_key[len(s) :]
        return student_key

    def remap_state_dict(self, teacher_sd: dict[str, Any], student_keys) -> dict[str, Any]:
        missing = [k for k in student_keys if self.teacher_key(k) not in teacher_sd]
        if missing:
            raise InvalidCandidateError(
                f"teacher has no weights for {missing[0]} (looked for {self.teacher_key(missing[0])}); "
                "is the teacher the base this candidate was planned on?"
            )
        return {k: teacher_sd[self.teacher_key(k)] for k in student_keys}


def _fail(msg: str) -> None:
    raise InvalidCandidateError(msg)


def _check_names(arch: UNetArch, cand: Candidate) -> tuple[set[str], set[str], dict[str, int]]:
    layers = {layer.name: layer for layer in arch.layers()}
    block_names = set(arch.block_names)
    drop_layers: set[str] = set()
    skip_units: set[str] = set()
    for n in cand.drop_layers:
        if n not in layers:
            blk = n.split(".")[0]
            if blk not in block_names:
                _fail(f"drop_layers: block {blk!r} does not exist; blocks: {', '.join(arch.block_names)}")
            _fail(f"drop_layers: {blk} has no layer {n.split('.')[1]} (it has {len(arch.block(blk).layers)})")
        if n.startswith("mid."):  # a mid layer is its units
            skip_units.update(u.name for u in layers[n].units)
        else:
            drop_layers.add(n)
    for n in cand.drop_units:
        lname, kind = n.rsplit(".", 1)
        if lname not in layers:
            blk = lname.split(".")[0]
            if blk not in block_names:
                _fail(f"drop_units: block {blk!r} does not exist; blocks: {', '.join(arch.block_names)}")
            _fail(f"drop_units: {blk} has no layer {lname.split('.')[1]} (it has {len(arch.block(blk).layers)})")
        if lname in drop_layers:
            _fail(f"drop_units: {n} belongs to layer {lname}, which drop_layers already removes")
        layer = layers[lname]
        if kind == "attn" and layer.attn is None:
            _fail(f"drop_units: {lname} has no Transformer unit to remove")
        skip_units.add(n)
    depth: dict[str, int] = {}
    for key, d in cand.depth:
        targets = [layer for layer in arch.layers() if layer.name == key or layer.block == key]
        if not targets:
            _fail(f"depth: {key!r} names no layer or block; blocks: {', '.join(arch.block_names)}")
        for layer in targets:
            if layer.attn is None:
                if layer.name == key:
                    _fail(f"depth: {key} has no Transformer unit")
                continue
            if d > layer.attn.depth:
                _fail(f"depth: {layer.name} has {layer.attn.depth} transformer block(s); depth can only shrink, asked {d}")
            depth[layer.name] = d
    for lname, d in depth.items():
        if d == 0 and lname not in drop_layers:
            skip_units.add(f"{lname}.attn")
    return drop_layers, skip_units, depth


def plan(arch: UNetArch, cand: Candidate) -> Plan:
    """Validate a candidate on a base architecture and return its build plan."""
    drop_layers, skip_units, depth = _check_names(arch, cand)
    n = arch.n_stages
    d = cand.drop_stages
    if d >= n:
        _fail(f"drop_stages={d}: the base has {n} stages, at most {n - 1} can be removed")
    removed = {b.name for b in arch.down[n - d :]} | {b.name for b in arch.up[:d]}
    for ref in sorted(drop_layers | {u.rsplit(".", 1)[0] for u in skip_units} | set(depth)):
        if ref.split(".")[0] in removed:
            _fail(f"{ref} refers to block {ref.split('.')[0]}, which drop_stages={d} removes")
    kept_stages = n - d

    def block_plan(b: BlockDesc, student_path: str, keep_sampler: bool) -> BlockPlan:
        kept = tuple(j for j in range(len(b.layers)) if f"{b.name}.{j}" not in drop_layers)
        units = frozenset(u for u in skip_units if u.startswith(b.name + "."))
        dep = tuple(
            (j, depth.get(f"{b.name}.{j}", b.layers[j].attn.depth))
            for j in kept
            if b.layers[j].attn is not None and f"{b.name}.{j}.attn" not in units
        )
        return BlockPlan(b, student_path, kept, units, dep, keep_sampler)

    down = tuple(
        block_plan(arch.down[i], f"down_blocks.{i}", arch.down[i].sampler is not None and i < kept_stages - 1)
        for i in range(kept_stages)
    )
    mid = None
    if arch.mid is not None and not cand.drop_mid:
        mid = block_plan(arch.mid, "mid_block", False)
    elif cand.drop_mid and arch.mid is None:
        _fail("drop_mid: the base has no mid block")
    up = tuple(block_plan(arch.up[d + k], f"up_blocks.{k}", arch.up[d + k].sampler is not None) for k in range(kept_stages))

    _check_recombination_and_prune(arch, cand, removed, mid is not None, kept_stages)
    _walk_channels(arch, down, mid, up)
    mapping = _mapping(down, up)
    try:
        structure, reason = _config(arch, cand, down, mid, up), None
    except NotExpressibleError as e:
        structure, reason = None, str(e)
    config = structure
    if cand.prune and structure is not None:
        config, reason = None, "channel-pruned widths have no diffusers config field; saved with their pruning record"
    return Plan(arch, cand, down, mid, up, config, reason, mapping, structure)


_NON_BLOCK_PARTS = ("conv_in", "time_embedding", "conv_out")


def _check_recombination_and_prune(arch: UNetArch, cand: Candidate, removed: set[str], has_mid: bool, kept_stages: int) -> None:
    valid = [b for b in arch.block_names if b not in removed and (b != "mid" or has_mid)]
    for field_name, names in (("base_blocks", cand.base_blocks), ("frozen", cand.frozen)):
        for n in names:
            if n in _NON_BLOCK_PARTS and field_name == "frozen":
                continue
            if n not in valid:
                why = "is removed by this candidate" if n in arch.block_names else "does not exist"
                _fail(f"{field_name}: block {n!r} {why}; blocks: {', '.join(valid)}")
    for key, _ in cand.prune:
        if key == "all":
            continue
        if key == "mid":
            if not has_mid:
                _fail("prune: 'mid' names the mid block, which this candidate removes or the base lacks")
            continue
        i = int(key[len("stage"):])
        if i >= kept_stages:
            _fail(f"prune: {key!r} does not exist; this candidate has stages stage0..stage{kept_stages - 1}")


def _walk_channels(arch: UNetArch, down, mid, up) -> None:
    """Follow channels and skip connections through the student exactly as diffusers' forward does."""
    c = arch.conv_in_channels
    skips: list[tuple[int, str]] = [(c, "conv_in")]

    def through(bp: BlockPlan, j: int, c: int, skip: tuple[int, str] | None = None) -> int:
        layer = bp.base.layers[j]
        r_name, a_name = f"{layer.name}.resnet", f"{layer.name}.attn"
        if r_name in bp.skip_units:
            if skip is not None:
                _fail(f"{r_name}: an up-block ResNet consumes the skip connection {skip[1]}; drop the whole layer {layer.name} instead")
            if layer.resnet.in_channels != layer.resnet.out_channels:
                _fail(
                    f"{r_name} changes channels {layer.resnet.in_channels}->{layer.resnet.out_channels}; "
                    f"without it {layer.name} would receive {c} channels where {layer.resnet.out_channels} are needed"
                )
        else:
            need = layer.resnet.in_channels
            got = c + (skip[0] if skip else 0)
            if got != need:
                how = f"{c} from the previous layer + {skip[0]} from skip {skip[1]}" if skip else f"{c}"
                _fail(f"{bp.name}: skip connections no longer meet at {layer.name}: it receives {how} = {got} channels, its ResNet expects {need}")
            c = layer.resnet.out_channels
        if layer.attn is not None and a_name not in bp.skip_units and c != layer.attn.in_channels:
            _fail(f"{bp.name}: {a_name} expects {layer.attn.in_channels} channels, receives {c}")
        return c

    for bp in down:
        for j in bp.kept:
            c = through(bp, j, c)
            skips.append((c, bp.base.layers[j].name))
        if bp.keep_sampler:
            if c != bp.base.sampler_channels:
                _fail(f"{bp.name}: its downsampler expects {bp.base.sampler_channels} channels, receives {c}")
            skips.append((c, f"{bp.name}.downsampler"))
    if mid is not None:
        for j in range(len(mid.base.layers)):
            c = through(mid, j, c)
    for bp in up:
        if not bp.kept:
            _fail(f"{bp.name}: an up block needs at least one layer (all {len(bp.base.layers)} are dropped)")
        for j in bp.kept:
            if not skips:
                _fail(f"{bp.name}: layer {bp.base.layers[j].name} has no skip connection left to consume")
            c = through(bp, j, c, skips.pop())
        if bp.keep_sampler and c != bp.base.sampler_channels:
            _fail(f"{bp.name}: its upsampler expects {bp.base.sampler_channels} channels, receives {c}")
    if skips:
        _fail(
            f"skip connections no longer meet: {len(skips)} produced by the down path are never consumed "
            f"({', '.join(s[1] for s in skips)}); keep one more up layer for each, or drop as many down layers"
        )
    if c != arch.out_norm_channels:
        _fail(f"output: conv_out expects {arch.out_norm_channels} channels, receives {c}")


def _mapping(down, up) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for bp in down + up:
        for k, j in enumerate(bp.kept):
            for sub in ("resnets", "attentions"):
                pairs.append((f"{bp.student_path}.{sub}.{k}.", f"{bp.base.path}.{sub}.{j}."))
        if bp.keep_sampler and bp.base.sampler:
            samp = bp.base.sampler.split(".", 2)[-1]  # "downsamplers.0"
            pairs.append((f"{bp.student_path}.{samp}.", f"{bp.base.sampler}."))
    return tuple(pairs)


_PER_BLOCK_KEYS = (
    "block_out_channels",
    "down_block_types",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "transformer_layers_per_block",
    "layers_per_block",
)


def _config(arch: UNetArch, cand: Candidate, down, mid, up) -> dict[str, Any]:
    units = sorted(u for bp in down + up + ((mid,) if mid else ()) for u in bp.skip_units)
    if units:
        raise NotExpressibleError(f"unit removal ({', '.join(units)}) has no diffusers config field; built by module surgery")
    kept = len(down)
    for i, bp in enumerate(down):
        ub = up[kept - 1 - i]
        if len(ub.kept) != len(bp.kept) + 1:
            raise NotExpressibleError(
                f"{ub.name} keeps {len(ub.kept)} layers while {bp.name} keeps {len(bp.kept)}: diffusers builds "
                "layers_per_block+1 up layers per stage; built by module surgery"
            )
    cfg = copy.deepcopy(dict(arch.config))
    d = cand.drop_stages
    for key in _PER_BLOCK_KEYS:
        if isinstance(cfg.get(key), (list, tuple)):
            cfg[key] = list(cfg[key])[:kept]
    cfg["up_block_types"] = list(cfg["up_block_types"])[d:]
    if isinstance(cfg.get("reverse_transformer_layers_per_block"), (list, tuple)):
        cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"])[d:]
    lpb = [len(bp.kept) for bp in down]
    cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else lpb
    if mid is None:
        cfg["mid_block_type"] = None

    # transformer depth: keep the base's form where it still holds, else per-layer lists
    base_form = _depth_form(arch, down, mid, up, uniform_only=True)
    if base_form is None:
        base_form = _depth_form(arch, down, mid, up, uniform_only=False)
    if base_form is None:
        raise NotExpressibleError(
            f"mid block depth {mid.depth_of(0)} differs from {down[-1].name} layer 0: diffusers ties them; built by module surgery"
        )
    tlpb, rev = base_form
    if "transformer_layers_per_block" not in arch.config and tlpb == 1 and rev is None:
        return cfg  # the diffusers default, as in the base
    cfg["transformer_layers_per_block"] = tlpb
    if rev is None:
        cfg.pop("reverse_transformer_layers_per_block", None)
    else:
        cfg["reverse_transformer_layers_per_block"] = rev
    return cfg


def _depth_form(arch, down, mid, up, uniform_only: bool):
    kept = len(down)
    mid_depth = mid.depth_of(0) if mid is not None and mid.base.layers[0].attn is not None else None

    def depths(bp: BlockPlan) -> list[int] | None:
        if not any(bp.base.layers[j].attn for j in range(len(bp.base.layers))):
            return None  # a block type without attention
        return [bp.depth_of(j) for j in bp.kept]

    down_d = [depths(bp) for bp in down]
    up_d = [depths(bp) for bp in up]
    if uniform_only:
        vals: list[int] = []
        for i in range(kept):
            dd, ud = down_d[i], up_d[kept - 1 - i]
            cand_vals = set(dd or []) | set(ud or [])
            if len(cand_vals) > 1:
                return None
            vals.append(cand_vals.pop() if cand_vals else 1)
        if mid_depth is not None:
            if down_d[-1] is None and up_d[0] is None:
                vals[-1] = mid_depth
            elif vals[-1] != mid_depth:
                return None
        return (vals[0] if len(set(vals)) == 1 else vals), None
    tl = []
    for i, dd in enumerate(down_d):
        if dd is None or not dd:
            fill = mid_depth if (i == kept - 1 and mid_depth is not None) else 1
            tl.append([fill] * max(1, len(down[i].kept)))
        else:
            tl.append(dd)
    if mid_depth is not None and tl[-1][0] != mid_depth:
        return None
    rev = [ud if ud else [1] * len(up[k].kept) for k, ud in enumerate(up_d)]
    return tl, rev
