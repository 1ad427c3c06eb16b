"""The bottom layer: the error tree, registries, paths and small runtime helpers. Imports nothing
else of the package."""

from hybridsd_nas.core.errors import (
    BudgetError,
    ConfigError,
    HybridSDError,
    InvalidCandidateError,
    NotExpressibleError,
    UnknownNameError,
    UnreliableMeasurementError,
)
from hybridsd_nas.core.paths import cache_dir, results_root
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.core.runtime import __version__, quiet

__all__ = [
    "BudgetError",
    "ConfigError",
    "HybridSDError",
    "InvalidCandidateError",
    "NotExpressibleError",
    "Registry",
    "UnknownNameError",
    "UnreliableMeasurementError",
    "__version__",
    "cache_dir",
    "quiet",
    "results_root",
]
