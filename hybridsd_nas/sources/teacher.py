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
from hybridsd_nas.sources.unet import HUB_ID, hub_snapshot, known_names, validate_config, zoo_path

with quiet():  # importing the pipeline classes makes transformers warn about optional image backends
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

DEFAULT_SAMPLER_STEPS = 20
DEFAULT_GUIDANCE = 5.0

# The pipeline classes the workbench handles (model_index.json's _class_name), with what loading
# each needs beyond the weights: no safety checker, no watermark (neither is part of the model).
PIPELINES: dict[str, tuple[type, dict[str, Any]]] = {
    "StableDiffusionPipeline": (StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, {"add_watermarker": False}),
}
# the components each class needs in model_index.json
COMPONENTS = {"StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
              "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                            "scheduler")}
PREDICTION_TYPES = ("epsilon", "v_prediction")
ADDITION_EMBED_TYPES = (None, "text_time")


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


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_pipeline(path: str | Path) -> str:
    """The pipeline class of a pipeline directory (``model_index.json``'s ``_class_name``), after the
    checks that make a teacher usable, each a one-line :class:`ConfigError` naming the class or key and
    what is supported: a class in :data:`PIPELINES` with its components, a U-Net the architecture
    model reads (:func:`~hybridsd_nas.sources.unet.validate_config`) with no added conditions other
    than SDXL's ``text_time``, and a scheduler predicting ``epsilon`` or ``v_prediction``. A
    ``model_index.json`` without ``_class_name`` is taken for a ``StableDiffusionPipeline``."""
    root = Path(path)
    index = _json(root / "model_index.json")
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if cls not in PIPELINES:
        raise ConfigError(f"{root}: pipeline class {cls!r} is not supported; supported: {', '.join(PIPELINES)} "
                          "(SD-1.x, SD-2.x and SDXL text-to-image)")
    if "_class_name" in index:
        missing = [c for c in COMPONENTS[cls] if not (isinstance(index.get(c), list) and index[c][0] is not None)]
        if missing:
            raise ConfigError(f"{root}: a {cls} needs {', '.join(missing)} in model_index.json; it has none")
    unet_cfg = root / "unet" / "config.json"
    if unet_cfg.is_file():
        cfg = validate_config(_json(unet_cfg), str(unet_cfg))
        aet = cfg.get("addition_embed_type")
        if aet not in ADDITION_EMBED_TYPES:
            raise ConfigError(f"{unet_cfg}: addition_embed_type {aet!r} is not supported; supported: null, 'text_time' (SDXL)")
        if (aet == "text_time") != (cls == "StableDiffusionXLPipeline") and "_class_name" in index:
            raise ConfigError(f"{unet_cfg}: addition_embed_type {aet!r} does not fit a {cls}; "
                              "'text_time' goes with StableDiffusionXLPipeline, null with StableDiffusionPipeline")
        for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
            if cfg.get(key) is not None:
                raise ConfigError(f"{unet_cfg}: {key} {cfg[key]!r} is not supported; supported: null")
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        pt = _json(sched).get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES:
            raise ConfigError(f"{sched}: prediction_type {pt!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
    return cls


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
def _load(path: str, device: str, dtype_name: str) -> DiffusionPipeline:
    dtype = getattr(torch, dtype_name)
    cls, extra = PIPELINES[check_pipeline(path)] if Path(path).is_dir() else PIPELINES["StableDiffusionPipeline"]
    try:
        with quiet():
            pipe = cls.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, **extra)
    except Exception as e:  # network, missing component, incompatible files
        raise ConfigError(f"cannot load the pipeline {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline(spec: "str | Path | Teacher", device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The teacher's pipeline, of its own class (one of :data:`PIPELINES`: ``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``), cached per process; do not modify the returned object's modules."""
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

    def pipeline(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
        return load_pipeline(self, device=device, dtype=dtype)

    def __str__(self) -> str:
        return self.spec


def resolve_teacher(spec: "str | Path | Teacher") -> Teacher:
    """Resolve a teacher spec (embedded name, pipeline directory or hub id) once; a Teacher passes through.
    A pipeline the workbench does not handle fails here, before any model loads (:func:`check_pipeline`)."""
    if isinstance(spec, Teacher):
        return spec
    path = pipeline_path(spec)
    check_pipeline(path)
    card = Path(path) / "sampling.json"
    sampling = json.loads(card.read_text()) if card.is_file() else {}
    return Teacher(spec=str(spec), path=path, fingerprint=pipeline_fingerprint(path), sampling=sampling)
