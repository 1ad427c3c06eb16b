"""The teacher: a whole Stable Diffusion pipeline, named by an embedded-model name, a directory or a
hub id, resolved once into a :class:`Teacher` that every later stage receives.

A ``Teacher`` carries where the pipeline lives, its content fingerprint (what every cache computed
from it is keyed by) and its evaluation assets (fixed evaluation prompts, default sampling settings,
an adherence classifier), so that no stage has to resolve the spec again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hybridsd_nas.core.errors import ConfigError, HybridSDError, UnknownNameError
from hybridsd_nas.core.runtime import quiet
from hybridsd_nas.sources.unet import HUB_ID, hub_snapshot, known_names, zoo_path

with quiet():  # importing the pipeline class makes transformers warn about optional image backends
    from diffusers import StableDiffusionPipeline

DEFAULT_SAMPLER_STEPS = 20
DEFAULT_GUIDANCE = 5.0


def pipeline_path(spec: str | Path) -> str:
    """The local directory a pipeline spec points at: an embedded model, a directory, or a hub id's
    snapshot in the Hugging Face cache (downloaded there first when it is not cached and there is a network)."""
    s = str(spec)
    z = zoo_path(s)
    if z is not None:
        if not (z / "model_index.json").is_file():
            raise ConfigError(f"the embedded model {s!r} is not installed at {z}")
        return str(z)
    if Path(s).is_dir():
        if not (Path(s) / "model_index.json").is_file():
            raise ConfigError(f"{s} is not a pipeline directory (no model_index.json); a teacher needs its VAE and text encoder too")
        return s
    if HUB_ID.match(s):
        snap = hub_snapshot(s)
        if not (snap / "model_index.json").is_file():
            raise ConfigError(f"hub id {s!r} is not a diffusers pipeline (no model_index.json in {snap})")
        return str(snap)
    raise UnknownNameError("teacher pipeline (zoo name, directory or hub id)", s, [n for n in known_names() if zoo_path(n)])


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
def _load(path: str, device: str, dtype_name: str) -> StableDiffusionPipeline:
    dtype = getattr(torch, dtype_name)
    try:
        with quiet():
            pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False, use_safetensors=True)
    except Exception as e:  # network, missing component, incompatible files
        raise ConfigError(f"cannot load the pipeline {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline(spec: "str | Path | Teacher", device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` (cached per process; do not modify the returned object's modules)."""
    path = spec.path if isinstance(spec, Teacher) else pipeline_path(spec)
    return _load(path, str(device), str(dtype).replace("torch.", ""))


def vae_scale_factor(source: Any, default: int = 8) -> int:
    """The VAE's spatial scale factor (8 for SD) of a loaded pipeline, a :class:`Teacher`, a pipeline
    directory or an embedded-model name; ``default`` where there is no VAE to read (a bare U-Net config)."""
    if hasattr(source, "vae_scale_factor"):
        return int(source.vae_scale_factor)
    if isinstance(source, Teacher):
        source = source.path
    if not isinstance(source, (str, Path)):
        return default
    path = zoo_path(str(source)) or Path(str(source))
    vae_cfg = path / "vae" / "config.json"
    if vae_cfg.is_file():
        boc = json.loads(vae_cfg.read_text()).get("block_out_channels", [0, 0, 0, 0])
        return 2 ** (len(boc) - 1)
    return default


@dataclass(frozen=True)
class Teacher:
    """A teacher pipeline resolved once: what the user named, where it lives, its fingerprint and its
    evaluation assets. Build it with :func:`resolve_teacher`."""

    spec: str
    path: str
    fingerprint: str
    sampling: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def local_dir(self) -> Path | None:
        """The pipeline directory (a hub id's is its snapshot in the Hugging Face cache)."""
        p = Path(self.path)
        return p if p.is_dir() else None

    def asset(self, name: str) -> Path | None:
        """A file or folder shipped beside the pipeline's components (``eval_prompts.json``,
        ``sampling.json``, ``eval_classifier``), or None where the teacher has none."""
        d = self.local_dir
        return d / name if d is not None and (d / name).exists() else None

    @property
    def classifier_dir(self) -> Path | None:
        return self.asset("eval_classifier")

    @property
    def has_eval_prompts(self) -> bool:
        return self.asset("eval_prompts.json") is not None

    def eval_prompts(self, n: int | None = None) -> list[dict[str, Any]]:
        """``n`` evaluation prompts (the teacher's ``eval_prompts.json``, cycled; all of them once when ``n``
        is None), each with its sample index."""
        p = self.asset("eval_prompts.json")
        if p is None:
            raise HybridSDError(f"{self.path} has no eval_prompts.json; the proxy needs fixed evaluation prompts")
        rows = json.loads(p.read_text())
        return [dict(rows[i % len(rows)], sample=i) for i in range(len(rows) if n is None else n)]

    def sampling_settings(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """Sampler steps and guidance scale: the ones given, else the teacher's ``sampling.json``, else 20 and 5.0."""
        return (steps or int(self.sampling.get("num_inference_steps", DEFAULT_SAMPLER_STEPS)),
                guidance if guidance is not None else float(self.sampling.get("guidance_scale", DEFAULT_GUIDANCE)))

    def pipeline(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
        return load_pipeline(self, device=device, dtype=dtype)

    def __str__(self) -> str:
        return self.spec


def resolve_teacher(spec: "str | Path | Teacher") -> Teacher:
    """Resolve a teacher spec (embedded name, pipeline directory or hub id) once; a Teacher passes through."""
    if isinstance(spec, Teacher):
        return spec
    path = pipeline_path(spec)
    card = Path(path) / "sampling.json"
    sampling = json.loads(card.read_text()) if card.is_file() else {}
    return Teacher(spec=str(spec), path=path, fingerprint=pipeline_fingerprint(path), sampling=sampling)
