"""SD-2.x and SDXL teachers end to end: tiny random-weight pipelines built here (diffusers' own test
configs scaled down), the conditioning the pipeline itself uses, the final training, the proxy, the
hybrid sweep and a study; unsupported pipelines refused before anything is trained."""

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hybridsd_nas.arch import Candidate
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.cost.pipeline import TextEncoders, text_encoder_macs
from hybridsd_nas.data import encode_source, encode_text, parse_data_spec
from hybridsd_nas.data.synthetic import shapes_folder
from hybridsd_nas.distill import DistillConfig, distill_candidate
from hybridsd_nas.distill.losses import predicted_x0, x0_error
from hybridsd_nas.export import load_unet
from hybridsd_nas.hybrid import HybridPipeline, SweepSettings, run_sweep
from hybridsd_nas.proxy import ProxySettings, Stage, run_proxy, zero_cost_scores
from hybridsd_nas.sources import load_pipeline, resolve_teacher
from hybridsd_nas.sources import teacher as teacher_module
from hybridsd_nas.sources.conditioning import predict, unet_kwargs
from hybridsd_nas.study import run_study, study_from_dict
from hybridsd_nas.study.hybrid import ScheduleCost
from hybridsd_nas.zoo.recipe import VAE_CONFIG, vocab_size, write_clip_tokenizer

CAPTIONS = ["a red square", "a green circle", "a blue bar", "a white cross"]
CANDIDATE = {"drop_mid": True}  # valid on both tiny topologies (BK-SDM-Small's edit)
PROXY = {"distill_steps": 2, "batch_size": 4, "samples": 2, "sampler_steps": 2, "heldout_latents": 4, "kid_subset": 2,
         "seed": 0}


def _text_config(tok: Path, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32, **kw)


def sd2_pipeline(out: Path) -> Path:
    """SD-2.x-style: v-prediction (DDIM), linear projections, per-block head counts, upcast attention."""
    tok = write_clip_tokenizer(out / "tok-sd2", CAPTIONS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(_text_config(tok)),
                                   tokenizer=CLIPTokenizer.from_pretrained(tok), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "sd2", safe_serialization=True)
    return out / "sd2"


def sdxl_pipeline(out: Path) -> Path:
    """SDXL-style: two text encoders (the second projecting), text_time added conditions, per-block
    transformer depth, an attention-free first down block, Euler sampling."""
    tok = write_clip_tokenizer(out / "tok-sdxl", CAPTIONS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(_text_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)), tokenizer=CLIPTokenizer.from_pretrained(tok),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok), unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(out / "sdxl", safe_serialization=True)
    return out / "sdxl"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2_sdxl")
    mp = pytest.MonkeyPatch()
    mp.setenv("HYBRIDSD_NAS_CACHE", str(root / "cache"))
    mp.setenv("HYBRIDSD_NAS_RESULTS", str(root / "runs"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is the fastest on a loaded CPU
    (root / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    (root / "candidate.json").write_text(json.dumps(CANDIDATE))
    yield {"root": root, "sd2": sd2_pipeline(root), "sdxl": sdxl_pipeline(root), "data": shapes_folder(root / "data", 16, CAPTIONS),
           "prompts": str(root / "prompts.txt"), "candidate": str(root / "candidate.json")}
    mp.undo()
    torch.set_num_threads(threads)


KINDS = ["sd2", "sdxl"]


def _captured_unet_inputs(pipe, prompt: str) -> dict:
    """The U-Net inputs of the pipeline's first denoising step (guided: unconditional row first)."""
    seen = {}

    def hook(_m, args, kwargs):
        if not seen:
            seen.update(kwargs, encoder_hidden_states=kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None))

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_the_cache_holds_the_conditioning_the_pipeline_itself_gives_its_unet(env, kind):
    pipe = load_pipeline(env[kind])
    data = encode_source(parse_data_spec(f"folder:{env['data']}"), pipe)
    caption = data.prompts[0]
    _, text = data.gather([0])
    _, uncond = data.gather([0], p_uncond=1.0, g=torch.Generator().manual_seed(0))
    seen = _captured_unet_inputs(pipe, caption)
    kw, kw_u = unet_kwargs(text), unet_kwargs(uncond)
    torch.testing.assert_close(kw["encoder_hidden_states"][0], seen["encoder_hidden_states"][1])
    torch.testing.assert_close(kw_u["encoder_hidden_states"][0], seen["encoder_hidden_states"][0])
    if kind == "sd2":
        assert set(text) == {"prompt_embeds"} and "added_cond_kwargs" not in kw
        assert uncond["prompt_embeds"].abs().sum() > 0  # SD-2.x: the empty prompt, encoded
        return
    assert set(text) == {"prompt_embeds", "text_embeds", "time_ids"}
    assert text["prompt_embeds"].shape == (1, 77, 64) and text["text_embeds"].shape == (1, 32)
    assert text["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    added = seen["added_cond_kwargs"]
    for k in ("text_embeds", "time_ids"):
        torch.testing.assert_close(kw["added_cond_kwargs"][k][0], added[k][1])
        torch.testing.assert_close(kw_u["added_cond_kwargs"][k][0], added[k][0])
    # force_zeros_for_empty_prompt: the unconditional row is zeros, its size conditions are not
    assert uncond["prompt_embeds"].abs().sum() == 0 and uncond["text_embeds"].abs().sum() == 0
    assert uncond["time_ids"].tolist() == text["time_ids"].tolist()
    # the public hook, at another resolution, only moves the size conditions
    again = encode_text(pipe, [caption], resolution=64)
    assert again["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    np.testing.assert_array_equal(again["prompt_embeds"], text["prompt_embeds"].numpy())


def test_v_prediction_implies_its_own_clean_latents_and_x0_error():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(predicted_x0("v_prediction", noisy, sched.get_velocity(x0, noise, t), a), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(predicted_x0("epsilon", noisy, noise, a), x0, atol=1e-3, rtol=1e-3)
    # an output error d moves the clean latents by sqrt(1 - a) d (v) or sqrt((1 - a) / a) d (epsilon)
    d = 0.1 * torch.randn(3, 4, 8, 8, generator=g)
    v = sched.get_velocity(x0, noise, t)
    moved = ((predicted_x0("v_prediction", noisy, v + d, a) - x0) ** 2).flatten(1).mean(1)
    err = (d ** 2).flatten(1).mean(1)
    torch.testing.assert_close(x0_error("v_prediction", err, a.flatten()), moved, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match="supported: epsilon, v_prediction"):
        predicted_x0("sample", noisy, v, a)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_cost_scores_call_the_unet_with_every_condition(env, kind):
    pipe = load_pipeline(env[kind])
    data = encode_source(parse_data_spec(f"folder:{env['data']}"), pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    assert sched.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    same = zero_cost_scores(pipe.unet, pipe.unet, data, sched, n=3)
    assert same["output_mse"] == 0.0 and same["x0_mse"] == 0.0
    _, text = data.gather([0, 1])
    out = predict(pipe.unet, torch.zeros(2, 4, 16, 16), torch.tensor([10, 10]), text)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_distill_candidate_exports_a_student_that_loads_back(env, kind):
    out = env["root"] / f"student-{kind}"
    run = distill_candidate(env[kind], Candidate(**CANDIDATE), out,
                            DistillConfig(steps=2, batch_size=4, log_every=1, checkpoint_every=0), data=str(env["data"]),
                            progress=False)
    assert run.ok, run.result.reason
    assert all(np.isfinite(r["loss"]) and r["task"] > 0 for r in run.result.curve)
    student = load_unet(out)
    teacher_cfg = json.loads((Path(env[kind]) / "unet" / "config.json").read_text())
    for key in ("use_linear_projection", "addition_embed_type", "cross_attention_dim", "attention_head_dim"):
        got = student.config.get(key)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == teacher_cfg.get(key), key
    assert student.mid_block is None and load_pipeline(env[kind]).unet.mid_block is not None
    meta = json.loads((out / "hybridsd_nas.json").read_text())
    assert meta["data_provenance"]["kind"] == "folder"
    pipe = load_pipeline(env[kind])
    data = encode_source(parse_data_spec(f"folder:{env['data']}"), pipe)
    _, text = data.gather([0])
    y = predict(student, torch.zeros(1, 4, 16, 16), torch.tensor([500]), text)
    assert torch.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_proxy_scores_a_candidate_of_the_teacher(env, kind):
    s = ProxySettings(eval_prompts=env["prompts"], data=str(env["data"]), **PROXY)
    res = run_proxy(env[kind], env["candidate"], s, until=Stage.SAMPLES)
    assert res.ok, res.reason
    fig = res.figures
    assert np.isfinite(fig["heldout_mse"]) and fig["heldout_mse"] > 0 and np.isfinite(fig["proxy_fid"])
    assert res.provenance["data_spec"]["kind"] == "folder" and res.provenance["eval_set"]["source"] == env["prompts"]
    assert res.settings["sampler"] == ("DDIMScheduler" if kind == "sd2" else "EulerDiscreteScheduler")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_hybrid_sweep_of_the_teacher_and_a_candidate_produces_rows(env, kind):
    s = SweepSettings(steps=2, step_every=1, orders="large-first", samples=2, batch=2, extra_switches=(),
                      eval_prompts=env["prompts"])
    res = run_sweep(env[kind], ["teacher", env["candidate"]], s, progress=False)
    rows = res["rows"]
    assert [r["first_steps"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["fid"]) for r in rows)
    assert rows[-1]["cloud_share_unet_macs"] == 1.0 and 0 < rows[1]["cloud_share_unet_macs"] < 1
    assert res["macs_per_forward"]["teacher"] > res["macs_per_forward"][res["small"]]
    # both text encoders counted, and what the edge receives: text embeddings (+ SDXL's added conditions)
    text = TextEncoders.of(Path(env[kind]))
    mid = rows[1]
    assert mid["bytes_sent"] == 2 * (77 * text.width + text.added) * 4 + 4 * 16 * 16 * 4


@pytest.mark.parametrize("kind", KINDS)
def test_the_text_side_counts_every_encoder(env, kind):
    pipe = load_pipeline(env[kind])
    text, on_disk = TextEncoders.of(pipe), TextEncoders.of(Path(env[kind]))
    one = text_encoder_macs(json.loads((Path(env[kind]) / "text_encoder" / "config.json").read_text()))
    if kind == "sd2":
        assert (text.width, text.added, text.projection) == (32, 0, (False,)) and text.macs() == one
    else:
        # SDXL: both hidden states side by side, the pooled embedding (32) and 6 size conditions
        assert (text.width, text.added, text.projection) == (64, 38, (False, True))
        assert text.macs() == 2 * one + 32 * 32  # the second encoder is the first's size plus its projection
    assert (on_disk.width, on_disk.added, on_disk.projection, on_disk.macs()) == (text.width, text.added, text.projection, text.macs())
    sc = ScheduleCost(env[kind])
    assert sc.text_shape == (77, text.width) and sc.text_added == text.added and sc.te.macs == 2 * text.macs()
    c = HybridPipeline.from_pipeline(pipe, ["teacher"], [2]).cost()
    assert c["text_encoder"]["macs"] == 2 * text.macs()
    assert c["payload_bytes"]["text_embeddings"] == 2 * (77 * text.width + text.added) * 4


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_samples_as_data_carry_the_conditioning_too(env, kind):
    pipe = load_pipeline(env[kind])
    data = encode_source(parse_data_spec(f"prompts:{env['prompts']}").with_options(count=2, steps=1, guidance=5.0, seed=0), pipe)
    lat, text = data.gather([0, 1])
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all() and lat.abs().sum() > 0
    assert set(text) == ({"prompt_embeds"} if kind == "sd2" else {"prompt_embeds", "text_embeds", "time_ids"})


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_layer_removal_study_completes(env, kind):
    url = f"sqlite:///{env['root'] / f'study-{kind}.db'}"
    cfg = study_from_dict({"name": f"s-{kind}", "teacher": str(env[kind]), "space": "layer-removal",
                           "objectives": [{"metric": "macs"}, {"metric": "heldout_mse"}],
                           "sampler": {"name": "random", "seed": 0}, "trials": 2, "data": str(env["data"]),
                           "proxy": PROXY, "storage": url, "artifacts": str(env["root"] / f"art-{kind}")}, "<test>")
    res = run_study(cfg, storage=url, progress=False)
    assert res["evaluated"] == 2, res
    trials = optuna.load_study(study_name=f"s-{kind}", storage=url).get_trials()
    scored = [t for t in trials if t.user_attrs.get("status") == "ok"]
    assert scored and all(np.isfinite(t.user_attrs["heldout_mse"]) for t in scored)


def _pipeline_dir(tmp_path: Path, index: dict, unet: dict | None = None, scheduler: dict | None = None) -> Path:
    d = tmp_path / "pipe"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (d / "unet").mkdir()
        (d / "unet" / "config.json").write_text(json.dumps(unet))
    if scheduler is not None:
        (d / "scheduler").mkdir()
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return d


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}


@pytest.mark.parametrize("index, unet, scheduler, needle", [
    ({**SD_INDEX, "_class_name": "StableDiffusionUpscalePipeline"}, None, None,
     "pipeline class 'StableDiffusionUpscalePipeline' is not supported; supported: StableDiffusionPipeline, StableDiffusionXLPipeline"),
    ({**SD_INDEX, "_class_name": "StableDiffusionXLPipeline"}, None, None, "a StableDiffusionXLPipeline needs text_encoder_2, tokenizer_2"),
    (SD_INDEX, {"down_block_types": ["AttnDownBlock2D"], "up_block_types": ["UpBlock2D"], "block_out_channels": [32]}, None,
     "down_block_types has 'AttnDownBlock2D'; supported: CrossAttnDownBlock2D, DownBlock2D"),
    (SD_INDEX, {"addition_embed_type": "text_time"}, None, "'text_time' goes with StableDiffusionXLPipeline"),
    (SD_INDEX, {"class_embed_type": "timestep"}, None, "class_embed_type 'timestep' is not supported"),
    (SD_INDEX, {}, {"prediction_type": "sample"}, "prediction_type 'sample' is not supported; supported: epsilon, v_prediction"),
])
def test_an_unsupported_teacher_is_one_line_before_anything_loads(tmp_path, monkeypatch, index, unet, scheduler, needle):
    d = _pipeline_dir(tmp_path, index, unet, scheduler)
    monkeypatch.setattr(teacher_module, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        resolve_teacher(str(d))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        distill_candidate(str(d), Candidate(), tmp_path / "out", DistillConfig(steps=1), data=str(tmp_path))


def test_the_cli_exits_2_on_an_unsupported_pipeline_class(tmp_path, capsys, monkeypatch):
    from hybridsd_nas.cli import main

    d = _pipeline_dir(tmp_path, {**SD_INDEX, "_class_name": "StableDiffusionUpscalePipeline"})
    monkeypatch.setattr(teacher_module, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["distill", "--teacher", str(d), "--candidate", "bk-sdm-tiny", "--steps", "1",
                 "--out", str(tmp_path / "out"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "StableDiffusionUpscalePipeline" in err[0] and "StableDiffusionXLPipeline" in err[0]
