"""Hybrid inference: exactness, switching, callbacks, restore, validation, decoders, cost arithmetic, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost.pipeline import Baseline, Component, Link, Payload, Segment, account, cloud_share_table
from hybridsd_nas.hybrid import HybridPipeline, HybridScheduleError, parse_steps, step_groups, tiny_random_vae

PROMPTS = ["a photo of a dress", "a coat", "a sandal"]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hybridsd_nas.zoo.recipe import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, sampling_scheduler, vocab_size, write_clip_tokenizer

    tok_dir = write_clip_tokenizer(tmp_path_factory.mktemp("tok"), PROMPTS)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=vocab_size(tok_dir))).eval()
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_student(tiny_pipe):
    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", "bk-sdm-tiny"], [1, 1])
    return h.models[1].unet


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)


def run(p, steps=3, seed=0, **kw):
    kw.setdefault("output_type", "np")
    return p("a coat", num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), **kw).images


def with_unet(pipe, unet, **kw):
    old = pipe.unet
    pipe.unet = unet
    try:
        return run(pipe, **kw)
    finally:
        pipe.unet = old


def test_all_steps_on_the_first_unet_equal_the_pipeline_to_the_bit(tiny_pipe, tiny_student):
    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [3, 0])
    assert torch.equal(_t(run(h)), _t(run(tiny_pipe)))
    assert set(h.last_trace) == {0}


def test_all_steps_on_the_second_unet_equal_a_pipeline_with_that_unet(tiny_pipe, tiny_student):
    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [0, 3])
    assert torch.equal(_t(run(h)), _t(with_unet(tiny_pipe, tiny_student)))
    assert tiny_pipe.unet is not tiny_student  # restored


def test_switching_between_identical_unets_keeps_one_scheduler_state(tiny_pipe):
    # same weights in three modules: any reset of the solver state at a switch would change the output
    from diffusers import DPMSolverMultistepScheduler

    twin = copy.deepcopy(tiny_pipe.unet)
    old = tiny_pipe.scheduler
    for sched in (old, DPMSolverMultistepScheduler.from_config(old.config)):
        tiny_pipe.scheduler = sched
        try:
            h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", twin, "teacher"], [1, 1, 2])
            assert torch.equal(_t(run(h, steps=4, output_type="latent")),
                               _t(run(tiny_pipe, steps=4, output_type="latent")))
        finally:
            tiny_pipe.scheduler = old


def test_more_than_two_unets_either_order(tiny_pipe, tiny_student):
    base = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", "bk-sdm-base"], [1, 1]).models[1]
    h = HybridPipeline.from_pipeline(tiny_pipe, [tiny_student, "teacher", base], [1, 1, 1])
    run(h)
    # PNDM: 3 steps are 4 evaluations (the warm-up repeats the second timestep, which belongs to step 1)
    assert h.last_trace == [0, 1, 1, 2]
    assert [s["model"] for s in h.schedule()] == ["bk-sdm-tiny", "teacher", base.name]
    assert "not distilled" in base.name


def test_step_groups_count_repeated_timesteps_once():
    assert step_groups([981, 961, 961, 941, 921]) == [0, 1, 1, 2, 3]
    assert step_groups([3, 2, 1]) == [0, 1, 2]


def test_user_callback_still_called(tiny_pipe, tiny_student):
    calls = []

    def cb(p, i, t, kw):
        calls.append((i, p.unet is tiny_student, sorted(kw)))
        return {}

    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [2, 1])
    run(h, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert all(c[2] == ["latents", "prompt_embeds"] for c in calls)
    assert calls[0][1] is False and calls[-1][1] is True


def test_pipeline_restored_after_an_error(tiny_pipe, tiny_student):
    unet, vae = tiny_pipe.unet, tiny_pipe.vae

    def boom(p, i, t, kw):
        if i == 1:
            raise RuntimeError("boom")
        return {}

    h = HybridPipeline.from_pipeline(tiny_pipe, [tiny_student, "teacher"], [1, 2], vae=tiny_random_vae(4, upsample=2))
    with pytest.raises(RuntimeError, match="boom"):
        run(h, callback_on_step_end=boom)
    assert tiny_pipe.unet is unet and tiny_pipe.vae is vae


def test_step_schedule_validation(tiny_pipe, tiny_student):
    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [2, 2])
    with pytest.raises(HybridScheduleError, match="add up to 4"):
        run(h, steps=3)
    with pytest.raises(HybridScheduleError):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [2])
    with pytest.raises(HybridScheduleError):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [3, -1])
    with pytest.raises(HybridScheduleError):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [0, 0])
    with pytest.raises(HybridSDError):
        parse_steps("10,x")
    with pytest.raises(HybridSDError):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [1, 1], locations=["cloud", "moon"])
    with pytest.raises(HybridSDError):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher", "no-such-unet"], [1, 1])


def test_autoencoder_tiny_decode_path(tiny_pipe, tiny_student):
    from diffusers import AutoencoderTiny

    vae = tiny_random_vae(4, upsample=2)
    assert isinstance(vae, AutoencoderTiny)
    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [1, 2], vae=vae)
    ref = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [1, 2])
    img = run(h)
    assert img.shape == (1, 32, 32, 3) and (img >= 0).all() and (img <= 1).all()
    # the decoder changes only the decode: the latents are the same
    assert torch.equal(_t(run(h, output_type="latent")), _t(run(ref, output_type="latent")))
    assert tiny_pipe.vae is not vae
    with pytest.raises(HybridSDError, match="latent channels"):
        HybridPipeline.from_pipeline(tiny_pipe, ["teacher"], [1], vae=tiny_random_vae(8, upsample=2))


def test_cost_accounting_large_first_by_hand():
    link = Link(bandwidth_mbps=8.0, rtt_ms=20.0)  # 8 Mbit/s: 1 byte per microsecond
    segs = [Segment("L", "cloud", 10, 100, 4.0), Segment("S", "edge", 15, 40, 1.0)]
    te = Component("te", "cloud", 6, 0.5)
    dec = Component("dec", "edge", 50, 2.0)
    c = account(segs, Baseline(100, ms_per_step=4.0), Payload((4, 8, 8), (77, 128), (16, 16, 3), cfg=True, dtype_bytes=2, prompt_bytes=7),
                text_encoder=te, decoder=dec, link=link)
    lat, emb = 4 * 8 * 8 * 2, 2 * 77 * 128 * 2
    assert c["payload_bytes"] == {"latents": lat, "text_embeddings": emb, "image": 16 * 16 * 3}
    assert [(t["what"], t["bytes"]) for t in c["transfers"]] == [("prompt", 7), ("latents + text embeddings", lat + emb)]
    assert c["bytes_sent"] == 7 + lat + emb
    assert c["transfer_ms"] == pytest.approx(2 * 10.0 + (7 + lat + emb) / 1000)
    # one guided step = a forward on 2 latents
    assert c["segments"][0]["macs_per_step"] == 200 and c["segments"][1]["macs_total"] == 15 * 80
    assert c["cloud_share"]["steps"] == pytest.approx(10 / 25)
    assert c["cloud_share"]["unet_macs"] == pytest.approx(10 * 200 / (25 * 200))
    assert c["cloud_share"]["all_macs"] == pytest.approx((10 * 200 + 6) / (25 * 200 + 6 + 50))
    assert c["cloud_share"]["unet_ms"] == pytest.approx(40 / 100)
    assert c["cloud_share"]["all_ms"] == pytest.approx((40 + 0.5) / (100 + 0.5 + 2.0))
    assert c["end_to_end_ms"] == pytest.approx(0.5 + 40 + 15 + 2.0 + c["transfer_ms"])
    assert c["cloud_reduction"]["steps"] == pytest.approx(0.6)


def test_cost_accounting_small_first_and_cloud_decode_by_hand():
    segs = [Segment("S", "edge", 10, 40), Segment("L", "cloud", 15, 100)]
    c = account(segs, Baseline(100), Payload((4, 8, 8), (77, 128), (16, 16, 3), cfg=False, dtype_bytes=4),
                text_encoder=Component("te", "cloud", 6), decoder=Component("dec", "cloud", 50), link=Link(100.0, 50.0))
    lat, emb = 4 * 8 * 8 * 4, 1 * 77 * 128 * 4  # no guidance: the cond embeddings only
    assert [(t["what"], t["from"], t["to"], t["bytes"]) for t in c["transfers"]] == [
        ("prompt", "edge", "cloud", 0), ("text embeddings", "cloud", "edge", emb),
        ("latents", "edge", "cloud", lat), ("image", "cloud", "edge", 16 * 16 * 3)]
    assert c["end_to_end_ms"] is None  # no latencies given
    assert c["cloud_share"]["all_macs"] == pytest.approx((15 * 100 + 6 + 50) / (25 * 100 + 6 + 50))


def test_cloud_share_table_by_hand():
    rows = cloud_share_table(10, 1, 30, totals=(25,))
    r = next(r for r in rows if r["cloud_steps"] == 9)
    assert r["steps"] == pytest.approx(9 / 25)
    assert r["macs_te_vae"] == pytest.approx((9 * 20 + 2) / (25 * 20 + 2 + 30))
    assert r["macs_te_vae_cloud_decode"] == pytest.approx((9 * 20 + 2 + 30) / (25 * 20 + 2 + 30))


@pytest.mark.slow
def test_pipeline_cost_uses_the_cost_engine(tiny_pipe, tiny_student):
    from hybridsd_nas.cost import estimate_cost

    h = HybridPipeline.from_pipeline(tiny_pipe, ["teacher", tiny_student], [10, 15], vae=tiny_random_vae(4, upsample=2))
    c = h.cost(prompt="a coat")
    cfg = {k: v for k, v in dict(tiny_pipe.unet.config).items() if not k.startswith("_")}
    small = estimate_cost(cfg, "bk-sdm-tiny", resolution=32, vae_scale=2).macs
    big = estimate_cost(cfg, None, resolution=32, vae_scale=2).macs
    assert c["segments"][1]["macs_per_step"] == 2 * small and c["segments"][0]["macs_per_step"] == 2 * big
    assert c["cloud_share"]["unet_macs"] == pytest.approx(10 * big / (25 * big))
    assert c["payload_bytes"]["latents"] == 4 * 16 * 16 * 4  # float32 pipeline
    assert c["decoder"]["location"] == "edge" and c["models"][1]["origin"] == "module"


@pytest.mark.slow
def test_cli_writes_images_and_cost_summary(tiny_pipe, tmp_path, capsys):
    from hybridsd_nas.cli import main

    tdir = tmp_path / "teacher"
    tiny_pipe.save_pretrained(tdir, safe_serialization=True)
    out = tmp_path / "out"
    assert main(["hybrid", "--teacher", str(tdir), "--unets", "teacher", "bk-sdm-tiny", "--steps", "1,2",
                 "--prompt", "a coat", "--guidance", "5", "--num-images", "2", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == ["image_000_seed0.png", "image_001_seed1.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["image_000_seed0.png", "image_001_seed1.png"]
    s = json.loads((out / "cost_summary.json").read_text())
    assert s["steps"] == [1, 2] and s["cost"]["cloud_share"]["steps"] == pytest.approx(1 / 3)
    assert main(["hybrid", "--teacher", str(tdir), "--unets", "teacher", "--steps", "1,2", "--prompt", "x",
                 "--out", str(out)]) == 2
