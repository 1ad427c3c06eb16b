"""Whole-request metrics: ``pipeline_latency_ms`` (the sum of its parts) and ``peak_memory_mb`` (predicted
against measured on the tiny teacher), as study objectives and constraints, validated in one line."""

import json

import optuna
import pytest
import torch
import yaml

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cli import lut as lut_cli
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.cost import LATENCY_MODES, LatencyStats, base_key, count_macs, estimate_cost
from hybridsd_nas.cost import lut as lut_mod
from hybridsd_nas.cost import request as req_mod
from hybridsd_nas.cost.request import MB, PipelineCost, Request, default_request
from hybridsd_nas.sources import load_pipeline
from hybridsd_nas.study import Evaluator, model_card, run_study, study_from_dict, summarize

ARCH = describe("tiny")
COST_ONLY = {"teacher": "tiny", "space": "layer-removal", "sampler": {"name": "random", "seed": 0}}


def fake_components(te_ms=3.0, dec_ms=7.0):
    def timed(parts, request, device, dtype, warmup=3, repeats=10):
        return {"text_encoder": {"ms": te_ms, "median": te_ms}, "decoder": {"ms": dec_ms, "median": dec_ms}}
    return timed


def test_request_defaults_are_the_teachers_sampling_settings():
    r = default_request("tiny")
    assert (r.steps, r.guidance, r.resolution, r.images) == (25, 4.0, 32, 1)  # the tiny teacher's sampling.json
    assert r.cfg and r.unet_batch == 2 and r.text_calls == 2
    plain = Request(10, 1.0, 64, images=3)
    assert not plain.cfg and plain.unet_batch == 3 and plain.text_calls == 1
    with pytest.raises(Exception, match="steps >= 1"):
        Request(0, 4.0, 32)


@pytest.mark.parametrize("guidance, calls, batch", [(4.0, 2, 2), (1.0, 1, 1)])
def test_pipeline_latency_is_text_encoder_plus_steps_times_forward_plus_decoder(monkeypatch, guidance, calls, batch):
    seen = []

    def fake_cost(unet, candidate, **kw):  # a U-Net forward's time: 10 ms per latent, 5 ms more for the teacher
        seen.append(kw["batch"])
        return type("R", (), {"latency_ms": 10.0 * kw["batch"] + (5.0 if candidate.key == Candidate().key else 0.0)})

    monkeypatch.setattr(req_mod, "estimate_cost", fake_cost)
    monkeypatch.setattr(req_mod, "time_components", fake_components())
    pc = PipelineCost("tiny", Request(6, guidance, 32), latency="measure")
    small = candidate_preset("bk-sdm-small", ARCH)
    f = pc.figures([(6, small)], ["pipeline_latency_ms"])
    forward = 10.0 * batch
    assert seen == [batch]  # one forward at the guidance batch, timed once
    assert f["pipeline_latency_ms"] == pytest.approx(calls * 3.0 + 6 * forward + 7.0)
    lat = f["record"]["latency"]
    assert lat["text_encoder_ms"] == calls * 3.0 and lat["decoder_ms"] == 7.0 and lat["unet_ms"] == 6 * forward
    assert lat["unets"] == [{"candidate_key": small.key, "steps": 6, "ms_per_step": forward, "ms": 6 * forward}]
    # a hybrid schedule: each U-Net for its own steps; a forward already measured is not timed again
    h = pc.figures([(2, Candidate()), (4, small)], ["pipeline_latency_ms"], known={small.key: 1.5})
    assert h["pipeline_latency_ms"] == pytest.approx(calls * 3.0 + 2 * (forward + 5.0) + 4 * 1.5 + 7.0)


def test_text_encoder_and_decoder_are_read_from_a_table_that_holds_them(tmp_path, monkeypatch):
    monkeypatch.setattr(req_mod, "time_components", fake_components())
    pc = PipelineCost("tiny", default_request("tiny"), latency="measure")
    keys = {p: pc.parts.key(p, 1, 32) for p in ("text_encoder", "decoder")}
    table = tmp_path / "t.json"
    meta = {"version": 2, "device": "cpu-test", "dtype": "float32", "resolution": 32, "batch": 2}
    table.write_text(json.dumps({"meta": meta, "units": {}, "overhead": {},
                                 "components": {keys["text_encoder"]: {"ms": 1.25}, keys["decoder"]: {"ms": 4.0}}}))

    def untimed(*a, **k):
        raise AssertionError("timed although the table holds the figures")

    monkeypatch.setattr(req_mod, "time_components", untimed)
    lut = PipelineCost("tiny", default_request("tiny"), latency="lut", table=table)
    small = candidate_preset("bk-sdm-small", ARCH)
    f = lut.figures([(25, small)], ["pipeline_latency_ms"], known={small.key: 2.0})
    assert f["pipeline_latency_ms"] == pytest.approx(2 * 1.25 + 25 * 2.0 + 4.0)
    assert f["record"]["latency"]["components_from"] == f"lookup table {table}"
    # a table built on other hardware without them: not timed here (they would not add up with its U-Net figures)
    table.write_text(json.dumps({"meta": meta, "units": {}, "overhead": {}}))
    bare = PipelineCost("tiny", default_request("tiny"), latency="lut", table=table)
    with pytest.raises(ConfigError, match=r"has no text-encoder and decoder timings for 1 image\(s\) at 32 px, and they cannot "
                                          r"be timed here \(cpu is not cpu-test\); add them there: .* --pipeline$"):
        bare.figures([(25, small)], ["pipeline_latency_ms"], known={small.key: 2.0})
    # a table for one latent per forward cannot time a request with guidance (two)
    meta["batch"] = 1
    table.write_text(json.dumps({"meta": meta, "units": {}, "overhead": {}}))
    with pytest.raises(ConfigError, match=r"is for cpu-test, float32, 32 px, batch 1, not batch 2"):
        PipelineCost("tiny", default_request("tiny"), latency="lut", table=table)


def test_lut_build_pipeline_adds_the_parts_a_request_reads_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))
    # timings without a clock: 2 ms a unit, the whole forward 1.3x its units; text encoder 3 ms, decoder 7 ms
    monkeypatch.setattr(lut_mod, "time_fn", lambda fn, device, warmup=3, repeats=10, dtype="", inner=1:
                        LatencyStats(2.1, 2.0, 2.2, repeats, warmup, "cpu-test", dtype, 2.0))
    monkeypatch.setattr(lut_mod.LatencyTable, "_time_whole", lambda table, base: {"ms": 2.6 * len(base.calls)})
    monkeypatch.setattr(lut_cli, "time_components", fake_components())
    out = tmp_path / "b2.json"
    assert main(["lut", "build", "--teacher", "tiny", "--batch-size", "2", "--pipeline", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"] == {"text_encoder": 3.0, "decoder": 7.0}
    assert len(json.loads(out.read_text())["components"]) == 2

    def untimed(*a, **k):
        raise AssertionError("timed although the table holds the figures")

    monkeypatch.setattr(req_mod, "time_components", untimed)
    monkeypatch.setattr(lut_mod, "time_fn", untimed)
    small = candidate_preset("bk-sdm-small", ARCH)
    unet = estimate_cost("tiny", small, batch=2, latency="lut", lut=str(out)).latency_ms
    f = PipelineCost("tiny", default_request("tiny"), latency="lut", table=out).figures([(25, small)], ["pipeline_latency_ms"])
    assert f["pipeline_latency_ms"] == pytest.approx(2 * 3.0 + 25 * unet + 7.0)
    # a U-Net preset has no text encoder or VAE: one line, before anything is timed
    assert main(["lut", "build", "--teacher", "sd-v1", "--pipeline", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown teacher pipeline" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_predicted_weights_are_the_pipelines_own():
    p = PipelineCost("tiny", default_request("tiny")).predict_memory([Candidate()])
    pipe = load_pipeline("tiny")
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert p["weights_mb"]["text_encoder"] * MB == nbytes(pipe.text_encoder)
    assert p["weights_mb"]["unet"] * MB == nbytes(pipe.unet) == estimate_cost("tiny").params * 4
    decoder = nbytes(pipe.vae.decoder) + nbytes(pipe.vae.post_quant_conv)
    assert p["weights_mb"]["decoder"] * MB == decoder
    # half precision halves the weights; a larger image needs more activations
    half = PipelineCost("tiny", default_request("tiny"), dtype="float16").predict_memory([Candidate()])
    assert half["weights_mb"]["unet"] == p["weights_mb"]["unet"] / 2
    big = PipelineCost("tiny", default_request("tiny", resolution=64)).predict_memory([Candidate()])
    assert big["activation_peak_mb"] > 3 * p["activation_peak_mb"] > 0


def test_live_bytes_counts_a_storage_until_its_last_view_goes():
    live = req_mod.LiveBytes()
    with torch.inference_mode(), live:
        a = torch.empty(1000, 1000, device="meta")  # 4 MB
        b = a + 1
        v = b.view(-1)
        del b
        c = v * 2  # a, b (through v) and c alive: 12 MB
        del a, v
        assert live.live == 4_000_000
        del c
    assert live.peak == 12_000_000 and live.live == 0


def test_peak_memory_prediction_is_within_a_quarter_of_the_measurement_on_the_tiny_teacher():
    pc = PipelineCost("tiny", default_request("tiny"), device="cpu")
    predicted = pc.predict_memory([Candidate()])["peak_memory_mb"]
    measured = pc.measure_memory([Candidate()])["peak_memory_mb"]
    assert predicted > 0 and measured > 0
    assert 0.75 < predicted / measured < 1.25, (predicted, measured)


# -- in a study --------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, needle", [
    ({"pipeline": {"steps": 0}}, "pipeline.steps: must be >= 1, got 0"),
    ({"pipeline": {"guidance": "high"}}, "pipeline.guidance: must be a number, got 'high'"),
    ({"pipeline": {"memory": "guess"}}, "pipeline.memory: 'guess' is not one of predict, measure"),
    ({"pipeline": {"batch": 2}}, "pipeline.batch: unknown key; allowed: steps, guidance, resolution, images, memory, table"),
    ({"pipeline": {"table": 3}}, "pipeline.table: must be a string, got 3"),
    ({"constraints": [{"metric": "peak_memory_mb", "max": -5}]},
     "constraints[0]: peak_memory_mb is a time or a size: max must be > 0 and min >= 0, got max -5"),
    ({"constraints": [{"metric": "pipeline_latency_ms", "max": 800}]},
     "latency.mode: pipeline_latency_ms is an objective or constraint, so latency.mode must be lut or measure"),
    ({"objectives": ["params"], "pipeline": {"steps": 4}}, "pipeline: sets the request of pipeline_latency_ms and peak_memory_mb"),
])
def test_bad_pipeline_settings_are_one_line(patch, needle):
    with pytest.raises(ConfigError) as e:
        study_from_dict({"name": "x", **COST_ONLY, "objectives": ["params", "peak_memory_mb"], **patch}, "s.yaml")
    assert needle in str(e.value) and str(e.value).startswith("s.yaml: ") and "\n" not in str(e.value)


def test_cli_bad_pipeline_value_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_RESULTS", str(tmp_path / "results-root"))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "x", **COST_ONLY, "objectives": ["params", "peak_memory_mb"],
                                 "pipeline": {"resolution": 33}}))
    assert main(["search", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline: " in err[0] and "multiple of the VAE scale factor 2" in err[0]


def test_a_study_table_for_another_batch_than_the_guidance_batch_is_one_line(tmp_path):
    table = tmp_path / "b1.json"
    meta = {"version": 2, "device": "cpu-test", "dtype": "float32", "resolution": 32, "batch": 1}
    table.write_text(json.dumps({"meta": meta, "units": {}, "overhead": {base_key(ARCH): {"ms": 1.0}}}))
    cfg = study_from_dict({"name": "x", **COST_ONLY, "objectives": ["params", "pipeline_latency_ms"],
                           "latency": {"mode": "lut", "table": str(table)}}, "s.yaml")
    with pytest.raises(ConfigError) as e:
        Evaluator(cfg)
    msg = str(e.value)
    assert msg.startswith(f"s.yaml: latency.table: latency table {table} is for cpu-test, float32, 32 px, batch 1, not batch 2")
    assert msg.endswith("pipeline_latency_ms runs the U-Net on 2 latents at 32 px: name a table built for those in pipeline.table")
    assert "\n" not in msg
    # the same table named for a request without guidance (one latent per forward) is fine
    ok = study_from_dict({"name": "x", **COST_ONLY, "objectives": ["params", "pipeline_latency_ms"],
                          "latency": {"mode": "lut", "table": str(table)}, "pipeline": {"guidance": 1.0}}, "s.yaml")
    assert Evaluator(ok).pipeline_cost().request.unet_batch == 1


@pytest.mark.slow  # a whole study; the fast lane keeps the metrics' own checks
def test_a_study_builds_the_guidance_batch_table_and_keeps_the_parts_in_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lut_mod, "time_fn", lambda fn, device, warmup=3, repeats=10, dtype="", inner=1:
                        LatencyStats(2.1, 2.0, 2.2, repeats, warmup, "cpu-test", dtype, 2.0))
    monkeypatch.setattr(lut_mod.LatencyTable, "_time_whole", lambda table, base: {"ms": 2.6 * len(base.calls)})
    monkeypatch.setattr(req_mod, "time_components", fake_components())
    cfg = study_from_dict({"name": "built", **COST_ONLY, "trials": 1, "enqueue": ["bk-sdm-tiny"], "artifacts": str(tmp_path / "a"),
                           "objectives": ["params", "pipeline_latency_ms"], "latency": {"mode": "lut"}}, "<test>")
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(cfg, storage=url, progress=False)
    (t,) = optuna.load_study(study_name="built", storage=url).trials
    b2 = next((tmp_path / "cache" / "lut").glob("*-b2.json"))  # the study's own table is for batch 1
    tiny = candidate_preset("bk-sdm-tiny", ARCH)
    unet = estimate_cost("tiny", tiny, batch=2, latency="lut", lut=str(b2)).latency_ms
    assert t.user_attrs["pipeline_latency_ms"] == pytest.approx(2 * 3.0 + 25 * unet + 7.0)
    assert len(json.loads(b2.read_text())["components"]) == 2  # timed once, kept for the next worker


@pytest.fixture
def fast_latency(monkeypatch):
    """``measure`` as a deterministic stand-in (1 ms per 1e6 MACs), and fixed text encoder and decoder times."""
    real = LATENCY_MODES.get("measure")
    LATENCY_MODES.register("measure", lambda r: {"latency_ms": 1e-6 * count_macs(r.model, r.inputs).macs, "method": "stand-in"},
                           replace=True)
    monkeypatch.setattr(req_mod, "time_components", fake_components())
    yield
    LATENCY_MODES.register("measure", real, replace=True)


@pytest.mark.slow  # a whole study; the fast lane keeps the metrics' own checks
def test_study_objective_and_constraint_with_fractions_of_the_teacher(tmp_path, fast_latency):
    # the teacher's request: 2 x 3 + 5 x 462 + 7 = 2322 ms; bk-sdm-base's 1506 (65%), bk-sdm-tiny's 1420 (61%)
    cfg = study_from_dict({"name": "whole", **COST_ONLY, "trials": 1, "artifacts": str(tmp_path / "art"),
                           "objectives": ["params", "peak_memory_mb"], "latency": {"mode": "measure"},
                           "constraints": [{"metric": "pipeline_latency_ms", "max": 0.62, "of": "teacher"}],
                           "pipeline": {"steps": 5}, "enqueue": ["bk-sdm-base", "bk-sdm-tiny"]}, "<test>")
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(cfg, storage=url, progress=False)
    trials = optuna.load_study(study_name="whole", storage=url).trials
    teacher = 2 * 3.0 + 5 * estimate_cost("tiny", batch=2).macs * 1e-6 + 7.0
    assert [(t.user_attrs["enqueued_as"], t.state) for t in trials] == [
        ("bk-sdm-base", optuna.trial.TrialState.PRUNED), ("bk-sdm-tiny", optuna.trial.TrialState.COMPLETE)]
    for t in trials:
        ua = t.user_attrs
        fwd = estimate_cost("tiny", Candidate.from_dict(ua["candidate"]), batch=2).macs * 1e-6
        assert ua["pipeline_latency_ms"] == pytest.approx(2 * 3.0 + 5 * fwd + 7.0)
        assert ua["pipeline"]["request"] == {"steps": 5, "guidance": 4.0, "resolution": 32, "images": 1, "unet_batch": 2,
                                             "classifier_free_guidance": True}
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert ua["pipeline_latency_ms"] <= 0.62 * teacher and t.values == [ua["params"], ua["peak_memory_mb"]]
            assert ua["peak_memory_mb"] == pytest.approx(ua["pipeline"]["memory"]["activation_peak_mb"]
                                                         + sum(ua["pipeline"]["memory"]["weights_mb"].values()))
        else:  # over the budget: rejected from the cost figures, before any proxy work
            assert ua["status"] == "rejected" and ua["pipeline_latency_ms"] > 0.62 * teacher
            assert ua["reason"] == f"pipeline_latency_ms = {ua['pipeline_latency_ms']:.6g} breaks pipeline_latency_ms <= {0.62 * teacher:g}"
    s = summarize(optuna.load_study(study_name="whole", storage=url))
    card = model_card(s["front"][0], s, {"measured": {"resolution": 32, "batch": 1, "text_tokens": 77}, "params": 1, "macs": 1,
                                         "macs_conv_linear": 1})
    assert "| pipeline_latency_ms |" in card and "| peak_memory_mb |" in card
    assert "whole request (`pipeline_latency_ms`, `peak_memory_mb`): 5 steps at guidance 4, 32 px, 1 image(s)" in card
    assert "latency = text encoder 6 + U-Net steps" in card and "activation peak" in card
