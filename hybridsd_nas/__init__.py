"""hybridsd_nas: architecture search and structural pruning of Stable Diffusion U-Nets.

The layers, bottom to top, are written in ``docs/architecture.md``; this root only re-exports the
error tree, the version and :func:`load_unet` (what an export's metadata tells a user to call)."""

from hybridsd_nas.core import (
    ConfigError,
    HybridSDError,
    InvalidCandidateError,
    NotExpressibleError,
    UnknownNameError,
    UnreliableMeasurementError,
    __version__,
)
from hybridsd_nas.export import load_unet

__all__ = [
    "ConfigError",
    "HybridSDError",
    "InvalidCandidateError",
    "NotExpressibleError",
    "UnknownNameError",
    "UnreliableMeasurementError",
    "__version__",
    "load_unet",
]
