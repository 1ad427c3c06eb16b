import json

import pytest

from hybridsd_nas.cli import main
from hybridsd_nas.proxy import ProxySettings, Stage, run_proxy

pytestmark = pytest.mark.slow

TINY = ProxySettings(distill_steps=2, batch_size=4, samples=8, sampler_steps=2, reference_images=16, kid_subset=4, data_images=64)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))


def test_proxy_scores_a_candidate_on_the_embedded_teacher():
    res = run_proxy("tiny", "bk-sdm-small", TINY)
    assert res.ok, res.reason
    r = res.to_dict()
    for k in ("proxy_fid", "fid_real", "kid", "paired_mse", "heldout_mse", "adherence", "distill_seconds", "eval_seconds"):
        assert isinstance(r[k], float), k
    assert r["proxy_fid"] >= 0 and 0 <= r["adherence"] <= 1 and r["samples"] == 8 and 0 < r["paired_mse"] < 1
    assert r["zero_cost"]["output_mse"] > 0  # BK-SDM-Small differs from the teacher before training
    # the held-out score is the rank-fidelity experiment's: test-split latents, noise seeded seed + 1
    from diffusers import DDPMScheduler

    from hybridsd_nas.distill import fashion_mnist_data
    from hybridsd_nas.sources import load_pipeline
    from hybridsd_nas.proxy import zero_cost_scores

    pipe = load_pipeline("tiny")
    held = fashion_mnist_data(pipe, n=TINY.heldout_latents, seed=TINY.seed, split="test")
    ref = zero_cost_scores(res.student.eval(), pipe.unet, held, DDPMScheduler.from_config(pipe.scheduler.config),
                           n=TINY.heldout_latents, seed=TINY.seed + 1)
    assert r["heldout_mse"] == pytest.approx(ref["output_mse"], rel=1e-5)
    again = run_proxy("tiny", "identity", TINY).to_dict()
    assert again["zero_cost"]["output_mse"] == 0.0  # the no-op candidate is the teacher
    # two steps of training move the teacher's own copy a little, not as far as BK-SDM-Small is
    assert 0 <= again["heldout_mse"] < r["heldout_mse"]
    # without evaluation the held-out score is still taken (a study ranking by it alone never samples);
    # the hybrid study, which ranks schedules by their samples, turns it off too
    quiet = run_proxy("tiny", "identity", TINY, until=Stage.HELDOUT).to_dict()
    assert quiet["heldout_mse"] == pytest.approx(again["heldout_mse"], rel=1e-5) and "proxy_fid" not in quiet
    trained = run_proxy("tiny", "identity", TINY, until=Stage.DISTILL).to_dict()
    assert "heldout_mse" not in trained and trained["distill_seconds"] > 0
    zero = run_proxy("tiny", "identity", TINY, until=Stage.ZERO_COST)
    assert zero.ok and not zero.distill and zero.zero_cost["output_mse"] == 0.0
    skipped = run_proxy("tiny", "bk-sdm-small", TINY, prefilter=lambda zc: "too far" if zc["output_mse"] > 0 else None)
    assert skipped.status == "skipped" and skipped.reason == "too far" and not skipped.distill


def test_proxy_cli_json(capsys):
    argv = ["proxy", "--teacher", "tiny", "--candidate", "bk-sdm-base", "--distill-steps", "1", "--samples", "4",
            "--sampler-steps", "2", "--batch-size", "2", "--reference-images", "8", "--data-images", "32",
            "--kid-subset", "4", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["status"] == "ok" and {"proxy_fid", "fid_real", "kid", "adherence", "distill_seconds", "eval_seconds"} <= set(r)
    # --no-sampling stops at the ranking score: the same held-out MSE, no samples and no sample figures
    assert main(argv + ["--no-sampling"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["status"] == "ok" and q["heldout_mse"] == pytest.approx(r["heldout_mse"], rel=1e-5)
    assert not {"proxy_fid", "kid", "adherence", "eval_seconds"} & set(q)
    assert main(argv[:-1] + ["--no-sampling"]) == 0
    text = capsys.readouterr().out
    assert "held-out output MSE" in text and "the ranking score" in text and "proxy FID" not in text


def test_perceptual_term_trains_through_a_frozen_classifier(tmp_path):
    import torch
    from diffusers import DDPMScheduler

    from hybridsd_nas.build import build_student
    from hybridsd_nas.arch import describe, plan, resolve_candidate
    from hybridsd_nas.distill import DistillConfig, LossWeights, distill, fashion_mnist_data, perceptual_term
    from hybridsd_nas.core.errors import HybridSDError
    from hybridsd_nas.sources import load_pipeline

    pipe = load_pipeline("tiny")
    p = plan(describe("tiny"), resolve_candidate("bk-sdm-tiny", describe("tiny")))
    student = build_student(p, teacher=pipe.unet, device="cpu")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = fashion_mnist_data(pipe, n=16)
    perc, dec = perceptual_term(pipe, "tiny")
    vae_before = [q.requires_grad for q in pipe.vae.parameters()]
    cfg = DistillConfig(steps=2, batch_size=4, log_every=1, weights=LossWeights(task=0, out_kd=0, feat_kd=0, perceptual=1.0))
    r = distill(student, pipe.unet, p, data, DDPMScheduler.from_config(pipe.scheduler.config), cfg, perceptual=perc, decode=dec)
    assert r.status == "ok" and all(c["perceptual"] > 0 and c["loss"] == c["perceptual"] for c in r.curve)
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the term alone trains the student
    assert not any(vae_before) and not any(q.grad is not None for q in pipe.vae.parameters())  # the decoder stays frozen
    with pytest.raises(HybridSDError, match="perceptual network '/nope' is not a directory"):
        perceptual_term(pipe, "tiny", net="/nope")
    with pytest.raises(ValueError, match="perceptual weight 1.0 given but no perceptual network"):
        distill(student, pipe.unet, p, data, DDPMScheduler.from_config(pipe.scheduler.config), cfg)


def test_samples_are_made_in_plain_float32_whatever_the_caller_set():
    """TF32 convolutions (cuDNN's default on CUDA) give samples that differ visibly from float32 ones;
    the cached teacher samples every evaluation compares against are float32, so sampling is too."""
    import types

    import numpy as np
    import torch

    from hybridsd_nas.proxy import generate

    seen = []

    class P:  # a pipeline that records the precision it samples in
        unet = "teacher"

        def __call__(self, prompts, **kw):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return types.SimpleNamespace(images=np.zeros((len(prompts), 4, 4, 3), dtype=np.float32))

    caller = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)

    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        imgs = generate(P(), "student", ["a", "b", "c"], seed=0, steps=2, guidance=1.0, batch=2)
        assert imgs.shape == (3, 3, 4, 4) and seen == [(False, False), (False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = caller


def test_distill_cli_exports_the_moving_average_and_names_a_bad_decay(tmp_path, capsys):
    """The final training with ``--ema-decay``: the export holds the averaged weights, records the
    average, and loads back; a decay outside (0, 1) is a one-line error with exit status 2."""
    from hybridsd_nas.export import load_unet

    out = tmp_path / "small"
    argv = ["distill", "--teacher", "tiny", "--candidate", "bk-sdm-small", "--steps", "3", "--batch-size", "2",
            "--checkpoint-every", "2", "--ema-decay", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "exported weights: EMA" in capsys.readouterr().out
    meta = json.loads((out / "hybridsd_nas.json").read_text())
    ema = meta["distill"]["ema"]
    assert ema["steps"] == 3 and ema["held_by_student"] and meta["distill"]["config"]["ema_decay"] == 0.5
    assert load_unet(out) is not None
    assert main(argv[:-4] + ["--ema-decay", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ema_decay 1.5 is not a decay" in err and "(0, 1)" in err
    assert main(argv[:-4] + ["--lr-schedule", "cosin", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown lr_schedule 'cosin'" in err and "cosine" in err
    assert not (tmp_path / "bad").exists()
