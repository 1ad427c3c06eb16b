"""Candidates: small, frozen, serialisable descriptions of edits of a base U-Net.

A candidate names what to remove from a base U-Net, in the base's own block names
(see :mod:`hybridsd_nas.arch.model`):

- ``drop_layers``: whole layers (ResNet + Transformer), e.g. ``"down1.1"``, ``"up0.1"``;
- ``drop_units``: single units, e.g. ``"down2.0.attn"``, ``"mid.0.attn"``, ``"down1.1.resnet"``;
- ``drop_mid``: remove the mid block;
- ``drop_stages``: remove that many innermost stages (down block, its mirrored up block and the
  downsampler that fed it), as BK-SDM-Tiny removes one;
- ``depth``: transformer depth per layer (``"down1.0": 1``) or per block (``"up1": 2``); it can
  only shrink (the first blocks are kept); depth 0 removes the Transformer unit.
- ``base_blocks`` (recombination, A-SDM's model assembly): blocks whose weights come from a
  compressed "Base" U-Net instead of the teacher; ``frozen``: blocks (or ``conv_in``,
  ``time_embedding``, ``conv_out``) that get no gradient when the student is trained.
- ``prune`` (channel pruning): keep ratios per stage, ``{"stage0": {"resnet": 0.5, "heads": 0.5,
  "ff": 0.75}}``; ``stageN`` is down block N and its mirrored up block, ``mid`` the mid block,
  ``all`` every stage not named. ``importance`` names the criterion that picks what is cut.

The value is canonical (sorted, de-duplicated), hashable, and has a stable content hash
(:attr:`Candidate.key`) over its structure only; ``name`` is a label outside the hash. Fields added
later (channel widths) have empty defaults and stay out of the serialised form when empty, so
existing hashes never change.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hybridsd_nas.core.errors import ConfigError, InvalidCandidateError, UnknownNameError
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.prune import IMPORTANCE, TARGETS

SCHEMA_VERSION = 1

_LAYER_RE = re.compile(r"^(?:(?:down|up)\d+|mid)\.\d+$")
_UNIT_RE = re.compile(r"^(?:(?:down|up)\d+|mid)\.\d+\.(?:resnet|attn)$")
_DEPTH_RE = re.compile(r"^(?:(?:down|up)\d+|mid)(?:\.\d+)?$")
_BLOCK_RE = re.compile(r"^(?:(?:down|up)\d+|mid|conv_in|time_embedding|conv_out)$")
_PRUNE_KEY_RE = re.compile(r"^(?:stage\d+|mid|all)$")


def _sorted_names(names: Any, what: str, pattern: re.Pattern[str], example: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise InvalidCandidateError(f"{what} must be a list of names like {example!r}, got {names!r}")
    out = set()
    for n in names:
        if not isinstance(n, str) or not pattern.match(n):
            raise InvalidCandidateError(f"{what}: {n!r} is not a name like {example!r}")
        out.add(n)
    return tuple(sorted(out, key=_natural))


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


@dataclass(frozen=True)
class Candidate:
    drop_layers: tuple[str, ...] = ()
    drop_units: tuple[str, ...] = ()
    drop_mid: bool = False
    drop_stages: int = 0
    depth: tuple[tuple[str, int], ...] = ()
    base_blocks: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    prune: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    importance: str | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "drop_layers", _sorted_names(self.drop_layers, "drop_layers", _LAYER_RE, "down1.1"))
        set_(self, "drop_units", _sorted_names(self.drop_units, "drop_units", _UNIT_RE, "down2.0.attn"))
        if not isinstance(self.drop_mid, bool):
            raise InvalidCandidateError(f"drop_mid must be true or false, got {self.drop_mid!r}")
        if isinstance(self.drop_stages, bool) or not isinstance(self.drop_stages, int) or self.drop_stages < 0:
            raise InvalidCandidateError(f"drop_stages must be a non-negative integer, got {self.drop_stages!r}")
        depth = dict(self.depth.items()) if isinstance(self.depth, Mapping) else dict(self.depth)
        for k, v in depth.items():
            if not isinstance(k, str) or not _DEPTH_RE.match(k):
                raise InvalidCandidateError(f"depth: {k!r} is not a layer or block name like 'down1.0' or 'up1'")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidCandidateError(f"depth[{k!r}] must be a non-negative integer, got {v!r}")
        set_(self, "depth", tuple(sorted(depth.items(), key=lambda kv: _natural(kv[0]))))
        set_(self, "base_blocks", _sorted_names(self.base_blocks, "base_blocks", _BLOCK_RE, "down0"))
        set_(self, "frozen", _sorted_names(self.frozen, "frozen", _BLOCK_RE, "up1"))
        prune = dict(self.prune.items()) if isinstance(self.prune, Mapping) else dict(self.prune)
        canon = []
        for k, ratios in prune.items():
            if not isinstance(k, str) or not _PRUNE_KEY_RE.match(k):
                raise InvalidCandidateError(f"prune: {k!r} is not a stage key; use stageN, mid or all")
            r = dict(ratios.items()) if isinstance(ratios, Mapping) else dict(ratios)
            for t, v in r.items():
                if t not in TARGETS:
                    raise InvalidCandidateError(f"prune[{k!r}]: unknown target {t!r}; targets: {', '.join(TARGETS)}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                    raise InvalidCandidateError(f"prune[{k!r}][{t!r}] must be a keep ratio in (0, 1], got {v!r}")
            r = {t: float(v) for t, v in r.items() if float(v) != 1.0}
            if r:
                canon.append((k, tuple(sorted(r.items()))))
        set_(self, "prune", tuple(sorted(canon, key=lambda kv: _natural(kv[0]))))
        if self.importance is not None and self.importance not in IMPORTANCE:
            raise InvalidCandidateError(f"importance {self.importance!r} is unknown; known: {', '.join(IMPORTANCE.names())}")
        if not self.prune:
            set_(self, "importance", None)  # no pruning, nothing to choose
        elif self.importance is None:
            set_(self, "importance", "magnitude")

    # -- identity --------------------------------------------------------------------------
    def to_dict(self, with_name: bool = True) -> dict[str, Any]:
        """The canonical serialised form: only fields that differ from the defaults."""
        d: dict[str, Any] = {}
        if self.drop_layers:
            d["drop_layers"] = list(self.drop_layers)
        if self.drop_units:
            d["drop_units"] = list(self.drop_units)
        if self.drop_mid:
            d["drop_mid"] = True
        if self.drop_stages:
            d["drop_stages"] = self.drop_stages
        if self.depth:
            d["depth"] = dict(self.depth)
        if self.base_blocks:
            d["base_blocks"] = list(self.base_blocks)
        if self.frozen:
            d["frozen"] = list(self.frozen)
        if self.prune:
            d["prune"] = {k: dict(v) for k, v in self.prune}
            d["importance"] = self.importance
        if with_name and self.name:
            d["name"] = self.name
        return d

    @property
    def key(self) -> str:
        """Stable 12-hex content hash of the structure (the name is not part of it)."""
        blob = json.dumps({"v": SCHEMA_VERSION, **self.to_dict(with_name=False)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """The name, else the readable structure (:attr:`summary`); ``identity`` for the teacher's own."""
        return self.name or self.summary or "identity"

    @property
    def summary(self) -> str:
        """The structure in a few words, e.g. ``-down1.1 -up2.0 -mid prune[stage1: ff 0.5]``; "" for
        the teacher itself. Long structures are cut after 80 characters (the key stays exact)."""
        parts = [f"-{n}" for n in (*self.drop_layers, *self.drop_units)]
        if self.drop_mid:
            parts.append("-mid")
        if self.drop_stages:
            parts.append(f"-stages{self.drop_stages}")
        parts += [f"{k}={v}" for k, v in self.depth]
        if self.base_blocks:
            parts.append("base[" + ",".join(self.base_blocks) + "]")
        if self.frozen:
            parts.append("frozen[" + ",".join(self.frozen) + "]")
        if self.prune:
            inner = "; ".join(f"{k}: " + ", ".join(f"{t} {v:g}" for t, v in ratios) for k, ratios in self.prune)
            parts.append(f"prune[{inner}]" + (f"({self.importance})" if self.importance != "magnitude" else ""))
        text = " ".join(parts)
        return text if len(text) <= 80 else text[:79].rstrip() + "…"

    def prune_ratios(self, stage_key: str) -> dict[str, float]:
        """Keep ratios of one stage key (``stageN`` or ``mid``): its own, else ``all``, else 1."""
        table = {k: dict(v) for k, v in self.prune}
        base = {t: 1.0 for t in TARGETS}
        base.update(table.get("all", {}))
        base.update(table.get(stage_key, {}))
        return base

    @property
    def is_identity(self) -> bool:
        return not self.to_dict(with_name=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_name(self, name: str | None) -> "Candidate":
        return Candidate(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}, name=name)

    # -- reading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "candidate") -> "Candidate":
        if not isinstance(d, Mapping):
            raise InvalidCandidateError(f"{source}: a candidate must be a mapping, got {type(d).__name__}")
        allowed = {f.name for f in fields(cls)}
        body = {k: v for k, v in d.items() if k not in ("version", "key", "kind")}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidCandidateError(
                f"{source}: unknown candidate key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
            )
        try:
            return cls(**body)
        except InvalidCandidateError as e:
            raise InvalidCandidateError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Candidate":
        """Read a candidate from a JSON or YAML file (no pickles)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"candidate file {str(p)!r} does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
            raise ConfigError(f"{p}: cannot parse candidate ({str(e).splitlines()[0]})") from None
        if isinstance(data, Mapping) and "candidate" in data and isinstance(data["candidate"], Mapping):
            data = data["candidate"]  # an export's metadata or an `enumerate --json` row
        return cls.from_dict(data, source=str(p))


IDENTITY = Candidate(name="identity")


# -- named candidates: functions of the base architecture -----------------------------------
def _bk_base(arch) -> Candidate:
    """BK-SDM-Base on any SD-style base: keep layer 0 of each down block and the first and last
    layer of each up block (BK-SDM's student up layer 1 takes the teacher's layer 2)."""
    drop = [f"{b.name}.{j}" for b in arch.down for j in range(1, len(b.layers))]
    drop += [f"{b.name}.{j}" for b in arch.up for j in range(1, len(b.layers) - 1)]
    return Candidate(drop_layers=tuple(drop), name="bk-sdm-base")


def _bk_small(arch) -> Candidate:
    c = _bk_base(arch)
    return Candidate(drop_layers=c.drop_layers, drop_mid=True, name="bk-sdm-small")


def _bk_tiny(arch) -> Candidate:
    c = _bk_base(arch)
    inner_down, inner_up = arch.down[-1].name, arch.up[0].name
    layers = tuple(n for n in c.drop_layers if not n.startswith((inner_down + ".", inner_up + ".")))
    return Candidate(drop_layers=layers, drop_mid=True, drop_stages=1, name="bk-sdm-tiny")


def recombine(arch, base_blocks, frozen_original: bool, name: str | None = None) -> Candidate:
    """A-SDM's model assembly: ``base_blocks`` come from the compressed Base U-Net (BK-SDM-Base
    structure: BK-SDM's layer drops in those blocks, weights from the Base), the rest from the
    original U-Net; with ``frozen_original`` the original blocks, and the parts outside blocks
    (conv_in, time embedding, conv_out), get no gradient."""
    base_blocks = tuple(base_blocks)
    bk = set(_bk_base(arch).drop_layers)
    drop = tuple(n for n in bk if n.split(".")[0] in base_blocks)
    frozen: tuple[str, ...] = ()
    if frozen_original:
        frozen = tuple(b for b in arch.block_names if b not in base_blocks) + ("conv_in", "time_embedding", "conv_out")
    return Candidate(drop_layers=drop, base_blocks=base_blocks, frozen=frozen, name=name)


# A-SDM table 2: M1-M3 freeze the original (SD*) parts, M4-M6 train everything.
_ASDM_BASE_BLOCKS = {
    1: ("down0", "up3"),
    2: ("down0", "down1", "up2", "up3"),
    3: ("down0", "down1", "down2", "up1", "up2", "up3"),
}


def _asdm(i: int):
    return lambda arch: recombine(arch, _ASDM_BASE_BLOCKS[(i - 1) % 3 + 1], frozen_original=i <= 3, name=f"asdm-m{i}")


# name -> factory(arch) -> Candidate, defined on any SD-style base
CANDIDATE_PRESETS: Registry[Callable[[Any], Candidate]] = Registry("candidate preset")
CANDIDATE_PRESETS.register("identity", lambda arch: IDENTITY, help="the base itself (no edit)")
CANDIDATE_PRESETS.register("bk-sdm-base", _bk_base, help="BK-SDM-Base: one layer per down block, two per up block")
CANDIDATE_PRESETS.register("bk-sdm-small", _bk_small, help="BK-SDM-Small: BK-SDM-Base without the mid block")
CANDIDATE_PRESETS.register("bk-sdm-tiny", _bk_tiny, help="BK-SDM-Tiny: BK-SDM-Small without the innermost stage")
for _i in range(1, 7):
    CANDIDATE_PRESETS.register(f"asdm-m{_i}", _asdm(_i), help=f"A-SDM M{_i}: Base blocks {', '.join(_ASDM_BASE_BLOCKS[(_i - 1) % 3 + 1])}"
                               + (", the original parts frozen" if _i <= 3 else ", all trainable"))


def list_candidate_presets() -> list[str]:
    return list(CANDIDATE_PRESETS.names())


def candidate_preset(name: str, arch) -> Candidate:
    return CANDIDATE_PRESETS.get(name)(arch)


def resolve_candidate(spec: "str | Path | Mapping[str, Any] | Candidate | None", arch) -> Candidate:
    """A candidate from a preset name, a JSON/YAML file, a dict, or a Candidate."""
    if spec is None:
        return IDENTITY
    if isinstance(spec, Candidate):
        return spec
    if isinstance(spec, Mapping):
        return Candidate.from_dict(spec)
    s = str(spec)
    if s in CANDIDATE_PRESETS:
        return candidate_preset(s, arch)
    if Path(s).suffix in (".json", ".yaml", ".yml") or Path(s).exists():
        return Candidate.load(s)
    raise UnknownNameError("candidate (preset or JSON/YAML file)", s, CANDIDATE_PRESETS.names())
