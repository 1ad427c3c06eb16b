import copy

import pytest
import torch

from hybridsd_nas.arch import Candidate, candidate_preset, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.distill import DistillConfig, DistillData, LossWeights, distill

from .conftest import TINY_SD1


def _data(n=16, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 4, 16, 16, generator=g)
    if nan:
        lat[0, 0, 0, 0] = float("nan")
    emb = torch.randn(3, 7, 32, generator=g)
    return DistillData(lat, torch.randint(0, 2, (n,), generator=g), emb, ["a", "b"], "synthetic")


def _sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _student(teacher, cand):
    arch = describe(TINY_SD1)
    p = plan(arch, cand)
    return build_student(p, teacher=teacher, device="cpu"), p


def test_short_distillation_runs_and_reports_feature_rule(tiny_sd1_teacher):
    arch = describe(TINY_SD1)
    s, p = _student(tiny_sd1_teacher, candidate_preset("bk-sdm-tiny", arch))
    before = copy.deepcopy(s.state_dict())
    teacher_mode = tiny_sd1_teacher.training
    r = distill(s, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=4, batch_size=4, log_every=1,
                weights=LossWeights(mid=1.0)))
    assert r.status == "ok" and r.steps_done == 4 and len(r.curve) == 4
    assert all(c["loss"] > 0 for c in r.curve) and "feat_kd" in r.curve[0] and "mid" not in r.curve[0]
    rule = {(x["student"], x["teacher"]): x["status"] for x in r.feature_rule}
    assert rule[("up_blocks.0", "up_blocks.1")] == "paired"  # BK-SDM-Tiny's up0 was the teacher's up1
    assert rule[("-", "up_blocks.0")].startswith("skipped") and rule[("-", "mid_block")].startswith("skipped")
    assert any(not torch.equal(before[k], v) for k, v in s.state_dict().items())
    # the caller's teacher comes back as it was handed over: trainable flags and mode untouched
    assert all(p_.requires_grad for p_ in tiny_sd1_teacher.parameters())
    assert tiny_sd1_teacher.training == teacher_mode


def test_frozen_parts_get_no_update_and_no_optimizer_state(tiny_sd1_teacher):
    arch = describe(TINY_SD1)
    s, p = _student(tiny_sd1_teacher, candidate_preset("asdm-m1", arch))
    before = copy.deepcopy(s.state_dict())
    r = distill(s, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=3, batch_size=4, weights=LossWeights(mid=1.0)))
    assert r.status == "ok" and 0 < r.trainable_params < r.frozen_params
    after = s.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("down_blocks.0.", "up_blocks.3.")) for k in changed)
    assert any(k.startswith("down_blocks.0.") for k in changed) and any(k.startswith("up_blocks.3.") for k in changed)


def test_nan_ends_the_run_as_failed_not_a_crash(tiny_sd1_teacher):
    s, p = _student(tiny_sd1_teacher, Candidate())
    r = distill(s, tiny_sd1_teacher, p, _data(n=1, nan=True), _sched(), DistillConfig(steps=3, batch_size=2))
    assert r.status == "failed" and "nan" in r.reason.lower() and r.steps_done == 0


def test_divergence_is_detected(tiny_sd1_teacher):
    s, p = _student(tiny_sd1_teacher, candidate_preset("bk-sdm-small", describe(TINY_SD1)))
    r = distill(s, tiny_sd1_teacher, p, _data(), _sched(),
                DistillConfig(steps=60, batch_size=2, lr=5.0, grad_clip=0, divergence_factor=2.0, divergence_patience=3))
    assert r.status == "failed" and ("diverged" in r.reason or "nan" in r.reason.lower() or "inf" in r.reason)


@pytest.mark.slow
def test_checkpoint_resume_continues_exactly(tiny_sd1_teacher, tmp_path):
    cand = candidate_preset("bk-sdm-base", describe(TINY_SD1))
    cfg = DistillConfig(steps=4, batch_size=2, checkpoint_every=2, seed=3)
    a, p = _student(tiny_sd1_teacher, cand)
    distill(a, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "a")
    b, _ = _student(tiny_sd1_teacher, cand)
    half = DistillConfig(steps=2, batch_size=2, checkpoint_every=2, seed=3)
    distill(b, tiny_sd1_teacher, p, _data(), _sched(), half, checkpoint_dir=tmp_path / "b")
    c, _ = _student(tiny_sd1_teacher, cand)  # a fresh process would start from the inherited weights
    r = distill(c, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert r.status == "ok" and r.steps_done == 4
    for k, v in a.state_dict().items():
        assert torch.allclose(v, c.state_dict()[k], atol=1e-6), k
    assert not list((tmp_path / "b").rglob("*.pt")) and not list((tmp_path / "b").rglob("*.bin"))


@pytest.mark.slow
def test_the_student_at_step_n_of_a_long_run_is_the_n_step_student(tiny_sd1_teacher):
    """What the rank-fidelity experiment relies on: evaluating a long run on the way gives exactly the
    students that shorter runs (proxies) train, even when the evaluation runs the student in between."""
    cand = candidate_preset("bk-sdm-small", describe(TINY_SD1))
    short, p = _student(tiny_sd1_teacher, cand)
    distill(short, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=3, batch_size=2, seed=5))
    seen = {}

    def on_step(n, st):
        st.eval()
        with torch.no_grad():  # an evaluation in between, as the experiment does
            st(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 32), return_dict=False)
        st.train()
        seen[n] = copy.deepcopy(st.state_dict())

    long, _ = _student(tiny_sd1_teacher, cand)
    r = distill(long, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=6, batch_size=2, seed=5), on_step=on_step)
    assert r.status == "ok" and sorted(seen) == [1, 2, 3, 4, 5, 6]
    for k, v in short.state_dict().items():
        assert torch.equal(v, seen[3][k]), k
    assert any(not torch.equal(v, seen[6][k]) for k, v in short.state_dict().items())  # and it went on training


def test_fashion_mnist_data_names_the_valid_splits():
    from hybridsd_nas.distill import fashion_mnist_data
    from hybridsd_nas.core.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: train, test"):
        fashion_mnist_data(None, n=4, split="validation")


def _trainable(st):
    return {k: v.detach().clone() for k, v in st.named_parameters() if v.requires_grad}


@pytest.mark.slow
def test_ema_averages_the_trained_weights_and_the_student_ends_holding_the_average(tiny_sd1_teacher):
    """diffusers' EMAModel over the trainable weights: inside ``averaged_weights`` the student holds
    shadow_n = d_n * shadow_(n-1) + (1 - d_n) * w_n with d_n = min(decay, n / (9 + n)) (d_1 = 0), its own
    weights come back after the block, and the averaging leaves the training itself unchanged."""
    from hybridsd_nas.distill import averaged_weights

    cand = candidate_preset("bk-sdm-small", describe(TINY_SD1))
    plain, p = _student(tiny_sd1_teacher, cand)
    distill(plain, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=5, batch_size=2, seed=2))
    raw, avg = {}, {}

    def on_step(n, st):
        raw[n] = _trainable(st)
        with averaged_weights(st):
            avg[n] = _trainable(st)
        for k, v in _trainable(st).items():  # its own weights are back
            assert torch.equal(v, raw[n][k]), k

    st, _ = _student(tiny_sd1_teacher, cand)
    r = distill(st, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=5, batch_size=2, seed=2, ema_decay=0.3),
                on_step=on_step)
    assert r.status == "ok" and r.ema["steps"] == 5 and r.ema["held_by_student"] and r.ema["last_decay"] == pytest.approx(0.3)
    shadow = raw[1]
    for n in range(2, 6):
        d = min(0.3, n / (9 + n))
        shadow = {k: d * shadow[k] + (1 - d) * raw[n][k] for k in shadow}
        for k, v in shadow.items():
            assert torch.allclose(avg[n][k], v, atol=1e-6), (n, k)
    for k, v in _trainable(st).items():
        assert torch.equal(v, avg[5][k]), k  # the student comes back averaged
    plain_w = _trainable(plain)
    for k, v in raw[5].items():
        assert torch.equal(v, plain_w[k]), k  # and training followed the same path as without the average
    assert any(not torch.allclose(raw[5][k], avg[5][k]) for k in raw[5])


@pytest.mark.slow
def test_ema_resumes_exactly_and_a_checkpoint_without_it_is_named(tiny_sd1_teacher, tmp_path):
    from hybridsd_nas.distill import averaged_weights
    from hybridsd_nas.core.errors import ConfigError

    cand = candidate_preset("bk-sdm-small", describe(TINY_SD1))
    cfg = DistillConfig(steps=4, batch_size=2, checkpoint_every=2, seed=3, ema_decay=0.5)
    a, p = _student(tiny_sd1_teacher, cand)
    distill(a, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "a")
    b, _ = _student(tiny_sd1_teacher, cand)
    distill(b, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=2, batch_size=2, checkpoint_every=2, seed=3, ema_decay=0.5),
            checkpoint_dir=tmp_path / "b")
    c, _ = _student(tiny_sd1_teacher, cand)
    r = distill(c, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert r.status == "ok" and r.ema["steps"] == 4
    for k, v in a.state_dict().items():
        assert torch.allclose(v, c.state_dict()[k], atol=1e-6), k
    d, _ = _student(tiny_sd1_teacher, cand)
    distill(d, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=2, batch_size=2, checkpoint_every=2, seed=3),
            checkpoint_dir=tmp_path / "plain")
    before = (tiny_sd1_teacher.training, [q.requires_grad for q in tiny_sd1_teacher.parameters()])
    tiny_sd1_teacher.train().requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match=r"resume changes ema_decay \(checkpoint 0.0, now 0.5\)"):
            distill(d, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "plain", resume=True)
        # the refused resume hands the teacher back as it came
        assert tiny_sd1_teacher.training and all(q.requires_grad for q in tiny_sd1_teacher.parameters())
    finally:
        tiny_sd1_teacher.train(before[0])
        for q, flag in zip(tiny_sd1_teacher.parameters(), before[1]):
            q.requires_grad_(flag)
    with pytest.raises(ConfigError, match=r"ema_decay 1.5 is not a decay.*\(0, 1\)"):
        distill(d, tiny_sd1_teacher, p, _data(), _sched(), DistillConfig(steps=1, batch_size=2, ema_decay=1.5))
    with pytest.raises(ValueError, match="no moving average"):
        with averaged_weights(d):
            pass


@pytest.mark.slow
def test_cosine_schedule_decays_the_rate_to_zero_and_resumes_exactly(tiny_sd1_teacher, tmp_path):
    """diffusers' cosine schedule over the run: the curve records each step's rate (from lr at step 0
    towards 0 at the last step); a run resumed from a checkpoint takes the same rates and ends with
    the same weights; the constant default keeps lr throughout; an unknown schedule is named."""
    import math

    from hybridsd_nas.core.errors import ConfigError

    cand = candidate_preset("bk-sdm-small", describe(TINY_SD1))
    cfg = DistillConfig(steps=4, batch_size=2, checkpoint_every=2, seed=3, lr=1e-3, log_every=1, lr_schedule="cosine")
    a, p = _student(tiny_sd1_teacher, cand)
    ra = distill(a, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "a")
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [c["lr"] for c in ra.curve] == pytest.approx(want) and ra.config["lr_schedule"] == "cosine"
    # a crash after the step-2 checkpoint; the resumed run takes the schedule's last two rates
    d, _ = _student(tiny_sd1_teacher, cand)

    def crash(n, st):
        if n == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(d, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "d", on_step=crash)
    e, _ = _student(tiny_sd1_teacher, cand)
    re_ = distill(e, tiny_sd1_teacher, p, _data(), _sched(), cfg, checkpoint_dir=tmp_path / "d", resume=True)
    assert re_.status == "ok" and [c_["lr"] for c_ in re_.curve[-2:]] == pytest.approx(want[2:])
    for k, v in a.state_dict().items():
        assert torch.allclose(v, e.state_dict()[k], atol=1e-6), k
    plain = distill(_student(tiny_sd1_teacher, cand)[0], tiny_sd1_teacher, p, _data(), _sched(),
                    DistillConfig(steps=3, batch_size=2, seed=3, lr=1e-3, log_every=1))
    assert [c_["lr"] for c_ in plain.curve] == [1e-3] * 3
    with pytest.raises(ConfigError, match=r"unknown lr_schedule 'cosin'; valid: constant, .*cosine"):
        DistillConfig(lr_schedule="cosin")
    with pytest.raises(ConfigError, match="lr_warmup_steps -1 is negative"):
        DistillConfig(lr_schedule="cosine", lr_warmup_steps=-1)
