"""The contract every search space keeps."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from hybridsd_nas.arch import Candidate, UNetArch
from hybridsd_nas.core.errors import ConfigError, InvalidCandidateError


@dataclass(frozen=True)
class Categorical:
    choices: tuple[Any, ...]

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    step: float | None = None

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "step": self.step}


Dimension = Categorical | Float


@dataclass(frozen=True)
class SpacePoint:
    """One point of a space: the choices, the candidate, and anything else the space carries."""

    params: Mapping[str, Any]
    candidate: Candidate
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json_obj(self, space: "SearchSpace") -> dict[str, Any]:
        return {"space": space.name, "space_version": space.version, "key": self.candidate.key,
                "params": dict(self.params), "candidate": self.candidate.to_dict(), **dict(self.extra)}


class SearchSpace:
    """A named, versioned space over candidates of a base U-Net.

    Subclasses implement :meth:`dimensions` (the choices, given the base) and :meth:`point`
    (choices -> candidate). Enumeration, counting, sampling and Optuna suggestion follow.
    """

    kind = "abstract"
    option_keys: tuple[str, ...] = ()

    def __init__(self, name: str, version: int, description: str, options: Mapping[str, Any], source: str = "<dict>"):
        self.name, self.version, self.description = name, version, description
        self.options = dict(options)
        self.source = source
        self.validate_options()

    # -- to implement ----------------------------------------------------------------------
    def dimensions(self, arch: UNetArch) -> dict[str, Dimension]:
        raise NotImplementedError

    def point(self, arch: UNetArch, params: Mapping[str, Any]) -> SpacePoint:
        raise NotImplementedError

    def validate_options(self) -> None:
        unknown = sorted(set(self.options) - set(self.option_keys))
        if unknown:
            raise ConfigError(
                f"{self.source}: options.{unknown[0]} is not an option of a {self.kind} space; allowed: {', '.join(self.option_keys)}"
            )

    def presets(self, arch: UNetArch) -> dict[str, Candidate]:
        """Named points of this space (known designs to enqueue first)."""
        return {}

    def unit_groups(self, arch: UNetArch) -> list[list[str]] | None:
        """Dimensions that decide the units of one part of the U-Net alone (one group per stage), or
        None when a unit's shapes may depend on any choice. See :meth:`unit_cover`."""
        return None

    # -- derived -----------------------------------------------------------------------------
    def is_discrete(self, arch: UNetArch) -> bool:
        return all(isinstance(d, Categorical) for d in self.dimensions(arch).values())

    def raw_size(self, arch: UNetArch) -> int | None:
        dims = self.dimensions(arch)
        if not all(isinstance(d, Categorical) for d in dims.values()):
            return None
        return math.prod(len(d.choices) for d in dims.values())

    def enumerate(self, arch: UNetArch, limit: int | None = None) -> Iterator[SpacePoint]:
        """Every valid point, each distinct candidate once (discrete spaces only)."""
        dims = self.dimensions(arch)
        if not self.is_discrete(arch):
            raise ConfigError(f"space {self.name!r} is continuous: sample it instead of enumerating")
        names = list(dims)
        seen: set[str] = set()
        n = 0
        for combo in itertools.product(*(dims[k].choices for k in names)):
            try:
                pt = self.point(arch, dict(zip(names, combo)))
            except InvalidCandidateError:
                continue
            key = self._point_key(pt)
            if key in seen:
                continue
            seen.add(key)
            yield pt
            n += 1
            if limit is not None and n >= limit:
                return

    def _point_key(self, pt: SpacePoint) -> str:
        return pt.candidate.key + repr(sorted(dict(pt.extra).items()))

    def unit_cover(self, arch: UNetArch, exhaustive: bool = False) -> list[Candidate]:
        """Candidates whose units together include every unit shape (a unit's structure and input
        shapes) that a point of this space can need: what a latency table must time for the space.

        With ``exhaustive``, or for kinds without :meth:`unit_groups`, every distinct candidate.
        Otherwise the groups' choices advance together (the i-th choice of every group in one
        point) for each combination of the dimensions outside the groups: as many points as the
        largest group has choices, not the product over groups."""
        dims = self.dimensions(arch)
        cont = [k for k, d in dims.items() if not isinstance(d, Categorical)]
        if cont:
            raise ConfigError(f"space {self.name!r} has continuous dimensions ({', '.join(cont[:3])}): no table can hold every "
                              "unit shape of its candidates; give it discrete choices, or use latency mode measure")
        groups = None if exhaustive else self.unit_groups(arch)
        if groups is None:
            return list({pt.candidate.key: pt.candidate for pt in self.enumerate(arch)}.values())
        groups = [[k for k in g if k in dims] for g in groups]
        groups = [g for g in groups if g]
        grouped = {k for g in groups for k in g}
        rest = [k for k in dims if k not in grouped]
        choices = [list(itertools.product(*(dims[k].choices for k in g))) for g in groups]
        width = max((len(c) for c in choices), default=1)
        out: dict[str, Candidate] = {}

        def point(fixed: dict[str, Any], picks: list[int]) -> Candidate | None:
            params = dict(fixed)
            for g, ch, j in zip(groups, choices, picks):
                params.update(zip(g, ch[j % len(ch)]))
            try:
                return self.point(arch, params).candidate
            except InvalidCandidateError:
                return None

        for combo in itertools.product(*(dims[k].choices for k in rest)):
            fixed = dict(zip(rest, combo))
            for j in range(width):
                c = point(fixed, [j] * len(groups))
                if c is not None:
                    out.setdefault(c.key, c)
                    continue
                for gi, ch in enumerate(choices):  # an invalid mix: each group's j-th choice beside others that go with it
                    if j >= len(ch):
                        continue
                    for k in range(width):
                        c = point(fixed, [j if i == gi else k for i in range(len(groups))])
                        if c is not None:
                            out.setdefault(c.key, c)
                            break
        return list(out.values())

    def count(self, arch: UNetArch) -> int:
        return sum(1 for _ in self.enumerate(arch))

    def sample(self, arch: UNetArch, n: int, seed: int = 0, max_tries: int = 10000) -> list[SpacePoint]:
        """``n`` random valid points (uniform over choices / ranges)."""
        rng = random.Random(seed)
        dims = self.dimensions(arch)
        out: list[SpacePoint] = []
        for _ in range(max_tries):
            if len(out) >= n:
                break
            params = {}
            for k, d in dims.items():
                if isinstance(d, Categorical):
                    params[k] = rng.choice(d.choices)
                else:
                    v = rng.uniform(d.low, d.high)
                    params[k] = round(d.low + round((v - d.low) / d.step) * d.step, 6) if d.step else v
            try:
                out.append(self.point(arch, params))
            except InvalidCandidateError:
                continue
        return out

    def suggest(self, trial, arch: UNetArch) -> SpacePoint:
        """Let an Optuna trial choose a point; an invalid combination raises InvalidCandidateError."""
        params = {k: d.suggest(trial, k) for k, d in self.dimensions(arch).items()}
        return self.point(arch, params)

    def describe(self, arch: UNetArch) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "description": self.description,
                "source": self.source, "options": self.options,
                "dimensions": {k: d.to_dict() for k, d in self.dimensions(arch).items()},
                "discrete": self.is_discrete(arch), "raw_size": self.raw_size(arch),
                "presets": sorted(self.presets(arch))}
