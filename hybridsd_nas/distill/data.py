"""Training data for distillation, through the data layer (:mod:`hybridsd_nas.data.sources` names and
checks a source, :mod:`hybridsd_nas.data.latents` encodes it once into a memory-mapped cache):
Fashion-MNIST with class prompts, a folder of image-caption pairs, or the teacher's own samples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.data import DataSpec, LatentData, encode_source, parse_data_spec

DistillData = LatentData  # the name the trainer and the proxy know


def fashion_mnist_data(pipe, n: int = 2048, seed: int = 0, resolution: int | None = None,
                       split: str = "train") -> DistillData:
    """``n`` Fashion-MNIST images of ``split`` (``train``; ``test`` for held-out scores) with prompts
    from the class names (random templates)."""
    if split not in ("train", "test"):
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
    return encode_source(DataSpec("fashion-mnist").with_options(split=split, limit=n, seed=seed), pipe, resolution)


def folder_data(pipe, folder: str | Path, resolution: int | None = None, resize: bool = False) -> DistillData:
    """Image-caption pairs from a folder (``imagefolder`` metadata, ``captions.jsonl``/``captions.json``,
    or a ``.txt`` beside each image)."""
    return encode_source(parse_data_spec(f"folder:{folder}", resize=resize), pipe, resolution)


def teacher_sample_data(pipe, prompts: list[str] | str | Path, n: int = 256, steps: int = 20, guidance: float = 5.0,
                        seed: int = 0) -> DistillData:
    """The teacher's own samples as data: ``n`` samples cycling through ``prompts`` (a list, or a
    prompt file), sample ``i`` drawn with seed ``seed + i``."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
    else:
        if not prompts:
            raise ConfigError("teacher-sample data needs at least one prompt")
        text = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        path = cache_dir("prompts", hashlib.sha1(text.encode()).hexdigest()[:16] + ".jsonl")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    spec = parse_data_spec(f"prompts:{path}").with_options(count=n, steps=steps, guidance=guidance, seed=seed)
    return encode_source(spec, pipe)
