"""Loading a whole Stable Diffusion pipeline (teacher) from a zoo name, a directory or a hub id."""

from __future__ import annotations

import hashlib
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


_WHOLE_FILE_LIMIT = 64 << 20  # larger files are fingerprinted by size, time and their first and last MiB


@lru_cache(maxsize=16)
def _fingerprint(path: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha1()
    for rel, size, mtime in stats:
        h.update(f"{rel}|{size}\n".encode())
        with open(Path(path) / rel, "rb") as f:
            if size <= _WHOLE_FILE_LIMIT:
                h.update(f.read())
            else:
                h.update(str(mtime).encode())
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


def pipeline_fingerprint(spec: str | Path) -> str:
    """What a cache of anything computed from a pipeline is keyed by: its path (or hub id) and, for a
    local directory, a hash of its files' contents (documentation aside), so that retrained weights never
    meet stale caches."""
    path = pipeline_path(spec)
    p = Path(path)
    if not p.is_dir():
        return path
    stats = tuple((str(f.relative_to(p)), st.st_size, st.st_mtime_ns)
                  for f in sorted(p.rglob("*")) if f.is_file() and f.suffix != ".md" and (st := f.stat()))
    return f"{path}@{_fingerprint(path, stats)}"


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
