"""The chunked U-Net trainer: a run split into chunks ends where one unbroken run ends."""

import json

import pytest
from safetensors.torch import load_file

from experiments.research.tiny_teacher import train_unet

SMALL = ["--limit-images", "64", "--batch", "4", "--warmup", "2", "--log-every", "1", "--device", "cpu", "--threads", "1"]


def _weights(work):
    return {name: load_file(str(work / "checkpoint" / f"{name}.safetensors")) for name in ("unet", "ema_unet", "text_encoder", "rng")}


@pytest.mark.slow
def test_chunks_resume_exactly_and_keep_their_recipe(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_unet.main(["--work", str(whole), "--steps", "4", *SMALL]) == 0
    assert train_unet.main(["--work", str(split), "--steps", "2", *SMALL]) == 0
    assert train_unet.main(["--work", str(split), "--steps", "2", "--device", "cpu", "--threads", "1"]) == 0
    a, b = _weights(whole), _weights(split)
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(a[name][k].equal(b[name][k]) for k in a[name]), name
    chunks = [json.loads(line) for line in (split / "chunks.jsonl").read_text().splitlines()]
    assert [(c["from_step"], c["to_step"]) for c in chunks] == [(0, 2), (2, 4)]
    assert chunks[-1]["run_images"] == 16 and chunks[-1]["images_per_second"] > 0
    with pytest.raises(SystemExit, match="another recipe: --lr 0.1"):
        train_unet.main(["--work", str(split), "--steps", "1", "--lr", "0.1"])


@pytest.mark.slow
def test_exported_pipeline_loads_stock_and_samples_normalised_latents(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    work = tmp_path / "run"
    assert train_unet.main(["--work", str(work), "--steps", "1", "--export", str(tmp_path / "pipe"), *SMALL]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == 1.0
    assert pipe.unet.config.attention_head_dim == [1, 2, 3, 3]
    assert DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample is False
    lat = load_file(str(work / "latents.safetensors"))["mean"]
    assert lat.mean((0, 2, 3)).abs().max() < 0.05 and (lat.std((0, 2, 3)) - 1).abs().max() < 0.05
    img = pipe(["a photo of a sneaker"], num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_min_snr_weights():
    import torch

    a = torch.tensor([0.999, 0.5, 0.01])  # SNR 999, 1, 0.0101
    w = train_unet.loss_weights(a, 5.0, "epsilon")
    assert torch.allclose(w, torch.tensor([5 / 999, 1.0, 1.0]), atol=1e-4)
    assert torch.equal(train_unet.loss_weights(a, 0.0, "epsilon"), torch.ones(3))
    v = train_unet.loss_weights(a, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([5 / 1000, 0.5, 0.0101 / 1.0101]), atol=1e-4)


@pytest.mark.slow
def test_a_run_without_its_latent_cache_encodes_it_again(tmp_path):
    work = tmp_path / "run"
    assert train_unet.main(["--work", str(work), "--steps", "1", *SMALL]) == 0
    before = load_file(str(work / "latents.safetensors"))
    (work / "latents.safetensors").unlink()
    assert train_unet.main(["--work", str(work), "--steps", "1", "--device", "cpu", "--threads", "1"]) == 0
    after = load_file(str(work / "latents.safetensors"))
    assert after["labels"].equal(before["labels"])
    for k in ("mean", "std"):
        assert (after[k] - before[k]).abs().max() < 1e-4 * before[k].abs().max()
    assert "encoding the training set again" in (work / "train_log.txt").read_text()
