"""The pruning record: what was cut, where, and what was asked against what was done (JSON).

A record lists one :class:`GroupRecord` per pruned module (a ResnetBlock2D, an Attention or a
FeedForward): its module path in the student, the target, the stage key that set its ratio, its
size in units (GroupNorm groups, heads or channels) and channels per unit, the asked keep ratio,
the kept unit count after rounding and the kept unit indices. Applying the kept indices to a
freshly built, unpruned student (:func:`hybridsd_nas.prune.replay`) gives exactly the pruned
structure; it is Torch-Pruning's ``pruning_history()`` idea in a form that needs no pickle.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from hybridsd_nas.core.errors import ConfigError

RECORD_FORMAT = "hybridsd-prune-record"
RECORD_VERSION = 1

ROUNDING = (
    "resnet: whole GroupNorm groups of norm2 (kept groups = max(1, round-half-up(ratio * groups)), "
    "channels per group unchanged, num_groups = kept groups); heads: whole heads "
    "(max(1, round-half-up(ratio * heads))); ff: channels (max(1, round-half-up(ratio * width))). "
    "Ratios apply per module, so every module of a stage keeps the same share."
)


@dataclass(frozen=True)
class GroupRecord:
    target: str  # resnet | heads | ff
    stage: str  # stageN | mid
    block: str  # base block name ("down1", "up2", "mid")
    path: str  # module path in the student ("down_blocks.1.resnets.0")
    modules: tuple[str, ...]  # the sub-modules whose widths change ("conv1", "norm2", ...)
    units: int  # size before pruning, in units
    unit_channels: int  # channels per unit
    asked: float  # keep ratio asked by the candidate
    kept: int  # units kept after rounding
    keep: tuple[int, ...]  # kept unit indices, ascending

    @property
    def done(self) -> float:
        return self.kept / self.units

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"], d["keep"] = list(self.modules), list(self.keep)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupRecord:
        try:
            g = cls(**{**d, "modules": tuple(d["modules"]), "keep": tuple(int(i) for i in d["keep"])})
        except (TypeError, KeyError) as e:
            raise ConfigError(f"prune record: malformed group {str(d)[:80]} ({e})") from None
        if len(g.keep) != g.kept or sorted(set(g.keep)) != list(g.keep) or (g.keep and not 0 <= g.keep[0] <= g.keep[-1] < g.units):
            raise ConfigError(f"prune record: group {g.path} ({g.target}) keeps {g.kept} of {g.units} units but lists indices {list(g.keep)[:8]}")
        return g


@dataclass(frozen=True)
class PruneRecord:
    candidate: dict[str, Any]
    candidate_key: str
    importance: str | None  # None when only shapes were cut (meta device)
    seed: int
    calib_batches: int
    groups: tuple[GroupRecord, ...]
    rounding: str = ROUNDING
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    # -- queries --------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Asked vs done per stage and target: ratios, units and channels before and after."""
        acc: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for g in self.groups:
            s = acc[g.stage].setdefault(g.target, {"asked": g.asked, "modules": 0, "units_before": 0, "units_after": 0,
                                                    "channels_before": 0, "channels_after": 0})
            s["modules"] += 1
            s["units_before"] += g.units
            s["units_after"] += g.kept
            s["channels_before"] += g.units * g.unit_channels
            s["channels_after"] += g.kept * g.unit_channels
        for stage in acc.values():
            for s in stage.values():
                s["done"] = round(s["channels_after"] / s["channels_before"], 6)
        return {k: dict(v) for k, v in sorted(acc.items())}

    def table(self) -> str:
        """A plain-text table of :meth:`summary`."""
        rows = [f"{'stage':<8}{'target':<8}{'asked':>7}{'done':>8}{'units':>14}{'channels':>16}"]
        for stage, targets in self.summary().items():
            for t, s in targets.items():
                rows.append(f"{stage:<8}{t:<8}{s['asked']:>7.3f}{s['done']:>8.3f}"
                            f"{s['units_before']:>7}->{s['units_after']:<6}{s['channels_before']:>8}->{s['channels_after']:<7}")
        return "\n".join(rows)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "candidate": self.candidate,
            "candidate_key": self.candidate_key,
            "importance": self.importance,
            "seed": self.seed,
            "calib_batches": self.calib_batches,
            "rounding": self.rounding,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "summary": self.summary(),
            "groups": [g.to_dict() for g in self.groups],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneRecord:
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise ConfigError(f"not a pruning record: expected format {RECORD_FORMAT!r}, got {d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        if d.get("version") != RECORD_VERSION:
            raise ConfigError(f"pruning record version {d.get('version')!r} is not supported; supported: {RECORD_VERSION}")
        return cls(
            candidate=d["candidate"],
            candidate_key=d["candidate_key"],
            importance=d.get("importance"),
            seed=int(d.get("seed", 0)),
            calib_batches=int(d.get("calib_batches", 0)),
            groups=tuple(GroupRecord.from_dict(g) for g in d["groups"]),
            rounding=d.get("rounding", ROUNDING),
            seconds=float(d.get("seconds", 0.0)),
            notes=tuple(d.get("notes", ())),
        )
