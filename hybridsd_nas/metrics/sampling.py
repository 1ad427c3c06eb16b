"""Sampling for evaluation: a pipeline's images on fixed prompts and seeds in plain float32, the
teacher's samples cached by content, and image grids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.sources import Teacher, resolve_teacher


@contextlib.contextmanager
def plain_float32():
    """Convolutions and matmuls in plain float32 inside the block, whatever the caller set: on CUDA,
    cuDNN's convolutions otherwise default to TF32 (10-bit mantissa), and samples made so differ
    visibly from float32 ones (on an H200, 11% of the pixels of the tiny teacher's samples, by up to
    55 of 255 levels; in plain float32, 0.03% by one level), so they could not share the cached
    teacher samples and reference features that every evaluation compares against."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@torch.no_grad()
def generate(pipe, unet, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 32) -> np.ndarray:
    """uint8 images (N, 3, H, W); image i uses generator seed ``seed + i`` whatever the batching;
    sampled in plain float32 on every device (``plain_float32``)."""
    old = pipe.unet
    pipe.unet = unet
    try:
        out = []
        for i in range(0, len(prompts), batch):
            ps = prompts[i : i + batch]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(ps))]
            with plain_float32():
                imgs = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
            out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8).transpose(0, 3, 1, 2))
        return np.concatenate(out)
    finally:
        pipe.unet = old


def teacher_samples(teacher: Teacher | str, pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> np.ndarray:
    """The teacher's samples for these prompts and seeds, cached on disk (safetensors)."""
    t = resolve_teacher(teacher)
    key = hashlib.sha1(json.dumps([t.fingerprint, prompts, seed, steps, guidance,
                                   type(pipe.scheduler).__name__], sort_keys=True).encode()).hexdigest()[:16]
    f = cache_dir("proxy") / f"teacher-{key}.safetensors"
    if f.is_file():
        return load_file(str(f))["images"]
    imgs = generate(pipe, pipe.unet, prompts, seed, steps, guidance)
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": imgs}, str(f))
    return imgs


def save_grid(images, path: Path, cols: int = 8) -> Path:
    """A PNG grid of uint8 images (N, H, W, 3) or (N, 3, H, W)."""
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    n, h, w = a.shape[:3]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, a.shape[3]), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = a[i]
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
    return path
