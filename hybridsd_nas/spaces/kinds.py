"""The four kinds of space."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from hybridsd_nas.arch import Candidate, UNetArch, candidate_preset, plan, recombine, resolve_candidate
from hybridsd_nas.core.errors import ConfigError, InvalidCandidateError
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.prune import IMPORTANCE, TARGETS
from hybridsd_nas.spaces.base import Categorical, Dimension, Float, SearchSpace, SpacePoint


def _stage_pairs(arch: UNetArch) -> list[tuple[int, str, str]]:
    n = arch.n_stages
    return [(i, arch.down[i].name, arch.up[n - 1 - i].name) for i in range(n)]


def _pattern(down: tuple[int, ...], up: tuple[int, ...]) -> str:
    return f"d{','.join(map(str, down)) or '-'}|u{','.join(map(str, up)) or '-'}"


def _parse_pattern(p: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d, u = p.split("|")
    parse = lambda s: tuple(int(x) for x in s[1:].split(",")) if s[1:] != "-" else ()  # noqa: E731
    return parse(d), parse(u)


@lru_cache(maxsize=64)
def _stage_patterns(arch: UNetArch, i: int) -> tuple[str, ...]:
    """Every (kept down layers, kept up layers) of stage ``i`` whose skip connections still meet,
    with the up block keeping one layer more than the down block (diffusers' rule)."""
    _, dname, uname = _stage_pairs(arch)[i]
    ld, lu = len(arch.block(dname).layers), len(arch.block(uname).layers)
    out = []
    for k in range(ld + 1):
        for down in itertools.combinations(range(ld), k):
            for up in itertools.combinations(range(lu), k + 1):
                drop = [f"{dname}.{j}" for j in range(ld) if j not in down] + [f"{uname}.{j}" for j in range(lu) if j not in up]
                try:
                    plan(arch, Candidate(drop_layers=drop))
                except InvalidCandidateError:
                    continue
                out.append(_pattern(down, up))
    return tuple(out)


class LayerRemovalSpace(SearchSpace):
    """Per-layer keep/drop in each stage, mid block on/off, innermost stage on/off, transformer depth.

    Options: ``mid`` ([keep, drop]), ``innermost_stage`` ([keep, drop]), ``depth`` (choices of
    transformer depth per stage: ``full`` or integers), ``patterns`` (``all`` valid layer subsets,
    or ``bk`` for the BK-SDM rule only: keep a prefix of the down layers and drop from the middle
    of the up block).
    """

    kind = "layer-removal"
    option_keys = ("mid", "innermost_stage", "depth", "patterns")

    def validate_options(self) -> None:
        super().validate_options()
        for key in ("mid", "innermost_stage"):
            vals = self.options.setdefault(key, ["keep", "drop"])
            if not isinstance(vals, list) or not vals or not set(vals) <= {"keep", "drop"}:
                raise ConfigError(f"{self.source}: options.{key} must be a non-empty list of keep/drop, got {vals!r}")
        depth = self.options.setdefault("depth", ["full"])
        if not isinstance(depth, list) or not depth or not all(d == "full" or (isinstance(d, int) and d >= 1) for d in depth):
            raise ConfigError(f"{self.source}: options.depth must be a list of 'full' or positive integers, got {depth!r}")
        pat = self.options.setdefault("patterns", "all")
        if pat not in ("all", "bk"):
            raise ConfigError(f"{self.source}: options.patterns must be 'all' or 'bk', got {pat!r}")

    def _patterns(self, arch: UNetArch, i: int) -> tuple[str, ...]:
        pats = _stage_patterns(arch, i)
        if self.options["patterns"] == "bk":
            def bk(p):
                d, u = _parse_pattern(p)
                return d == tuple(range(len(d))) and (len(u) < 2 or (u[0] == 0 and u[-1] == len(arch.up[arch.n_stages - 1 - i].layers) - 1))
            pats = tuple(p for p in pats if bk(p))
        return pats

    def dimensions(self, arch: UNetArch) -> dict[str, Dimension]:
        dims: dict[str, Dimension] = {f"stage{i}": Categorical(self._patterns(arch, i)) for i in range(arch.n_stages)}
        if arch.mid is not None:
            dims["mid"] = Categorical(tuple(self.options["mid"]))
        if arch.n_stages > 1:
            dims["innermost_stage"] = Categorical(tuple(self.options["innermost_stage"]))
        if len(self.options["depth"]) > 1:
            for i, dname, _ in _stage_pairs(arch):
                if any(layer.attn for layer in arch.block(dname).layers):
                    dims[f"depth_stage{i}"] = Categorical(tuple(self.options["depth"]))
        return dims

    def point(self, arch: UNetArch, params: Mapping[str, Any]) -> SpacePoint:
        drop: list[str] = []
        depth: dict[str, int] = {}
        drop_inner = params.get("innermost_stage", "keep") == "drop"
        n = arch.n_stages
        for i, dname, uname in _stage_pairs(arch):
            if drop_inner and i == n - 1:
                continue
            down, up = _parse_pattern(params[f"stage{i}"])
            drop += [f"{dname}.{j}" for j in range(len(arch.block(dname).layers)) if j not in down]
            drop += [f"{uname}.{j}" for j in range(len(arch.block(uname).layers)) if j not in up]
            d = params.get(f"depth_stage{i}", "full")
            if d != "full":
                for bname, kept in ((dname, down), (uname, up)):
                    for j in kept:
                        layer = arch.block(bname).layers[j]
                        if layer.attn is not None:
                            depth[layer.name] = min(int(d), layer.attn.depth)
        cand = Candidate(drop_layers=drop, drop_mid=params.get("mid", "keep") == "drop",
                         drop_stages=1 if drop_inner else 0, depth=depth)
        plan(arch, cand)  # raises InvalidCandidateError for impossible combinations
        return SpacePoint(params, cand)

    def presets(self, arch: UNetArch) -> dict[str, Candidate]:
        return {n: candidate_preset(n, arch) for n in ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")}

    def unit_groups(self, arch: UNetArch) -> list[list[str]]:
        # A stage's up block keeps one layer more than its down block, so it takes exactly its own
        # stage's skips; block entry and exit channels are fixed by block_out_channels. A unit's
        # shapes then follow from its stage's pattern and depth, and from mid/innermost (global).
        return [[f"stage{i}", f"depth_stage{i}"] for i in range(arch.n_stages)]


class RecombinationSpace(SearchSpace):
    """A-SDM's model assembly: each stage (down block + mirrored up block) and the mid block come
    from the compressed Base U-Net or the original; the original parts frozen or trainable.

    Options: ``sources`` ([original, base]), ``freeze`` ([original, none]: freeze the original
    parts, A-SDM's *, or train everything), ``mid`` (sources allowed for the mid block)."""

    kind = "recombination"
    option_keys = ("sources", "freeze", "mid")

    def validate_options(self) -> None:
        super().validate_options()
        for key, allowed in (("sources", {"original", "base"}), ("mid", {"original", "base"}), ("freeze", {"original", "none"})):
            vals = self.options.setdefault(key, sorted(allowed, reverse=key != "freeze"))
            if not isinstance(vals, list) or not vals or not set(vals) <= allowed:
                raise ConfigError(f"{self.source}: options.{key} must be a non-empty list of {', '.join(sorted(allowed))}, got {vals!r}")

    def dimensions(self, arch: UNetArch) -> dict[str, Dimension]:
        dims: dict[str, Dimension] = {f"stage{i}": Categorical(tuple(self.options["sources"])) for i in range(arch.n_stages)}
        if arch.mid is not None:
            dims["mid"] = Categorical(tuple(self.options["mid"]))
        dims["freeze"] = Categorical(tuple(self.options["freeze"]))
        return dims

    def point(self, arch: UNetArch, params: Mapping[str, Any]) -> SpacePoint:
        blocks = []
        for i, dname, uname in _stage_pairs(arch):
            if params[f"stage{i}"] == "base":
                blocks += [dname, uname]
        if params.get("mid") == "base":
            blocks.append("mid")
        cand = recombine(arch, blocks, frozen_original=params["freeze"] == "original" and bool(blocks))
        plan(arch, cand)
        return SpacePoint(params, cand)

    def presets(self, arch: UNetArch) -> dict[str, Candidate]:
        return {f"asdm-m{i}": candidate_preset(f"asdm-m{i}", arch) for i in range(1, 7)}

    def unit_groups(self, arch: UNetArch) -> list[list[str]]:
        # a stage taken from the Base is the Base's down and up block, which take their own skips;
        # block entry and exit channels are the same in both U-Nets
        return [[f"stage{i}"] for i in range(arch.n_stages)]


class ChannelPruningSpace(SearchSpace):
    """Keep ratios per stage for ResNet inner channels, attention heads and feed-forward width,
    on top of a starting structure (Hybrid SD prunes BK-SDM-Tiny), with an importance criterion.

    Options: ``start`` (candidate preset or file the pruning starts from), ``ratios`` (discrete
    keep ratios) or ``ratio_range`` ([low, high], continuous), ``targets`` (subset of resnet,
    heads, ff), ``importance`` (criteria to choose from)."""

    kind = "channel-pruning"
    option_keys = ("start", "ratios", "ratio_range", "targets", "importance")

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        o.setdefault("start", "identity")
        if "ratios" in o and "ratio_range" in o:
            raise ConfigError(f"{self.source}: give options.ratios or options.ratio_range, not both")
        if "ratio_range" in o:
            rr = o["ratio_range"]
            if not (isinstance(rr, list) and len(rr) == 2 and all(isinstance(v, (int, float)) for v in rr) and 0 < rr[0] < rr[1] <= 1):
                raise ConfigError(f"{self.source}: options.ratio_range must be [low, high] with 0 < low < high <= 1, got {rr!r}")
        else:
            r = o.setdefault("ratios", [0.25, 0.5, 0.75, 1.0])
            if not isinstance(r, list) or not r or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in r):
                raise ConfigError(f"{self.source}: options.ratios must be keep ratios in (0, 1], got {r!r}")
        t = o.setdefault("targets", list(TARGETS))
        if not isinstance(t, list) or not t or not set(t) <= set(TARGETS):
            raise ConfigError(f"{self.source}: options.targets must be a subset of {', '.join(TARGETS)}, got {t!r}")
        imp = o.setdefault("importance", ["magnitude"])
        if not isinstance(imp, list) or not imp or not set(imp) <= set(IMPORTANCE.names()):
            raise ConfigError(f"{self.source}: options.importance must be a subset of {', '.join(IMPORTANCE.names())}, got {imp!r}")

    def start(self, arch: UNetArch) -> Candidate:
        return resolve_candidate(self.options["start"], arch)

    def _stage_keys(self, arch: UNetArch) -> list[str]:
        p = plan(arch, self.start(arch))
        keys = [f"stage{i}" for i in range(len(p.down))]
        return keys + (["mid"] if p.mid is not None else [])

    def dimensions(self, arch: UNetArch) -> dict[str, Dimension]:
        dims: dict[str, Dimension] = {}
        for key in self._stage_keys(arch):
            for t in self.options["targets"]:
                if "ratio_range" in self.options:
                    lo, hi = self.options["ratio_range"]
                    dims[f"{key}.{t}"] = Float(float(lo), float(hi))
                else:
                    dims[f"{key}.{t}"] = Categorical(tuple(float(v) for v in self.options["ratios"]))
        if len(self.options["importance"]) > 1:
            dims["importance"] = Categorical(tuple(self.options["importance"]))
        return dims

    def unit_groups(self, arch: UNetArch) -> list[list[str]]:
        # keep ratios cut channels inside a ResNet (its inner width) or a Transformer (heads, feed-forward
        # width): a unit's inputs and outputs keep their shapes, so its own stage's ratios decide it
        return [[f"{key}.{t}" for t in self.options["targets"]] for key in self._stage_keys(arch)]

    def point(self, arch: UNetArch, params: Mapping[str, Any]) -> SpacePoint:
        s = self.start(arch)
        prune: dict[str, dict[str, float]] = {}
        for k, v in params.items():
            if "." in k:
                key, t = k.split(".")
                prune.setdefault(key, {})[t] = float(v)
        cand = Candidate(drop_layers=s.drop_layers, drop_units=s.drop_units, drop_mid=s.drop_mid, drop_stages=s.drop_stages,
                         depth=s.depth, prune=prune, importance=params.get("importance", self.options["importance"][0]))
        plan(arch, cand)
        return SpacePoint(params, cand)


class HybridScheduleSpace(SearchSpace):
    """Which U-Net runs which denoising steps: the order (large model first, as Hybrid SD, or
    small first, as A-SDM's S1), the switch step, and which small U-Net.

    Options: ``steps`` (total denoising steps), ``switch_every`` (grid of switch steps),
    ``orders`` ([large-first, small-first]), ``small`` (candidate presets or files of the small
    U-Net). A point's candidate is the small U-Net; its schedule is in ``schedule``."""

    kind = "hybrid-schedule"
    option_keys = ("steps", "switch_every", "orders", "small")

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        steps = o.setdefault("steps", 25)
        every = o.setdefault("switch_every", 5)
        if not isinstance(steps, int) or steps < 1 or not isinstance(every, int) or every < 1:
            raise ConfigError(f"{self.source}: options.steps and options.switch_every must be positive integers")
        orders = o.setdefault("orders", ["large-first", "small-first"])
        if not isinstance(orders, list) or not orders or not set(orders) <= {"large-first", "small-first"}:
            raise ConfigError(f"{self.source}: options.orders must be a non-empty list of large-first, small-first, got {orders!r}")
        small = o.setdefault("small", ["bk-sdm-tiny"])
        if not isinstance(small, list) or not small or not all(isinstance(s, str) for s in small):
            raise ConfigError(f"{self.source}: options.small must be a list of candidate presets or files, got {small!r}")

    def dimensions(self, arch: UNetArch) -> dict[str, Dimension]:
        o = self.options
        switches = tuple(sorted(set(range(0, o["steps"] + 1, o["switch_every"])) | {o["steps"]}))
        dims: dict[str, Dimension] = {"order": Categorical(tuple(o["orders"])), "switch": Categorical(switches)}
        dims["small"] = Categorical(tuple(o["small"]))
        return dims

    def point(self, arch: UNetArch, params: Mapping[str, Any]) -> SpacePoint:
        steps = self.options["steps"]
        k = int(params["switch"])
        if not 0 <= k <= steps:
            raise InvalidCandidateError(f"switch step {k} is outside 0..{steps}")
        small = resolve_candidate(params["small"], arch)
        plan(arch, small)
        first = "large" if params["order"] == "large-first" else "small"
        models = [first, "small" if first == "large" else "large"]
        sched = {"models": models, "steps": [k, steps - k], "small": params["small"], "total_steps": steps}
        return SpacePoint(params, small, {"schedule": sched})

    def _point_key(self, pt: SpacePoint) -> str:
        s = pt.extra["schedule"]
        # a schedule with no steps for one model is the same run whatever the order says
        runs = tuple((m, k) for m, k in zip(s["models"], s["steps"]) if k > 0)
        return repr((runs, pt.candidate.key if any(m == "small" for m, _ in runs) else None))


# the ``kind:`` of a space YAML -> the class that reads its options and draws its candidates
SPACE_KINDS: Registry[type[SearchSpace]] = Registry("space kind")
for _cls in (LayerRemovalSpace, RecombinationSpace, ChannelPruningSpace, HybridScheduleSpace):
    SPACE_KINDS.register(_cls.kind, _cls, help=(_cls.__doc__ or "").strip().split("\n")[0])
