"""Name -> factory registries: the one place each extension point is spelled out.

Every extension point of the workbench (samplers, importance criteria, latency modes, search-space
kinds, candidate presets, study metrics, ...) is a :class:`Registry`. Validation, the CLI's choices
and ``list`` output all read the registry, so an entry registered by a user's code is accepted
everywhere at once::

    from hybridsd_nas.prune import IMPORTANCE

    @IMPORTANCE.register("my-criterion", help="L1 of the weights, squared")
    def my_criterion(model, groups, ctx):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hybridsd_nas.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")
_DECORATE = object()  # register(name) without a value: return a decorator


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    help: str = ""


class Registry(Generic[T]):
    """An ordered mapping of names to factories (or values) of one kind.

    ``kind`` names the extension point in error messages: ``unknown sampler 'x'; known: ...``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, value: Any = _DECORATE, *, help: str = "", replace: bool = False):
        """Register ``value`` under ``name``; without ``value``, a decorator that registers its target."""

        def add(v: T) -> T:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
            if name in self._entries and not replace:
                raise ConfigError(f"{self.kind} {name!r} is registered already; pass replace=True to override it")
            self._entries[name] = Entry(name, v, help or (getattr(v, "__doc__", None) or "").strip().split("\n")[0])
            return v

        return add if value is _DECORATE else add(value)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name].value
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, str(name), self.names()) from None

    def help(self, name: str) -> str:
        self.get(name)
        return self._entries[name].help

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[Entry[T], ...]:
        return tuple(self._entries.values())

    def items(self) -> Iterator[tuple[str, T]]:
        return ((e.name, e.value) for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

