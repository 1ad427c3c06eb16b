import gzip
import struct

import numpy as np
import pytest

from hybridsd_nas import HybridSDError
from hybridsd_nas.data import (
    CLASS_NAMES,
    DEFAULT_DIR,
    DatasetMissingError,
    eval_prompts,
    load_fashion_mnist,
    prompt_for_label,
    to_rgb_uint8,
)


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = load_fashion_mnist("test", root=tmp_path)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.images, imgs)
    np.testing.assert_array_equal(ds.labels, labels.astype(np.int64))


def test_truncated_file_is_a_clear_error(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 10) + bytes(3))  # says 10 labels, holds 3
    with pytest.raises(HybridSDError, match="truncated"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split():
    with pytest.raises(HybridSDError, match="valid: train, test"):
        load_fashion_mnist("validation")


def test_padding_to_rgb():
    imgs = np.full((2, 28, 28), 200, dtype=np.uint8)
    out = to_rgb_uint8(imgs, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.uint8
    assert out[:, :, 2:30, 2:30].min() == 200 and out[:, :, :2].max() == 0 and out[:, :, :, 30:].max() == 0
    with pytest.raises(HybridSDError, match=">= 28"):
        to_rgb_uint8(imgs, 16)


def test_prompts_name_their_class():
    ev = eval_prompts(per_class=2)
    assert sorted({e["class_index"] for e in ev}) == list(range(10))
    for e in ev:
        assert CLASS_NAMES[e["class_index"]] in e["prompt"]
    rng = np.random.default_rng(0)
    assert all(CLASS_NAMES[9] in prompt_for_label(9, rng) for _ in range(20))
    assert prompt_for_label(9, template=0) == "a photo of an ankle boot"


@pytest.mark.skipif(not (DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert tr.images.shape == (60000, 28, 28) and te.images.shape == (10000, 28, 28)
    assert np.bincount(te.labels).tolist() == [1000] * 10
