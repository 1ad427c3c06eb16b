"""Where the workbench keeps what it writes: the cache, and the root of a study's results."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HYBRIDSD_NAS_CACHE"
RESULTS_ENV = "HYBRIDSD_NAS_RESULTS"


def cache_dir(*parts: str) -> Path:
    """The cache root (``$HYBRIDSD_NAS_CACHE``, default ``~/.cache/hybridsd_nas``), or a folder in it."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hybridsd_nas")).joinpath(*parts)


def results_root() -> Path:
    """Where studies write their results unless their YAML says otherwise: ``$HYBRIDSD_NAS_RESULTS``,
    default ``runs/`` in the current directory (kept apart from the reference runs under ``results/``
    that the documentation cites)."""
    return Path(os.environ.get(RESULTS_ENV, "runs"))
