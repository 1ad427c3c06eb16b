"""Latency lookup tables: built once on a device (under a file lock, robust to load, sanity-checked),
read anywhere without the device; the study's message when every candidate breaks one constraint,
and results folders that never take another study's outputs."""

import datetime
import json
import logging
import threading
from pathlib import Path

import diffusers
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from hybridsd_nas.arch import Candidate, candidate_preset, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError, UnreliableMeasurementError
from hybridsd_nas.core.paths import RESULTS_ENV
from hybridsd_nas.cost import MissingUnitsError, build_table, estimate_cost, open_table, unet_inputs
from hybridsd_nas.cost import lut as lut_mod
from hybridsd_nas.cost.latency import LatencyStats, trace_units, unit_modules
from hybridsd_nas.spaces import load_space
from hybridsd_nas.study import Evaluator, claim_results_dir, run_study, study_from_dict, write_outputs
from hybridsd_nas.study import worker as worker_mod

from .conftest import TINY_SDXL

TEACHER = "tiny"  # the embedded teacher: 32 px, 48 unit calls of about a millisecond each on a CPU
COST_ONLY = {"teacher": TEACHER, "space": "layer-removal", "objectives": [{"metric": "macs"}],
             "sampler": {"name": "random", "seed": 0}}


class FakeTimer:
    """Stands in for ``time_fn``: counts calls (thread-safe) and returns fixed figures (a 2 ms minimum,
    a narrow spread); its first ``wide`` calls report a wide spread (3 ms minimum, p90/p10 = 3)."""

    def __init__(self, wide: int = 0, sleep: float = 0.0):
        self.calls, self.wide, self.sleep = 0, wide, sleep
        self.lock = threading.Lock()

    def __call__(self, fn, device, warmup=3, repeats=10, dtype="", inner=1):
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.sleep:
            threading.Event().wait(self.sleep)  # widens the window in which two builders overlap
        if n <= self.wide:
            return LatencyStats(4.0, 3.0, 9.0, repeats, warmup, "cpu-test", dtype, 3.0)
        return LatencyStats(2.1, 2.0, 2.2, repeats, warmup, "cpu-test", dtype, 2.0)


class FakeWhole:
    """Stands in for timing the teacher's whole forward: ``factors[i]`` x the sum of its units at call i."""

    def __init__(self, *factors: float):
        self.factors, self.calls = list(factors), 0

    def __call__(self, table, base):
        f = self.factors[min(self.calls, len(self.factors) - 1)]
        self.calls += 1
        ms = f * 2.0 * len(base.calls)
        return {"ms": ms, "median": ms, "p10": ms, "p90": ms, "spread": 1.0, "remeasured": 0}


def _fake(monkeypatch, timer: FakeTimer, whole: FakeWhole) -> tuple[FakeTimer, FakeWhole]:
    monkeypatch.setattr(lut_mod, "time_fn", timer)
    monkeypatch.setattr(lut_mod.LatencyTable, "_time_whole", lambda table, base: whole(table, base))
    return timer, whole


@pytest.fixture
def fake(monkeypatch):
    """Table timings without a clock: 2 ms a unit, the whole forward 1.3x its units."""
    return _fake(monkeypatch, FakeTimer(), FakeWhole(1.3))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results-root"))


def _keys(candidate, arch=None, memo=None, resolution=32, vae_scale=2):
    """The unit keys of ``candidate`` (default: on the tiny teacher at its 32 px)."""
    arch = arch or describe(TEACHER)
    p = plan(arch, candidate)
    m = build_student(p)
    inputs = unet_inputs(m.config if p.expressible else arch.config, resolution, 1, 77, vae_scale)
    return {c.key for c in trace_units(m, inputs, memo)}


def _relabel(path: Path, **meta) -> Path:
    d = json.loads(path.read_text())
    d["meta"].update(meta)
    path.write_text(json.dumps(d))
    return path


def _one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1, text
    return lines[0]


# -- tracing and covers --------------------------------------------------------------------------
def test_a_memoised_trace_records_the_same_unit_calls_and_leaves_the_model_as_it_was():
    arch = describe(TEACHER)
    memo = {}
    for name in ("bk-sdm-base", "bk-sdm-tiny", "bk-sdm-tiny"):  # the third meets every unit in the memo
        m = build_student(plan(arch, candidate_preset(name, arch)))
        inputs = unet_inputs(m.config, 32, 1, 77, 2)
        plain = [(c.path, c.key, c.desc) for c in trace_units(m, inputs)]
        fast = [(c.path, c.key, c.desc) for c in trace_units(m, inputs, memo)]
        assert fast == plain and len(plain) > 20
        assert not any("forward" in vars(u) for _, u in unit_modules(m))
    assert len(memo) == len({k for _, k, _ in plain} | _keys(candidate_preset("bk-sdm-base", arch)))


@pytest.mark.parametrize("teacher, space, options, new_shapes", [
    # A layer's removal is only valid where the skips still meet, so the kept layers see the teacher's
    # shapes; a shallower transformer (depth) is a new unit. SDXL-style: transformer depths 1, 2, 3.
    (TINY_SDXL, "layer-removal", {"mid": ["keep"], "innermost_stage": ["keep"], "patterns": "bk", "depth": ["full", 1]}, True),
    (TEACHER, "recombination", {}, False),
    # pruning narrows a unit's inside (ResNet width, feed-forward width): a new unit per ratio
    (TEACHER, "channel-pruning", {"start": "bk-sdm-tiny", "ratios": [0.5, 1.0], "targets": ["resnet", "ff"]}, True),
])
def test_a_space_unit_cover_holds_every_unit_shape_of_its_candidates(tmp_path, teacher, space, options, new_shapes):
    """One point per choice index of the stages (not the product over stages) still covers every candidate."""
    arch = describe(teacher)
    res, vs = (32, 2) if teacher == TEACHER else (128, 8)
    f = tmp_path / f"{space}.yaml"
    f.write_text(yaml.safe_dump({"name": f"t-{space}", "version": 1, "kind": space, "options": options}))
    sp = load_space(f)
    cover = sp.unit_cover(arch)
    every = list({pt.candidate.key: pt.candidate for pt in sp.enumerate(arch)}.values())
    assert len(cover) < len(every)
    memo = {}
    covered = set().union(*(_keys(c, arch, memo, res, vs) for c in cover))
    needed = set().union(*(_keys(c, arch, memo, res, vs) for c in every[:: max(1, len(every) // 8)]))
    assert needed <= covered
    assert bool(needed - _keys(Candidate(), arch, memo, res, vs)) == new_shapes


@pytest.mark.slow
@pytest.mark.parametrize("space", ["layer-removal", "channel-pruning"])
def test_a_shipped_space_unit_cover_holds_its_sampled_candidates(space):
    arch = describe(TEACHER)
    sp = load_space(space)
    memo = {}
    covered = set().union(*(_keys(c, arch, memo) for c in sp.unit_cover(arch)))
    for pt in sp.sample(arch, 12, seed=5):
        assert _keys(pt.candidate, arch, memo) <= covered, pt.candidate.label


def test_a_continuous_space_cannot_be_covered_in_one_line(tmp_path):
    f = tmp_path / "cont.yaml"
    f.write_text(yaml.safe_dump({"name": "cont", "version": 1, "kind": "channel-pruning", "options": {"ratio_range": [0.3, 1.0]}}))
    with pytest.raises(ConfigError, match=r"^space 'cont' has continuous dimensions \(.*\): no table can hold"):
        load_space(f).unit_cover(describe(TEACHER))


# -- building -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_build_records_what_it_was_measured_on(tmp_path, monkeypatch):
    """Timed for real on this CPU (units and figures are not checked: the machine is shared)."""
    monkeypatch.setattr(lut_mod, "SANITY_RATIO", float("inf"))  # a shared CPU's load is not this test's subject
    out = tmp_path / "cpu.json"
    table, summary = build_table(TEACHER, ["bk-sdm-tiny"], out=out, warmup=1, repeats=3)
    data = json.loads(out.read_text())  # JSON, nothing pickled
    m = data["meta"]
    assert m["device"] == lut_mod.device_label(torch.device("cpu")) and m["device_type"] == "cpu"
    assert (m["torch"], m["diffusers"]) == (torch.__version__, diffusers.__version__)
    assert (m["dtype"], m["resolution"], m["batch"], m["timing"], m["statistic"], m["repeats"]) == ("float32", 32, 1, "eager", "min", 3)
    assert datetime.datetime.fromisoformat(m["built"]).tzinfo is not None and len(m["build_id"]) == 32
    assert summary["timed"] == len(data["units"]) == len(_keys(Candidate()) | _keys(candidate_preset("bk-sdm-tiny", describe(TEACHER))))
    for u in data["units"].values():
        assert u["ms"] > 0 and u["p10"] <= u["p90"] and u["desc"]
    (over,) = data["overhead"].values()
    assert over["measured_ms"] > 0 and over["units_ms"] > 0 and over["ms"] == pytest.approx(over["measured_ms"] - over["units_ms"])
    r = estimate_cost(TEACHER, "bk-sdm-tiny", latency="lut", lut=out)
    assert r.latency["build_id"] == m["build_id"] and r.latency["statistic"] == "min"


def test_build_json_fields_and_a_second_build_times_nothing(tmp_path, fake):
    timer, whole = fake
    out = tmp_path / "t.json"
    table, first = build_table(TEACHER, ["bk-sdm-tiny"], out=out, covers=["mine"])
    m = json.loads(out.read_text())["meta"]
    assert {"device", "torch", "diffusers", "dtype", "resolution", "batch", "timing", "statistic", "repeats", "built",
            "build_id"} <= set(m)
    assert first["timed"] == timer.calls == len(table.units) and whole.calls == 1
    again, second = build_table(TEACHER, ["bk-sdm-tiny"], out=out, covers=["mine"])
    assert second["timed"] == 0 and second["candidates"] == 0 and timer.calls == first["timed"]  # not even traced
    assert again.meta["build_id"] == m["build_id"]


def test_two_builders_at_once_time_every_unit_once(tmp_path, monkeypatch):
    timer, whole = FakeTimer(sleep=0.01), FakeWhole(1.3)
    _fake(monkeypatch, timer, whole)
    out = tmp_path / "shared.json"
    results, errors = [], []
    start = threading.Barrier(2)

    def worker():
        try:
            start.wait()
            results.append(build_table(TEACHER, ["bk-sdm-tiny"], out=out)[1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    timed = sorted(r["timed"] for r in results)
    n = len(json.loads(out.read_text())["units"])
    assert timed == [0, n] and timer.calls == n and whole.calls == 1
    assert results[0]["build_id"] == results[1]["build_id"] == json.loads(out.read_text())["meta"]["build_id"]


def test_a_wide_spread_is_measured_again_and_the_minimum_kept(tmp_path, monkeypatch):
    _fake(monkeypatch, FakeTimer(wide=1), FakeWhole(1.3))
    table, _ = build_table(TEACHER, out=tmp_path / "w.json")
    again = [u for u in table.units.values() if u["remeasured"]]
    assert len(again) == 1 and again[0]["remeasured"] == 1 and again[0]["ms"] == 2.0 and again[0]["spread"] == 1.1
    assert all(u["remeasured"] == 0 and u["ms"] == 2.0 for u in table.units.values() if u is not again[0])


def test_re_measurement_is_bounded(tmp_path, monkeypatch):
    timer = FakeTimer(wide=10**6)  # always wide
    _fake(monkeypatch, timer, FakeWhole(1.3))
    table, summary = build_table(TEACHER, out=tmp_path / "w.json")
    assert timer.calls == summary["timed"] * (1 + lut_mod.MAX_REMEASURE)
    assert {u["remeasured"] for u in table.units.values()} == {lut_mod.MAX_REMEASURE}


def test_units_against_the_whole_forward_rebuild_once_then_stop_in_one_line(tmp_path, monkeypatch, capsys):
    timer, whole = FakeTimer(), FakeWhole(8.6)  # the whole forward timed under other load, twice
    _fake(monkeypatch, timer, whole)
    out = tmp_path / "bad.json"
    with pytest.raises(UnreliableMeasurementError) as e:
        build_table(TEACHER, out=out)
    msg = _one_line(str(e.value))
    n = len(_keys(Candidate()))
    assert whole.calls == 2 and timer.calls == 2 * n and not out.exists()
    assert "is unreliable: the teacher's 48 units sum to 96 ms but its whole forward measured 826 ms (8.6x apart, more than 2x" in msg
    assert main(["lut", "build", "--teacher", TEACHER, "--out", str(out), "--json"]) == 1  # --json: no progress bars
    assert "unreliable" in _one_line(capsys.readouterr().err)


def test_a_disagreement_once_is_rebuilt_and_kept(tmp_path, monkeypatch):
    whole = FakeWhole(8.6, 1.2)
    _fake(monkeypatch, FakeTimer(), whole)
    table, summary = build_table(TEACHER, out=tmp_path / "ok.json")
    assert whole.calls == 2 and summary["sanity"]["rebuilt"] == 1 and summary["sanity"]["ratio"] == pytest.approx(1.2)


# -- reading a table built elsewhere --------------------------------------------------------------
@pytest.fixture
def cuda_table(tmp_path, fake):
    """A table as an H100 would have written it (built here on the CPU, then relabelled)."""
    out = tmp_path / "h100.json"
    build_table(TEACHER, ["bk-sdm-tiny"], out=out)
    return _relabel(out, device="NVIDIA-H100-80GB-HBM3", device_type="cuda", dtype="float16")


def test_a_cuda_table_predicts_on_a_machine_without_cuda(cuda_table, monkeypatch, capsys):
    def no_cuda(*a, **k):
        raise AssertionError("CUDA touched")

    for name in ("is_available", "synchronize", "get_device_name", "device_count"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    r = estimate_cost(TEACHER, "bk-sdm-tiny", latency="lut", lut=cuda_table, device="cuda")
    assert r.latency_ms > 0 and (r.latency["device"], r.latency["dtype"]) == ("NVIDIA-H100-80GB-HBM3", "float16")
    assert main(["cost", "--teacher", TEACHER, "--candidate", "bk-sdm-tiny", "--latency", "lut", "--table", str(cuda_table),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_ms"] == pytest.approx(r.latency_ms) and out["latency"]["device"] == "NVIDIA-H100-80GB-HBM3"
    cfg = study_from_dict({"name": "s", **COST_ONLY, "latency": {"mode": "lut", "table": str(cuda_table), "device": "cuda"}}, "<t>")
    assert Evaluator(cfg).cost(candidate_preset("bk-sdm-tiny", describe(TEACHER))).latency_ms == pytest.approx(r.latency_ms)


def test_a_version_mismatch_is_one_warning_line(tmp_path, fake, caplog):
    out = tmp_path / "old.json"
    build_table(TEACHER, out=out)
    _relabel(out, torch="1.13.1", diffusers="0.20.0")
    with caplog.at_level(logging.WARNING, logger="hybridsd_nas.cost.lut"):
        open_table(out)
        open_table(out)
    (rec,) = caplog.records
    msg = _one_line(rec.getMessage())
    assert "torch 1.13.1 and diffusers 0.20.0" in msg and f"torch {torch.__version__}" in msg


@pytest.fixture
def teacher_only(tmp_path, fake):
    """A table of the teacher's units alone: a pruned feed-forward is not there."""
    out = tmp_path / "teacher-only.json"
    build_table(TEACHER, out=out)
    return out


def test_missing_units_are_one_line_naming_them_and_the_fix(teacher_only):
    cand = Candidate(prune={"stage1": {"ff": 0.5}})
    lacking = _keys(cand) - set(json.loads(teacher_only.read_text())["units"])
    assert lacking
    with pytest.raises(MissingUnitsError) as e:
        estimate_cost(TEACHER, cand, latency="lut", lut=teacher_only)
    msg = _one_line(str(e.value))
    assert f"lacks {len(lacking)} unit shape(s) this candidate needs: " in msg and e.value.keys[0] in msg
    assert set(e.value.keys) == lacking and "hybridsd-nas lut build --teacher tiny --space SPACE" in msg


def test_a_study_names_its_space_in_the_missing_units_line(teacher_only):
    cfg = study_from_dict({"name": "s", **COST_ONLY, "space": "channel-pruning", "latency": {"mode": "lut", "table": str(teacher_only)}},
                          "<t>")
    with pytest.raises(ConfigError, match=r"^<t>: latency.table: .* lacks .* --space channel-pruning "):
        Evaluator(cfg).cost(Candidate(prune={"stage1": {"ff": 0.5}}))


@pytest.mark.parametrize("args, needle", [
    (["--resolution", "64"], "is for NVIDIA-H100-80GB-HBM3, float16, 32 px, batch 1, not resolution 64"),
    (["--dtype", "float32"], "not dtype float32"),
    (["--batch-size", "2"], "not batch 2"),
])
def test_cli_table_for_other_settings_exits_2_before_any_model(cuda_table, monkeypatch, capsys, args, needle):
    monkeypatch.setattr("hybridsd_nas.cli.cost.estimate_cost", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["cost", "--teacher", TEACHER, "--latency", "lut", "--table", str(cuda_table), *args]) == 2
    assert needle in _one_line(capsys.readouterr().err)


def test_cli_missing_table_or_table_without_lut_exits_2(tmp_path, cuda_table, capsys):
    assert main(["cost", "--teacher", TEACHER, "--latency", "lut", "--table", str(tmp_path / "none.json")]) == 2
    assert "no latency table at" in _one_line(capsys.readouterr().err)
    assert main(["cost", "--teacher", TEACHER, "--table", str(cuda_table)]) == 2
    assert "--table is the table of --latency lut" in _one_line(capsys.readouterr().err)


def test_a_study_with_a_table_for_another_dtype_exits_2_before_any_trial(tmp_path, cuda_table, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", **COST_ONLY, "objectives": [{"metric": "latency_ms"}],
                                 "latency": {"mode": "lut", "table": str(cuda_table), "dtype": "float32"}}))
    assert main(["search", str(f), "--no-outputs", "--quiet"]) == 2
    assert "latency.table: latency table" in _one_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA would build the table")
def test_a_study_whose_table_must_be_built_on_an_absent_device_is_one_line(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", **COST_ONLY, "objectives": [{"metric": "latency_ms"}],
                                 "latency": {"mode": "lut", "device": "cuda", "table": str(tmp_path / "h100.json")}}))
    assert main(["search", str(f), "--no-outputs", "--quiet"]) == 2
    msg = _one_line(capsys.readouterr().err)
    assert f"latency.device: latency.table {tmp_path / 'h100.json'} does not exist, and building it needs the device" in msg


def test_lut_build_cli_writes_the_presets_and_a_space_given_by_path(tmp_path, fake, capsys):
    space = tmp_path / "small.yaml"
    space.write_text(yaml.safe_dump({"name": "small", "version": 1, "kind": "layer-removal",
                                     "options": {"mid": ["keep"], "innermost_stage": ["keep"], "patterns": "bk"}}))
    out = tmp_path / "cli.json"
    assert main(["lut", "build", "--teacher", TEACHER, "--space", str(space), "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["timed"] == s["units"] > 0 and s["meta"]["covers"][next(iter(s["meta"]["covers"]))] == ["presets", "small@1"]
    assert main(["lut", "build", "--teacher", TEACHER, "--space", str(space), "--out", str(out)]) == 0
    assert "nothing to time" in capsys.readouterr().out
    assert main(["lut", "build", "--teacher", TEACHER, "--space", "nope", "--out", str(out)]) == 2
    assert "unknown search space 'nope'" in _one_line(capsys.readouterr().err)


# -- studies ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_candidate_rejected_by_one_constraint_names_it_and_the_closest_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(worker_mod, "CHEAP_STREAK", 4)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "tight", **COST_ONLY, "trials": 3,
                                 "constraints": [{"metric": "params", "max": 1e9}, {"metric": "macs", "max": 0.01, "of": "teacher"}]}))
    assert main(["search", str(f), "--no-outputs", "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    rb = res["rejected_by"]
    assert res["stopped"] == "exhausted" and (rb["metric"], rb["rejected"], rb["trials"]) == ("macs", 4, 4)
    assert rb["given"] == "macs <= 0.01 x the teacher's"
    msg = _one_line(err)
    assert f"every rejection (4) by one constraint: {rb['constraint']} (macs <= 0.01 x the teacher's); the closest came to macs = " in msg
    assert f"macs = {rb['closest']:.6g}" in msg


def test_the_rejection_cause_is_one_constraint_or_none():
    cfg = study_from_dict({"name": "c", **COST_ONLY, "constraints": [{"metric": "params", "max": 10.0},
                                                                     {"metric": "macs", "max": 100.0}]}, "<t>")

    class Ev:  # the evaluator's part rejection_cause reads: the cost constraints made absolute
        def constraints(self, group):
            return list(cfg.constraints) if group == "cost" else []

    def trial(status, **figures):
        return optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"status": status, **figures})

    by_macs = [trial("rejected", params=5, macs=130.0), trial("duplicate", params=1, macs=1.0), trial("rejected", params=5, macs=104.0)]
    rb = worker_mod.rejection_cause(by_macs, cfg, Ev())
    assert (rb["metric"], rb["constraint"], rb["closest"], rb["rejected"], rb["trials"]) == ("macs", "macs <= 100", 104.0, 2, 3)
    assert worker_mod.rejection_cause(by_macs + [trial("rejected", params=50, macs=1.0)], cfg, Ev()) is None  # two constraints
    assert worker_mod.rejection_cause(by_macs + [trial("rejected", reason="invalid candidate")], cfg, Ev()) is None
    assert worker_mod.rejection_cause([trial("duplicate", params=1, macs=1.0)], cfg, Ev()) is None


# -- results folders --------------------------------------------------------------------------------
def test_a_results_folder_refuses_another_storage_or_study(tmp_path, capsys):
    out = tmp_path / "shared"
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    claim_results_dir("s", a, out)
    claim_results_dir("s", a, out)  # the same study again: fine
    assert json.loads((out / "study-owner.json").read_text()) == {"study": "s", "storage": f"sqlite:///{(tmp_path / 'a.db').resolve().as_posix()}"}
    with pytest.raises(ConfigError) as e:
        claim_results_dir("s", b, out)
    msg = _one_line(str(e.value))
    assert msg.startswith(f"results folder {out} holds the outputs of study 's' in sqlite:///") and "b.db will not write there" in msg
    with pytest.raises(ConfigError, match="of study 's' in .*; study 'other' in"):
        claim_results_dir("other", a, out)
    cfg = study_from_dict({"name": "s", **COST_ONLY, "trials": 1, "artifacts": str(tmp_path / "art")}, "<t>")
    run_study(cfg, storage=b, progress=False)
    with pytest.raises(ConfigError, match="will not write there"):
        write_outputs("s", b, out)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", **COST_ONLY, "trials": 1, "results_dir": str(out)}))
    assert main(["search", str(f), "--storage", b, "--quiet"]) == 2
    assert "will not write there" in _one_line(capsys.readouterr().err)


def test_a_results_folder_from_before_the_marks_is_judged_by_its_pareto_json(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "pareto.json").write_text(json.dumps({"study": "earlier"}))
    with pytest.raises(ConfigError, match="holds the outputs of study 'earlier'"):
        claim_results_dir("s", "sqlite:///x.db", out)
    claim_results_dir("earlier", "sqlite:///x.db", out)
    assert json.loads((out / "study-owner.json").read_text())["study"] == "earlier"
