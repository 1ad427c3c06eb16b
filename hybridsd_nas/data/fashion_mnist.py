"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist`` (MIT).

The package installs ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
(60000 + 10000 grey 28x28 images, 10 classes). The directory can be overridden with the
environment variable ``HYBRIDSD_NAS_FASHION_MNIST`` or the ``root`` argument; plain (not gzipped)
IDX files are read as well.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridsd_nas.core.errors import HybridSDError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "HYBRIDSD_NAS_FASHION_MNIST"

# The dataset's labels 0..9, in order (Zalando's class names, lower-cased for prompts).
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

_SPLITS = {"train": "train", "test": "t10k"}


class DatasetMissingError(HybridSDError, FileNotFoundError):
    """A data set whose files are not installed."""


@dataclass(frozen=True)
class FashionMNIST:
    """One split: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)."""

    split: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = root / name
        if p.is_file():
            return p
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise HybridSDError(f"{path} is not an IDX file (too short); reinstall dataset-fashion-mnist")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise HybridSDError(f"{path} is not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise HybridSDError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} values); reinstall dataset-fashion-mnist")
    return arr.reshape(shape)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory the IDX files are read from: ``root``, else ``$HYBRIDSD_NAS_FASHION_MNIST``, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_DIR


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> FashionMNIST:
    """Read one split (``train`` or ``test``) of Fashion-MNIST."""
    if split not in _SPLITS:
        raise HybridSDError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_SPLITS)}")
    d = data_dir(root)
    stem = _SPLITS[split]
    img_p = _find(d, f"{stem}-images-idx3-ubyte")
    lab_p = _find(d, f"{stem}-labels-idx1-ubyte")
    if img_p is None or lab_p is None:
        raise DatasetMissingError(
            f"Fashion-MNIST {split} files not found in {d}; install them with "
            f"'apt-get install dataset-fashion-mnist' or set {ENV_DIR} to a folder holding {stem}-*-ubyte.gz"
        )
    images = _read_idx(img_p)
    labels = _read_idx(lab_p).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise HybridSDError(f"Fashion-MNIST {split} files in {d} disagree in shape; reinstall dataset-fashion-mnist")
    return FashionMNIST(split=split, images=images, labels=labels)


def to_rgb_uint8(images: np.ndarray, resolution: int = 32) -> np.ndarray:
    """Grey (N, 28, 28) uint8 -> RGB (N, 3, R, R) uint8, zero-padded (the background is black) to ``resolution``.

    ``resolution`` must be at least 28; the image is centred. This is the exact view the tiny teacher
    was trained on (32x32) and the one its reference statistics use.
    """
    n, h, w = images.shape
    if resolution < max(h, w):
        raise HybridSDError(f"resolution {resolution} is smaller than the {h}x{w} images; valid: >= {max(h, w)}")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = np.zeros((n, 3, resolution, resolution), dtype=np.uint8)
    out[:, :, top : top + h, left : left + w] = images[:, None]
    return out
