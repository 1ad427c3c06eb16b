"""One exception tree for user-facing mistakes.

Every error a user can cause (an unknown preset, a malformed config, an impossible candidate, a
missing file) raises a subclass of :class:`HybridSDError` whose message is one line naming the
problem and what would be valid. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class HybridSDError(Exception):
    """Base class of every user-facing error of hybridsd_nas."""


class UnknownNameError(HybridSDError, KeyError):
    """A name (preset, space, device, criterion, ...) that no registry knows."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigError(HybridSDError, ValueError):
    """A U-Net config, YAML or JSON file that cannot be read or is malformed."""


class InvalidCandidateError(HybridSDError, ValueError):
    """A candidate that cannot be built on its base U-Net (named block and reason)."""


class NotExpressibleError(HybridSDError, ValueError):
    """A candidate that a stock diffusers config cannot express (it needs module surgery)."""


class UnreliableMeasurementError(HybridSDError):
    """A measurement that contradicts itself (a latency table whose units and whole forward disagree
    even when measured again): the run failed (exit status 1), nothing was written."""


class BudgetError(HybridSDError, ValueError):
    """A budget expression (``METRIC<=V``) that is malformed, names an unknown metric or an impossible bound."""
