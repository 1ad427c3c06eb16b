"""hybridsd_nas: architecture search and structural pruning of Stable Diffusion U-Nets."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ConfigError,
    HybridSDError,
    InvalidCandidateError,
    NotExpressibleError,
    UnknownNameError,
)



def load_unet(path, device="cpu", dtype=None):
    """Load a U-Net exported by ``hybridsd-nas prune`` / ``export`` (see :mod:`hybridsd_nas.export`)."""
    from .export import load_unet as _load

    return _load(path, device=device, dtype=dtype)


__all__ = [
    "load_unet",
    "__version__",
    "ConfigError",
    "HybridSDError",
    "InvalidCandidateError",
    "NotExpressibleError",
    "UnknownNameError",
]
