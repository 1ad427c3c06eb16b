"""Loading a whole Stable Diffusion pipeline (teacher) from a zoo name, a directory or a hub id."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .arch.config import _HUB_ID, _known_names, _zoo_path
from .errors import ConfigError, UnknownNameError


def pipeline_path(spec: str | Path) -> str:
    """Where a pipeline spec points: a local directory, or the hub id itself."""
    s = str(spec)
    z = _zoo_path(s)
    if z is not None:
        if not (z / "model_index.json").is_file():
            raise ConfigError(f"the embedded model {s!r} is not installed at {z}")
        return str(z)
    if Path(s).is_dir():
        if not (Path(s) / "model_index.json").is_file():
            raise ConfigError(f"{s} is not a pipeline directory (no model_index.json); a teacher needs its VAE and text encoder too")
        return s
    if _HUB_ID.match(s):
        return s
    raise UnknownNameError("teacher pipeline (zoo name, directory or hub id)", s, [n for n in _known_names() if _zoo_path(n)])


@lru_cache(maxsize=4)
def _load(path: str, device: str, dtype_name: str):
    from diffusers import StableDiffusionPipeline

    from .arch.model import _quiet

    dtype = getattr(torch, dtype_name)
    try:
        with _quiet():
            pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False, use_safetensors=True)
    except Exception as e:  # network, missing component, incompatible files
        raise ConfigError(f"cannot load the pipeline {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline(spec: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` (cached per process; do not modify the returned object's modules)."""
    return _load(pipeline_path(spec), str(device), str(dtype).replace("torch.", ""))
