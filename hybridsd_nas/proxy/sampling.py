"""Scores that sample: the student's images on the teacher's fixed evaluation prompts and seeds,
against the teacher's own samples (cached by content) and real held-out images."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8
from hybridsd_nas.metrics import FeatureExtractor, fid_kid, load_classifier, prompt_adherence, reference_features
from hybridsd_nas.proxy.scores import paired_mse
from hybridsd_nas.proxy.settings import ProxySettings
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


def paired_sample_score(teacher: Teacher | str, pipe, student, samples: int, seed: int, steps: int,
                        guidance: float) -> dict[str, float]:
    """The student's samples on the first ``samples`` fixed evaluation prompts and seeds against the
    teacher's (cached) on the same ones: mean squared pixel difference, no feature network. A cheap
    score of how far sampling with the student drifts from the teacher's samples, which is what the
    FID against the teacher's samples measures as a distribution."""
    t = resolve_teacher(teacher)
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in t.eval_prompts(samples)]
    t_imgs = teacher_samples(t, pipe, prompts, seed, steps, guidance)
    s_imgs = generate(pipe, student, prompts, seed, steps, guidance)
    return {"paired_mse": paired_mse(s_imgs, t_imgs), "samples": samples, "seconds": round(time.perf_counter() - t0, 3)}


def references(teacher: Teacher | str, pipe, s: ProxySettings, steps: int, guidance: float, fx) -> tuple[np.ndarray, Any, Any]:
    """What every evaluation with settings ``s`` compares against, cached by content: the teacher's
    samples on the ``s.samples`` fixed prompts and seeds, their features, and the features of the
    first ``s.reference_images`` held-out real images."""
    t = resolve_teacher(teacher)
    prompts = [r["prompt"] for r in t.eval_prompts(s.samples)]
    t_imgs = teacher_samples(t, pipe, prompts, s.seed, steps, guidance)
    res_px = t_imgs.shape[-1]
    real = reference_features(to_rgb_uint8(load_fashion_mnist("test").images[: s.reference_images], res_px),
                              name=f"fashion-mnist-test-first{s.reference_images}", resolution=res_px, extractor=fx)
    t_ref = reference_features(t_imgs, name=f"teacher-samples-{hashlib.sha1(t_imgs.tobytes()).hexdigest()[:12]}",
                               resolution=res_px, extractor=fx)
    return t_imgs, t_ref, real


def evaluate_student(teacher: Teacher | str, pipe, student, s: ProxySettings, steps: int, guidance: float,
                     device: str = "cpu", return_images: bool = False,
                     sample: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, Any]:
    """The proxy's evaluation of a (distilled) student: samples on ``s.samples`` fixed prompts and
    seeds, FID/KID against the teacher's samples and against real held-out images, adherence.
    ``sample(prompts)`` replaces the student's own sampling (e.g. a hybrid run); it returns uint8
    images (N, 3, H, W), image i seeded ``s.seed + i``."""
    t = resolve_teacher(teacher)
    if t.classifier_dir is None:
        raise HybridSDError(f"{t.path} has no eval_classifier; the proxy's adherence needs one beside the pipeline")
    t0 = time.perf_counter()
    rows = t.eval_prompts(s.samples)
    prompts = [r["prompt"] for r in rows]
    fx = FeatureExtractor(device=device)
    t_imgs, t_ref, real = references(t, pipe, s, steps, guidance, fx)
    s_imgs = sample(prompts) if sample is not None else generate(pipe, student, prompts, s.seed, steps, guidance)
    k = min(s.kid_subset, len(s_imgs))
    vs_teacher = fid_kid(s_imgs, t_ref, extractor=fx, kid_subset_size=k, seed=s.seed)
    vs_real = fid_kid(s_imgs, real, extractor=fx, kid_subset_size=k, seed=s.seed)
    clf = load_classifier(t.classifier_dir)
    labels = np.array([r["class_index"] for r in rows])
    out = {
        "proxy_fid": vs_teacher["fid"],
        "kid": vs_teacher["kid_mean"],
        "kid_std": vs_teacher["kid_std"],
        "fid_real": vs_real["fid"],
        "kid_real": vs_real["kid_mean"],
        "adherence": prompt_adherence(clf, s_imgs, labels),
        "adherence_teacher": prompt_adherence(clf, t_imgs, labels),
        "paired_mse": paired_mse(s_imgs, t_imgs),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "samples": len(s_imgs),
    }
    if return_images:
        out["images"] = s_imgs
    return out
