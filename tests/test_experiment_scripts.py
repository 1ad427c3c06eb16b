"""The teacher's training and evaluation scripts in experiments/ (tiny fake data, a few steps)."""

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion_mnist(root: Path, n: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def _state(path: Path, component: str, weights: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / component / weights))


@pytest.mark.slow
def test_decoder_finetuning_keeps_the_latent_space_and_the_unet(tmp_path):
    train = _script("train_tiny_teacher")
    data = _fake_fashion_mnist(tmp_path / "data")
    common = ["--data-root", str(data), "--device", "cpu", "--classifier-epochs", "0", "--log-every", "1",
              "--vae-batch", "4", "--unet-batch", "4", "--decoder-batch", "4", "--warmup", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(["--out", str(a), "--results", str(tmp_path / "ra"), "--vae-steps", "2", "--unet-steps", "2", *common]) == 0
    assert train.main(["--out", str(b), "--results", str(tmp_path / "rb"), "--resume", str(a), "--vae-steps", "0",
                       "--unet-steps", "0", "--decoder-steps", "3", "--decoder-noise", "0.3", *common]) == 0
    vae_a = _state(a, "vae", "diffusion_pytorch_model.safetensors")
    vae_b = _state(b, "vae", "diffusion_pytorch_model.safetensors")
    enc = [k for k in vae_a if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in vae_a if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    for k in enc:
        torch.testing.assert_close(vae_b[k], vae_a[k], rtol=0, atol=0)
    assert any(not torch.equal(vae_b[k], vae_a[k]) for k in dec), "the decoder did not train"
    unet_a = _state(a, "unet", "diffusion_pytorch_model.safetensors")
    unet_b = _state(b, "unet", "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    cfg_a = json.loads((a / "vae" / "config.json").read_text())
    cfg_b = json.loads((b / "vae" / "config.json").read_text())
    assert cfg_b["scaling_factor"] == cfg_a["scaling_factor"]  # same latent scale: the U-Net stays valid
    settings = json.loads((tmp_path / "rb" / "settings.json").read_text())
    assert settings["decoder_steps_done"] == 3 and settings["unet_steps_done"] == 0
    assert (tmp_path / "rb" / "loss.csv").read_text().count("decoder_mse") == 3


def _report(runs, ref_count=1000):
    return {"reference": {"images": "x", "count": ref_count, "feature_seconds_or_cache": 1.0},
            "features": {"network": "inception"}, "classifier": {"test_accuracy": 0.9},
            "runs": [{"samples": s, "fid": f} for s, f in runs], "adherence_all_images": [{"samples": "g2"}]}


def test_score_keeps_earlier_runs_it_does_not_replace():
    ev = _script("eval_tiny_teacher")
    old = _report([("a.npz", 1.0), ("b.npz", 2.0)])
    new = _report([("b.npz", 3.0), ("c.npz", 4.0)])
    del new["adherence_all_images"]
    new["reference"]["feature_seconds_or_cache"] = 0.1  # timing is not part of what must match
    merged = ev.merge_reports(old, new)
    assert [(r["samples"], r["fid"]) for r in merged["runs"]] == [("a.npz", 1.0), ("b.npz", 3.0), ("c.npz", 4.0)]
    assert merged["adherence_all_images"] == [{"samples": "g2"}]


def test_score_refuses_to_mix_reports_of_different_references():
    ev = _script("eval_tiny_teacher")
    with pytest.raises(SystemExit, match="reference of the existing eval.json differs"):
        ev.merge_reports(_report([("a.npz", 1.0)], ref_count=1000), _report([("b.npz", 2.0)], ref_count=500))
