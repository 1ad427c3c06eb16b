import json

import numpy as np
import pytest
import torch

from hybridsd_nas import HybridSDError, UnknownNameError, zoo
from hybridsd_nas.data import CLASS_NAMES
from hybridsd_nas.zoo import recipe
from hybridsd_nas.cli import main

SD1_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD1_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def test_registry():
    assert "tiny" in zoo.list_models()
    assert zoo.is_zoo_name("tiny") and not zoo.is_zoo_name("sd-v1") and not zoo.is_zoo_name(None)
    assert (zoo.model_path("tiny") / "model_index.json").is_file()
    with pytest.raises(UnknownNameError, match="unknown model 'nope'; known: tiny") as e:
        zoo.model_path("nope")
    assert isinstance(e.value, HybridSDError)


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_zoo_model_is_a_small_complete_pipeline(name):
    d = zoo.model_path(name)
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"{name}: {total / 2**20:.1f} MiB"
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (d / comp).is_dir(), comp
    assert not list(d.rglob("*.bin")) and not list(d.rglob("*.pt")) and not list(d.rglob("*.pkl")), "safetensors only"
    cfg = json.loads((d / "unet" / "config.json").read_text())
    assert cfg["down_block_types"] == SD1_DOWN and cfg["up_block_types"] == SD1_UP
    assert cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn" and cfg["layers_per_block"] == 2
    ev = zoo.eval_prompts(name)
    assert sorted({e["class_index"] for e in ev}) == list(range(len(CLASS_NAMES)))
    assert all(isinstance(e["prompt"], str) and CLASS_NAMES[e["class_index"]] in e["prompt"] for e in ev)


def test_stock_diffusers_loads_and_samples_on_cpu():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(zoo.model_path("tiny"))
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.dtype == torch.float32
    assert len(pipe.unet.down_blocks) == 4 and len(pipe.unet.up_blocks) == 4
    assert [len(b.resnets) for b in pipe.unet.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in pipe.unet.up_blocks] == [3, 3, 3, 3]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a photo of a sneaker", "a trouser"], num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 32, 32, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


def test_tokenizer_builder(tmp_path):
    from transformers import CLIPTokenizer

    texts = ["a photo of a t-shirt", "an ankle boot"]
    merges = recipe.learn_bpe(texts)
    assert merges == recipe.learn_bpe(texts)  # deterministic
    tok = CLIPTokenizer.from_pretrained(recipe.write_clip_tokenizer(tmp_path, texts))
    assert tok.convert_ids_to_tokens(tok("An ankle boot").input_ids) == ["<|startoftext|>", "an</w>", "ankle</w>", "boot</w>", "<|endoftext|>"]
    ids = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and tok.model_max_length == 77  # unseen words split into byte pieces, no error
    assert ids[0] == tok.bos_token_id and tok.pad_token_id == tok.eos_token_id


def test_cli_list_and_path(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in infos] == zoo.list_models() and infos[0]["installed"]
    assert main(["zoo", "list"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["zoo", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(zoo.model_path("tiny"))
    assert main(["zoo", "path", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "tiny", "path": str(zoo.model_path("tiny"))}
    assert main(["zoo", "path", "bogus"]) == 2
    assert "unknown model 'bogus'; known: tiny" in capsys.readouterr().err


def test_pipeline_fingerprint_follows_the_weights(tmp_path):
    """Caches (teacher samples, distillation latents and embeddings) are keyed by content: rewriting
    a weight file in place, even with the same size, gives a new key; an untouched copy keeps it."""
    import shutil

    from hybridsd_nas.sources import pipeline_fingerprint

    src = tmp_path / "a"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 4096)
    first = pipeline_fingerprint(src)
    assert first == pipeline_fingerprint(src)
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    assert first.split("@")[1] == pipeline_fingerprint(dst).split("@")[1]
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01" + b"\x00" * 4095)
    assert pipeline_fingerprint(src) != first


def test_normalise_latents_keeps_the_round_trip_and_centres_the_latents():
    import torch
    from diffusers import AutoencoderKL

    from hybridsd_nas.zoo import recipe

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**recipe.VAE_CONFIG, "block_out_channels": [32, 32], "scaling_factor": 0.3}).eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        z = d.mean * 0.3
        mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
        before = vae.decode(d.mean).sample
        recipe.normalise_latents(vae, mean, std)
        d2 = vae.encode(x).latent_dist
        after = vae.decode(d2.mean / vae.config.scaling_factor).sample
    assert vae.config.scaling_factor == 1.0
    assert torch.allclose(d2.mean.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(d2.mean.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(d2.std, d.std * 0.3 / std.view(1, -1, 1, 1), rtol=1e-3)
    assert torch.allclose(before, after, atol=1e-4)
