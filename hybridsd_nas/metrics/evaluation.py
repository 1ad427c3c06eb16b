"""Scoring sampled images against a teacher's samples on the same prompts and seeds, for any teacher.

Always: FID and KID against the teacher's samples (offline Inception features). Where the evaluation
set allows: prompt adherence (a classifier and labelled prompts), CLIP score and CMMD (a local CLIP
model directory), FID and KID against real reference images. What was not measured is listed in
``skipped`` with the reason, so a report never confuses "not measured" with "zero".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8
from hybridsd_nas.data.evalset import EvalSet
from hybridsd_nas.metrics.adherence import load_classifier, prompt_adherence
from hybridsd_nas.metrics.clip import ClipModel, cmmd
from hybridsd_nas.metrics.fid import FeatureExtractor, fid_kid, load_image_folder, reference_features

FASHION_MNIST_TEST = "fashion-mnist:test"


def real_reference_features(spec: str, count: int, resolution: int, extractor: FeatureExtractor):
    """Inception features of real reference images: ``fashion-mnist:test`` (the first ``count`` test
    images) or a folder of images (its first ``count``), cached by content."""
    if spec == FASHION_MNIST_TEST:
        images = to_rgb_uint8(load_fashion_mnist("test").images[:count], resolution)
        return reference_features(images, name=f"fashion-mnist-test-first{count}", resolution=resolution, extractor=extractor)
    folder = Path(spec)
    if not folder.is_dir():
        raise ConfigError(f"real reference {spec!r} is neither {FASHION_MNIST_TEST} nor a folder of images")
    images = load_image_folder(folder, resolution=resolution, limit=count)
    return reference_features(images, name=f"folder-{folder.name}-first{count}", resolution=resolution, extractor=extractor)


class SampleScorer:
    """Scores uint8 images (N, 3, H, W) sampled on ``rows`` (prompts with labels, image i seeded
    ``seed + i``) against ``teacher_images``, the teacher's samples on the same rows and seeds."""

    def __init__(self, eval_set: EvalSet, rows: list[dict[str, Any]], teacher_images: np.ndarray, *, device: str = "cpu",
                 kid_subset: int = 50, seed: int = 0, clip_model: str | Path | None = None, real_images: int = 1000,
                 extractor: FeatureExtractor | None = None):
        self.prompts = [r["prompt"] for r in rows]
        self.labels = [r["label"] for r in rows]
        self.teacher_images = teacher_images
        self.kid_subset, self.seed = kid_subset, seed
        self.fx = extractor or FeatureExtractor(device=device)
        res = int(teacher_images.shape[-1])
        self.teacher_features = reference_features(teacher_images, name="teacher-samples", resolution=res, extractor=self.fx)
        self.skipped: dict[str, str] = {}
        self.real = None
        if eval_set.real_reference:
            self.real = real_reference_features(eval_set.real_reference, real_images, res, self.fx)
        else:
            self.skipped["fid_real"] = "the evaluation set names no real reference images"
        self.classifier = None
        if eval_set.classifier and all(lab is not None for lab in self.labels):
            self.classifier = load_classifier(eval_set.classifier)
        else:
            self.skipped["adherence"] = "no classifier" if not eval_set.classifier else "unlabelled prompts"
        self.clip = ClipModel(clip_model, device=device) if clip_model else None
        if self.clip is None:
            self.skipped["clip_score"] = self.skipped["cmmd"] = "no CLIP model directory given (--clip-model)"
        else:
            self.teacher_clip = self.clip.image_embeddings(teacher_images)
        self._teacher_only: dict[str, float] | None = None

    def teacher_scores(self) -> dict[str, float]:
        """The teacher's own samples scored the same way (what a student's adherence and CLIP score compare with)."""
        if self._teacher_only is None:
            out: dict[str, float] = {}
            if self.classifier is not None:
                out["adherence_teacher"] = prompt_adherence(self.classifier, self.teacher_images, self.labels)
            if self.clip is not None:
                out["clip_score_teacher"] = self.clip.clip_score(self.teacher_images, self.prompts)
            self._teacher_only = out
        return dict(self._teacher_only)

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        if len(images) != len(self.prompts):
            raise ValueError(f"{len(images)} images for {len(self.prompts)} evaluation rows")
        k = min(self.kid_subset, len(images))
        vs_teacher = fid_kid(images, self.teacher_features, extractor=self.fx, kid_subset_size=k, seed=self.seed)
        out: dict[str, Any] = {"fid": vs_teacher["fid"], "kid": vs_teacher["kid_mean"], "kid_std": vs_teacher["kid_std"]}
        if self.real is not None:
            vs_real = fid_kid(images, self.real, extractor=self.fx, kid_subset_size=k, seed=self.seed)
            out["fid_real"], out["kid_real"] = vs_real["fid"], vs_real["kid_mean"]
        if self.classifier is not None:
            out["adherence"] = prompt_adherence(self.classifier, images, self.labels)
        if self.clip is not None:
            out["clip_score"] = self.clip.clip_score(images, self.prompts)
            out["cmmd"] = cmmd(self.clip, images, self.teacher_clip)
        out.update(self.teacher_scores())
        return out
