"""The teacher's training and evaluation scripts (tiny fake data, a few steps)."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.research.tiny_teacher import eval_tiny_teacher, train_tiny_teacher


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
    train = train_tiny_teacher
    data = _fake_fashion_mnist(tmp_path / "data")
    common = ["--data-root", str(data), "--device", "cpu", "--classifier-epochs", "0", "--log-every", "1",
              "--vae-batch", "4", "--decoder-batch", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(["--out", str(a), "--results", str(tmp_path / "ra"), "--vae-steps", "2", *common]) == 0
    assert train.main(["--out", str(b), "--results", str(tmp_path / "rb"), "--resume", str(a), "--vae-steps", "0",
                       "--decoder-steps", "3", "--decoder-noise", "0.3", *common]) == 0
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
    assert settings["decoder_steps_done"] == 3
    assert (tmp_path / "rb" / "loss.csv").read_text().count("decoder_mse") == 3


def _report(runs, ref_count=1000):
    return {"reference": {"images": "x", "count": ref_count, "feature_seconds_or_cache": 1.0},
            "features": {"network": "inception"}, "classifier": {"test_accuracy": 0.9},
            "runs": [{"samples": s, "fid": f} for s, f in runs], "adherence_all_images": [{"samples": "g2"}]}


def test_score_keeps_earlier_runs_it_does_not_replace():
    ev = eval_tiny_teacher
    old = _report([("a.npz", 1.0), ("b.npz", 2.0)])
    new = _report([("b.npz", 3.0), ("c.npz", 4.0)])
    del new["adherence_all_images"]
    new["reference"]["feature_seconds_or_cache"] = 0.1  # timing is not part of what must match
    merged = ev.merge_reports(old, new)
    assert [(r["samples"], r["fid"]) for r in merged["runs"]] == [("a.npz", 1.0), ("b.npz", 3.0), ("c.npz", 4.0)]
    assert merged["adherence_all_images"] == [{"samples": "g2"}]


def test_adherence_keeps_the_rows_of_other_sample_files(tmp_path):
    import argparse

    ev = eval_tiny_teacher
    meta = {"pipeline": "v3", "sampler": "PNDMScheduler", "steps": 25, "guidance": 7.5, "count": 4, "seed": 0,
            "device_name": "cpu"}
    f = tmp_path / "samples_v3_g7.5.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(f, images=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), class_index=np.array([0, 1, 2, 3]),
                        meta=json.dumps(meta))
    old = {"samples": "samples_v2_g2.npz", **meta, "pipeline": "v2", "adherence": 0.372}
    stale = {"samples": f.name, **meta, "adherence": 9.0}
    (tmp_path / "eval.json").write_text(json.dumps({"adherence_all_images": [old, stale]}))
    ev.cmd_adherence(argparse.Namespace(results=str(tmp_path), classifier=None, samples=[str(f)]))
    rows = json.loads((tmp_path / "eval.json").read_text())["adherence_all_images"]
    assert [r["samples"] for r in rows] == ["samples_v2_g2.npz", f.name] and rows[0] == old
    assert 0.0 <= rows[1]["adherence"] <= 1.0  # measured again, not the stale row


def test_score_refuses_to_mix_reports_of_different_references():
    ev = eval_tiny_teacher
    with pytest.raises(SystemExit, match="eval.json"):
        ev.merge_reports(_report([("a.npz", 1.0)], ref_count=1000), _report([("b.npz", 2.0)], ref_count=500))
