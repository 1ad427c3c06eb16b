"""The distillation loop at scale: global batch over processes and accumulation steps, mixed
precision, gradient checkpointing, checkpoints (keep K, identity, SIGKILL), trackers, and the CLI's
one-line refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker

from hybridsd_nas.arch import candidate_preset, describe
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.distill import DistillConfig, LossWeights, attach_taps, checkpoints, distill, micro_batch

from .conftest import TINY_SD1
from .test_distill import _data, _sched, _student

ROOT = Path(__file__).resolve().parents[1]


def _run(teacher, cfg, **kw):
    s, p = _student(teacher, candidate_preset("bk-sdm-small", describe(TINY_SD1)))
    return s, distill(s, teacher, p, _data(), _sched(), cfg, **kw)


def test_accumulation_takes_the_same_step_as_the_whole_global_batch(tiny_sd1_teacher):
    """A global batch of 4 as one micro-batch or as 2 x 2: the same draws, the same mean gradient, so
    the same loss curve and weights up to float rounding (Adam's normalised update can turn a rounding
    difference in a near-zero gradient into up to ~1% of the step's 1.5e-3 movement: atol 1e-4)."""
    a, ra = _run(tiny_sd1_teacher, DistillConfig(steps=3, batch_size=4, seed=2, log_every=1))
    b, rb = _run(tiny_sd1_teacher, DistillConfig(steps=3, batch_size=4, seed=2, log_every=1, gradient_accumulation=2))
    assert rb.throughput["micro_batch"] == 2 and ra.throughput["micro_batch"] == 4
    for x, y in zip(ra.curve, rb.curve):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["feat_kd"] == pytest.approx(x["feat_kd"], rel=1e-5)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-4), k


@pytest.mark.slow
def test_gradient_checkpointing_changes_memory_not_the_step(tiny_sd1_teacher):
    a, ra = _run(tiny_sd1_teacher, DistillConfig(steps=2, batch_size=2, seed=4, log_every=1))
    b, rb = _run(tiny_sd1_teacher, DistillConfig(steps=2, batch_size=2, seed=4, log_every=1, gradient_checkpointing=True))
    assert rb.status == "ok" and not b.is_gradient_checkpointing  # handed back as it came
    assert [c["loss"] for c in rb.curve] == pytest.approx([c["loss"] for c in ra.curve], rel=1e-5)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k


@pytest.mark.slow
def test_bf16_autocast_with_a_half_precision_teacher_trains_float32_weights(tiny_sd1_teacher):
    import copy

    half = copy.deepcopy(tiny_sd1_teacher).to(torch.bfloat16)
    s, r = _run(half, DistillConfig(steps=2, batch_size=2, seed=1, log_every=1, mixed_precision="bf16"))
    _, plain = _run(tiny_sd1_teacher, DistillConfig(steps=2, batch_size=2, seed=1, log_every=1))
    assert r.status == "ok" and r.throughput["mixed_precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in s.parameters())
    # the same draws in bf16: close to the float32 losses, not equal
    assert r.curve[0]["loss"] == pytest.approx(plain.curve[0]["loss"], rel=0.05) and r.curve[0]["loss"] != plain.curve[0]["loss"]


def test_hooks_are_placed_only_where_a_loss_reads_them(tiny_sd1_teacher):
    s, p = _student(tiny_sd1_teacher, candidate_preset("bk-sdm-base", describe(TINY_SD1)))
    assert len(attach_taps(s, tiny_sd1_teacher, p, kinds=set()).handles) == 0
    taps = attach_taps(s, tiny_sd1_teacher, p, kinds={"mid"})
    assert len(taps.handles) == 2  # the student's and the teacher's mid block
    x = (torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 7, 32))
    with torch.no_grad():
        s(*x)
        assert not taps.student_out  # outside recording() a forward keeps nothing
        with taps.recording():
            s(*x)
    assert list(taps.student_out) == ["mid_block"]
    taps.remove()


def test_settings_a_layout_cannot_run_are_named():
    with pytest.raises(ConfigError, match=r"global batch 6 is not divisible by 4 gradient accumulation steps"):
        DistillConfig(batch_size=6, gradient_accumulation=4)
    with pytest.raises(ConfigError, match=r"global batch 8 is not divisible by 3 processes x 2 .* use a multiple of 6"):
        micro_batch(DistillConfig(batch_size=8, gradient_accumulation=2), 3)
    with pytest.raises(ConfigError, match="unknown mixed precision 'fp8'; valid: no, bf16, fp16"):
        DistillConfig(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        DistillConfig(optimizer="sgd")


def test_fp16_on_a_cpu_and_8bit_adam_without_bitsandbytes_are_refused(tiny_sd1_teacher):
    with pytest.raises(ConfigError, match="mixed precision fp16 needs a CUDA GPU .* on cpu use bf16 or no"):
        _run(tiny_sd1_teacher, DistillConfig(steps=1, batch_size=2, mixed_precision="fp16"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="optimizer adamw8bit needs bitsandbytes"):
            _run(tiny_sd1_teacher, DistillConfig(steps=1, batch_size=2, optimizer="adamw8bit"))


@pytest.mark.slow
def test_checkpoints_keep_the_newest_k_and_refuse_another_run(tiny_sd1_teacher, tmp_path):
    cfg = DistillConfig(steps=6, batch_size=2, checkpoint_every=2, keep_checkpoints=2, seed=3)
    _, r = _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path, identity={"candidate": "x", "teacher": "t1"})
    assert [c.name for c in checkpoints(tmp_path)] == ["step-0000004", "step-0000006"]
    assert r.checkpoint.endswith("step-0000006") and not list(tmp_path.rglob("*.pt"))
    before = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()}
    with pytest.raises(ConfigError, match=r"checkpoint .*step-0000006 is of teacher 't1', not 't2': it belongs to another run"):
        _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path, resume=True, identity={"candidate": "x", "teacher": "t2"})
    with pytest.raises(ConfigError, match=r"resume changes lr \(checkpoint 0.0005, now 0.001\)"):
        _run(tiny_sd1_teacher, DistillConfig(steps=8, batch_size=2, checkpoint_every=2, seed=3, lr=1e-3), checkpoint_dir=tmp_path,
             resume=True, identity={"candidate": "x", "teacher": "t1"})
    with pytest.raises(ConfigError, match=r"already holds checkpoints up to step-0000006; resume the run"):
        _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path, identity={"candidate": "x", "teacher": "t1"})
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()} == before  # nothing overwritten
    # a longer run, more processes' worth of accumulation: allowed, and it goes on from step 6
    _, r2 = _run(tiny_sd1_teacher, DistillConfig(steps=8, batch_size=2, checkpoint_every=2, seed=3, gradient_accumulation=2),
                 checkpoint_dir=tmp_path, resume=True, identity={"candidate": "x", "teacher": "t1"})
    assert r2.status == "ok" and r2.throughput["steps"] == 2 and checkpoints(tmp_path)[-1].name == "step-0000008"


class _Recorder(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.rows, self.config = [], None

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))


@pytest.mark.slow
def test_trackers_get_each_loss_term_the_rate_throughput_memory_and_validation(tiny_sd1_teacher):
    rec = _Recorder()
    seen = []

    def validate(step, student):
        assert not student.training
        seen.append(step)
        return {"fid_teacher": 1.5 * step, "grid": "x.png"}

    _, r = _run(tiny_sd1_teacher, DistillConfig(steps=4, batch_size=2, log_every=2, validate_every=2,
                                                weights=LossWeights(mid=1.0)), log_with=[rec], validate=validate)
    assert rec.config["weights.mid"] == 1.0 and rec.config["batch_size"] == 2
    train_rows = [v for _, v in rec.rows if "loss" in v]
    assert [s for s, v in rec.rows if "loss" in v] == [1, 3, 4]
    for v in train_rows:
        assert {"loss/task", "loss/out_kd", "loss/feat_kd", "lr", "images_per_s", "rss_peak_mib"} <= set(v)
        assert v["images_per_s"] > 0 and v["rss_peak_mib"] > 0
    assert seen == [2, 4] and [x["step"] for x in r.validation] == [2, 4]
    assert [(s, v) for s, v in rec.rows if "validation/fid_teacher" in v] == [(2, {"validation/fid_teacher": 3.0}),
                                                                              (4, {"validation/fid_teacher": 6.0})]


def _worker(out, run_dir, *extra, launch=None, **kw):
    cmd = [*(launch or [sys.executable]), "-m", "tests.distill_worker", str(out), str(run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **kw)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_ends_bit_for_bit_where_an_uninterrupted_one_ends(tmp_path):
    whole = _worker(tmp_path / "whole.json", tmp_path / "whole", "--steps", "6", "--checkpoint-every", "2")
    assert whole.wait(timeout=600) == 0
    victim = _worker(tmp_path / "x.json", tmp_path / "killed", "--steps", "6", "--checkpoint-every", "2", "--sleep", "1.5")
    deadline = time.time() + 600
    while not checkpoints(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    done = checkpoints(tmp_path / "killed")
    assert done and done[-1].name < "step-0000006"
    resumed = _worker(tmp_path / "resumed.json", tmp_path / "killed", "--steps", "6", "--checkpoint-every", "2", "--resume")
    assert resumed.wait(timeout=600) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "resumed.json"))
    assert b["status"] == "ok" and b["throughput"]["steps"] < 6  # it did resume
    assert b["digest"] == a["digest"]  # bit for bit (weights held: the moving average)
    assert b["curve"] == a["curve"]


@pytest.mark.slow
def test_two_cpu_processes_follow_the_one_process_loss_curve_at_the_same_global_batch(tmp_path):
    # accelerate's --cpu launcher starts several processes only through MPI; its torchrun launcher
    # (--multi_gpu) does it on any machine, and a model on the CPU then trains over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    two = _worker(tmp_path / "two.json", tmp_path / "two", "--accumulation", "2", launch=launch,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = two.communicate(timeout=900)
    assert two.returncode == 0, out[-3000:]
    one = _worker(tmp_path / "one.json", tmp_path / "one")
    assert one.wait(timeout=600) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["throughput"]["processes"] == 2 and b["throughput"]["micro_batch"] == 2 and a["throughput"]["micro_batch"] == 8
    assert len(a["curve"]) == len(b["curve"]) == 6
    for x, y in zip(a["curve"], b["curve"]):
        for k in ("loss", "task", "out_kd", "feat_kd"):
            assert y[k] == pytest.approx(x[k], rel=1e-4), (x["step"], k)
    for k, v in a["weights"].items():
        assert b["weights"][k] == pytest.approx(v, abs=1e-4), k


def test_the_cli_refuses_what_it_cannot_run_before_loading_and_overwrites_nothing(tmp_path, monkeypatch, capsys):
    from hybridsd_nas.cli import main
    from hybridsd_nas.distill import final
    from hybridsd_nas.distill.final import data_spec
    from hybridsd_nas.sources import resolve_teacher

    monkeypatch.setattr(final, "student_of", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = tmp_path / "out"
    base = ["distill", "--teacher", "tiny", "--candidate", "bk-sdm-small", "--steps", "4", "--out", str(out)]

    def refused(extra, message):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused(["--mixed-precision", "fp16", "--device", "cpu"], "mixed precision fp16 needs a CUDA GPU (loss scaling); on cpu use bf16 or no")
    refused(["--batch-size", "6", "--gradient-accumulation", "4"], "global batch 6 is not divisible by 4 gradient accumulation steps")
    refused(["--log-with", "tensorbored"], "unknown tracker 'tensorbored' in --log-with; valid: wandb, tensorboard")
    # a run directory holding another candidate's checkpoint, then one with another recipe
    t = resolve_teacher("tiny")
    ident = {"candidate": candidate_preset("bk-sdm-small", describe(t.path)).key, "teacher": t.fingerprint,
             "data": data_spec(None, t).describe()}
    ckpt = tmp_path / "out.work" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    state = ckpt / "state.json"
    state.write_text(json.dumps({"step": 2, "identity": {**ident, "candidate": "other"}, "recipe": {}}))
    refused(["--resume"], "is of candidate 'other', not")
    refused([], "already holds checkpoints up to step-0000002; resume the run (--resume), or start again with --overwrite")
    state.write_text(json.dumps({"step": 2, "identity": ident, "recipe": {"lr": 0.001}}))
    refused(["--resume"], "resume changes lr (checkpoint 0.001, now 0.0005)")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused([], f"{out} already exists; choose another --out or pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine" and json.loads(state.read_text())["recipe"] == {"lr": 0.001}


@pytest.mark.slow
def test_a_proxy_of_n_steps_is_the_first_n_steps_of_a_final_run(tmp_path):
    """The study's proxy and the final training run the same loop on the same draws: the proxy's
    student after 3 steps is the final run's student after 3 steps (same data, seed and recipe)."""
    from safetensors.torch import load_file

    from hybridsd_nas.distill import distill_candidate
    from hybridsd_nas.proxy import ProxySettings, Stage, run_proxy

    s = ProxySettings(distill_steps=3, batch_size=2, data="fashion-mnist?limit=64", seed=1)
    r = run_proxy("tiny", "bk-sdm-small", s, until=Stage.DISTILL)
    assert r.ok
    cfg = DistillConfig(steps=3, batch_size=2, lr=s.lr, seed=1, weights=s.weights, checkpoint_every=0)
    run = distill_candidate("tiny", "bk-sdm-small", tmp_path / "final", cfg, data="fashion-mnist?limit=64", progress=False)
    assert run.ok and run.result.curve[0]["step"] == 0
    final_sd = load_file(str(next(run.out.glob("*.safetensors"))))
    proxy_sd = r.student.state_dict()
    assert set(final_sd) == set(proxy_sd)
    for k, v in proxy_sd.items():
        assert torch.equal(v, final_sd[k]), k
    card = (run.out / "README.md").read_text()
    assert "fashion-mnist" in card.lower() and "Steps: 3 at a global batch of 2 (6 images seen)" in card


@pytest.mark.slow
def test_final_training_validates_on_the_evaluation_set_and_logs_offline(tmp_path, monkeypatch):
    """Validation passes every M steps: a grid of the moving average's samples and FID against the
    teacher's samples on the evaluation set; wandb (offline) writes under OUT.work/logs; the model
    card says what was trained, on what and for how long."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from hybridsd_nas.distill import distill_candidate

    cfg = DistillConfig(steps=4, batch_size=2, seed=0, validate_every=2, checkpoint_every=2, ema_decay=0.5)
    run = distill_candidate("tiny", "bk-sdm-small", tmp_path / "s", cfg, data="fashion-mnist?limit=32", progress=False,
                            validation_samples=8, log_with=["wandb"])
    assert run.ok
    v = run.result.validation
    assert [x["step"] for x in v] == [2, 4] and all(x["samples"] == 8 and x["fid_teacher"] > 0 for x in v)
    assert "adherence" in v[-1] and Path(v[-1]["grid"]).is_file() and Path(v[-1]["grid"]).parent == tmp_path / "s.work" / "validation"
    assert list((tmp_path / "s.work" / "logs").rglob("*.wandb"))
    card = (run.out / "README.md").read_text()
    assert "At step 4, 8 samples" in card and "fid_teacher" in card and "Exported weights: EMA, decay 0.5" in card
    meta = json.loads((run.out / "hybridsd_nas.json").read_text())
    assert meta["distill"]["validation"][-1]["step"] == 4 and meta["distill"]["throughput"]["images_per_s"] > 0


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_whole_path_on_a_tiny_unet(tmp_path):
    """benchmarks/bench_distill_gpu.py is for a GPU machine; --smoke runs the same code (batch probe,
    timed steps, MFU arithmetic) on the tests' tiny U-Net on the CPU, so it cannot rot unseen."""
    r = subprocess.run([sys.executable, "benchmarks/bench_distill_gpu.py", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("\n{\n"):])  # the report follows the probes' lines
    assert out["largest_batch"] == 4 and out["images_per_s"] > 0 and out["tflops_per_image"] > 0 and out["smoke"]


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_consistent_state_that_resumes_exactly(tiny_sd1_teacher, tmp_path):
    cfg = DistillConfig(steps=5, batch_size=2, checkpoint_every=100, seed=6, log_every=1, ema_decay=0.8)
    whole, rw = _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path / "whole")

    def ctrl_c(n, _s):
        if n == 3:  # after step 3's update
            raise KeyboardInterrupt

    _, ri = _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path / "cut", on_step=ctrl_c)
    assert ri.status == "interrupted" and [c.name for c in checkpoints(tmp_path / "cut")] == ["step-0000003"]
    resumed, rr = _run(tiny_sd1_teacher, cfg, checkpoint_dir=tmp_path / "cut", resume=True)
    assert rr.status == "ok" and rr.throughput["steps"] == 2 and rr.curve == rw.curve
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
