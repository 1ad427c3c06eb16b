import numpy as np
import pytest
import torch

from hybridsd_nas import HybridSDError
from hybridsd_nas.data import DEFAULT_DIR
from hybridsd_nas.metrics import (
    FeatureExtractor,
    fid_helper_fid,
    fid_kid,
    load_classifier,
    load_image_folder,
    prompt_adherence,
    reference_features,
)
from hybridsd_nas.metrics.adherence import SmallCNN, predict, save_classifier

HAVE_FMNIST = (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def _blobs(n, seed, bright):
    """Synthetic uint8 images: random blobs on black, brightness ``bright``."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        r, c, s = rng.integers(4, 20), rng.integers(4, 20), rng.integers(6, 12)
        x[i, :, r : r + s, c : c + s] = rng.integers(bright // 2, bright + 1)
    return x


@pytest.fixture(scope="module")
def fx():
    return FeatureExtractor(device="cpu", batch_size=50)


@pytest.fixture(scope="module")
def two_sets():
    return _blobs(60, 0, 255), _blobs(60, 1, 120)


def test_features_shape_and_passthrough(fx):
    imgs = _blobs(3, 0, 255)
    f = fx.features(imgs)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert fx(f) is f  # precomputed features pass through
    grey = torch.as_tensor(imgs[:, :1])
    torch.testing.assert_close(fx.features(grey), f)  # grey is repeated to RGB
    with pytest.raises(HybridSDError, match="uint8"):
        fx.features(torch.rand(2, 3, 32, 32))


@pytest.mark.slow
def test_torchmetrics_fid_matches_fid_helper(fx, two_sets):
    a, b = two_sets
    ours = fid_kid(a, b, extractor=fx, kid_subset_size=50)
    ref = fid_helper_fid(a, b)
    assert ref > 1.0  # different sets: a clearly non-zero distance
    assert abs(ours["fid"] - ref) / ref < 1e-3, (ours["fid"], ref)


@pytest.mark.slow
def test_fid_kid_behave(fx, two_sets):
    a, b = two_sets
    fa, fb = fx.features(a), fx.features(b)
    same = fid_kid(fa, fa, extractor=fx, kid_subset_size=50, kid_subsets=20)
    diff = fid_kid(fa, fb, extractor=fx, kid_subset_size=50, kid_subsets=20)
    assert abs(same["fid"]) < 1e-2 and diff["fid"] > 10 * max(same["fid"], 1e-3)
    assert diff["kid_mean"] > same["kid_mean"] + 3 * diff["kid_std"]
    with pytest.raises(HybridSDError, match="at least 2"):
        fid_kid(fa[:1], fb, extractor=fx)


def test_reference_cache_by_content(fx, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path))
    imgs = _blobs(4, 3, 200)
    calls = []
    orig = fx.features
    monkeypatch.setattr(fx, "features", lambda x: calls.append(len(x)) or orig(x))
    f1 = reference_features(imgs, "blobs", resolution=32, extractor=fx)
    f2 = reference_features(imgs, "blobs", resolution=32, extractor=fx)
    assert calls == [4] and torch.equal(f1, f2)  # second call read the cache
    assert len(list((tmp_path / "fid_reference").glob("blobs-r32-n4-*.safetensors"))) == 1
    other = imgs.copy()
    other[0, 0, 0, 0] = 1
    reference_features(other, "blobs", resolution=32, extractor=fx)  # other content: another entry
    reference_features(imgs[:3], "blobs", resolution=32, extractor=fx)  # other count: another entry
    assert calls == [4, 4, 3]
    assert len(list((tmp_path / "fid_reference").glob("*.safetensors"))) == 3


def test_image_folder(tmp_path):
    from PIL import Image

    imgs = _blobs(3, 5, 255)
    (tmp_path / "sub").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.transpose(1, 2, 0)).save(tmp_path / ("sub" if i else ".") / f"{i}.png")
    got = load_image_folder(tmp_path)
    assert got.shape == (3, 3, 32, 32)
    assert load_image_folder(tmp_path, resolution=16).shape == (3, 3, 16, 16)
    with pytest.raises(HybridSDError, match="no images"):
        load_image_folder(_empty(tmp_path))
    with pytest.raises(HybridSDError, match="not a folder"):
        load_image_folder(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    m = SmallCNN(width=8).eval()
    save_classifier(m, tmp_path / "clf")
    assert not list((tmp_path / "clf").glob("*.pt"))
    m2 = load_classifier(tmp_path / "clf")
    x = _blobs(4, 0, 255)
    np.testing.assert_array_equal(predict(m, x), predict(m2, x))
    with pytest.raises(HybridSDError, match="no classifier"):
        load_classifier(tmp_path)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian package dataset-fashion-mnist not installed")
@pytest.mark.slow
def test_shipped_classifier_on_real_test_images():
    from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8

    te = load_fashion_mnist("test")
    clf = load_classifier()
    acc = prompt_adherence(clf, to_rgb_uint8(te.images[:1000]), te.labels[:1000])
    assert acc > 0.85
    wrong = (te.labels[:1000] + 1) % 10
    assert prompt_adherence(clf, to_rgb_uint8(te.images[:1000]), wrong) < 0.1
