"""How a run ended, as every layer reports it (string values: they are written to JSON as they are)."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"  # a pre-filter rejected it before any training
    FAILED = "failed"  # NaN, divergence, an error in the run
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value
