"""Calibration of a latency table: whole candidates measured on the device, a correction of the unit
sums fitted to them and stored in the table, applied wherever the table is read, with leave-one-out
errors; too few candidates or a table opened to read are one-line errors."""

import json

import pytest

from hybridsd_nas.arch import Candidate
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.paths import RESULTS_ENV
from hybridsd_nas.cost import LatencyTable, build_table, estimate_cost, open_table
from hybridsd_nas.cost import lut as lut_mod
from hybridsd_nas.cost.calibrate import CalibrationPoint, calibrate, fit, leave_one_out
from hybridsd_nas.cost.latency import LatencyStats
from hybridsd_nas.cost.lut import apply_calibration

TEACHER = "tiny"
CANDIDATES = ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", Candidate(drop_mid=True, name="no-mid"),
              Candidate(drop_units=["down0.0.attn", "up3.0.attn"], name="two-attn")]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results-root"))


class Clock:
    """Timings without a clock: every unit 2 ms; a whole forward ``intercept + slope x`` its units' sum
    (the teacher's too), so that the truth a calibration should find is known."""

    def __init__(self, intercept: float = 7.0, slope: float = 1.25):
        self.intercept, self.slope, self.units, self.wholes = intercept, slope, 0, 0

    def unit(self, fn, device, warmup=3, repeats=10, dtype="", inner=1):
        self.units += 1
        return LatencyStats(2.1, 2.0, 2.2, repeats, warmup, "cpu-test", dtype, 2.0)

    def whole_ms(self, n_units: int) -> float:
        self.wholes += 1
        return self.intercept + self.slope * 2.0 * n_units


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(lut_mod, "time_fn", c.unit)

    def figures(ms):
        return {"ms": ms, "median": ms, "p10": ms, "p90": ms, "spread": 1.0, "remeasured": 0}

    monkeypatch.setattr(lut_mod.LatencyTable, "_time_whole", lambda table, base: figures(c.whole_ms(len(base.calls))))
    monkeypatch.setattr(lut_mod.LatencyTable, "time_forward",
                        lambda table, model, inputs: figures(c.whole_ms(len(lut_mod.trace_units(model, inputs)))))
    return c


def _points(pairs):
    return [CalibrationPoint(f"c{i}", f"k{i}", m, u, n, u) for i, (m, u, n) in enumerate(pairs)]


def test_the_fit_recovers_an_exact_affine_map_and_its_leave_one_out_errors_vanish():
    pts = _points([(3 + 2 * u, u, 10) for u in (1.0, 2.0, 4.0, 5.0, 9.0)])
    cal = fit(pts)
    assert cal["terms"] == ["units_ms"]  # fewer than 8 points: no count term
    assert cal["coef"]["intercept"] == pytest.approx(3) and cal["coef"]["units_ms"] == pytest.approx(2)
    assert max(abs(e) for e in leave_one_out(pts)) < 1e-9
    assert apply_calibration(cal, 10.0, 99) == pytest.approx(23)


def test_eight_points_fit_the_count_term_and_an_outlier_shows_in_the_leave_one_out_errors():
    pairs = [(1 + 0.5 * u + 3 * n, u, n) for u, n in ((10, 2), (20, 3), (15, 5), (40, 4), (30, 8), (50, 6), (25, 7), (35, 9))]
    cal = fit(_points(pairs))
    assert cal["terms"] == ["units_ms", "n_units"] and cal["coef"]["n_units"] == pytest.approx(3)
    assert max(abs(e) for e in leave_one_out(_points(pairs))) < 1e-9
    pairs[3] = (pairs[3][0] * 1.5, *pairs[3][1:])  # one candidate measured 50% slow
    assert abs(leave_one_out(_points(pairs))[3]) > 10


def test_a_calibration_is_stored_in_the_table_and_applied_where_it_is_read(tmp_path, clock):
    out = tmp_path / "t.json"
    table, _ = build_table(TEACHER, CANDIDATES, out=out)
    cal = calibrate(TEACHER, CANDIDATES, table)
    assert cal["candidates"] == 5 and len(cal["points"]) == 5 and clock.wholes == 1 + 5  # the teacher, then each candidate
    assert cal["coef"]["units_ms"] == pytest.approx(1.25) and cal["coef"]["intercept"] == pytest.approx(7.0)
    assert cal["loo"]["max_abs_pct"] < 1e-6 < cal["uncalibrated"]["max_abs_pct"]  # the plain sum misses the slope
    stored = json.loads(out.read_text())["calibration"]
    key = lut_mod.base_key(lut_mod.describe(TEACHER))
    assert list(stored) == [key] and stored[key]["fitted"]
    # read elsewhere, with no device: the calibrated figure, and the plain sum beside it
    r = estimate_cost(TEACHER, "bk-sdm-tiny", latency="lut", lut=out)
    n = r.latency["n_units"]
    assert r.latency_ms == pytest.approx(7.0 + 1.25 * 2.0 * n)
    assert r.latency["uncalibrated_ms"] == pytest.approx(r.latency["units_ms"] + r.latency["overhead_ms"])
    assert r.latency["calibration"]["candidates"] == 5
    # extending the table with another candidate's units keeps the calibration
    build_table(TEACHER, ["asdm-m1"], out=out)
    assert "calibration" in json.loads(out.read_text())


def test_a_table_opened_to_read_cannot_be_calibrated(tmp_path, clock):
    out = tmp_path / "t.json"
    build_table(TEACHER, (), out=out)
    with pytest.raises(ConfigError, match="opened to read"):
        calibrate(TEACHER, CANDIDATES, open_table(out))


def test_cli_calibrate_prints_each_point_and_the_leave_one_out_summary(tmp_path, clock, capsys):
    out = tmp_path / "t.json"
    assert main(["lut", "calibrate", "--teacher", TEACHER, "--table", str(out), "--candidate", "bk-sdm-base",
                 "--candidate", "bk-sdm-small", "--space", "layer-removal", "--count", "4", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "bk-sdm-base" in text and "leave-one-out" in text and "calibrated on" in text
    cal = next(iter(json.loads(out.read_text())["calibration"].values()))
    assert cal["candidates"] >= 5
    assert LatencyTable.open(out).calibration  # and read back as a table


def test_cli_too_few_candidates_exits_2_in_one_line_before_timing(tmp_path, clock, capsys):
    rc = main(["lut", "calibrate", "--teacher", TEACHER, "--table", str(tmp_path / "t.json"),
               "--candidate", "bk-sdm-base", "--candidate", "bk-sdm-tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "at least 5" in err
    assert clock.units == clock.wholes == 0 and not (tmp_path / "t.json").exists()


# -- timing modes ---------------------------------------------------------------------------------
def test_the_timing_mode_is_recorded_and_a_table_timed_otherwise_is_refused_in_one_line(tmp_path, clock):
    out = tmp_path / "t.json"
    table, _ = build_table(TEACHER, (), out=out)
    assert table.timing == "eager" == json.loads(out.read_text())["meta"]["timing"] == open_table(out).timing
    with pytest.raises(ConfigError, match="was timed eager, not compile"):
        LatencyTable("cpu", path=out, resolution=table.resolution, timing="compile")


@pytest.mark.parametrize("argv, needle", [(["--timing", "cuda-graph"], "needs a CUDA device"),
                                          (["--timing", "graphs"], "invalid choice")])
def test_cli_a_timing_mode_this_device_cannot_run_exits_2_before_timing(tmp_path, clock, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:  # argparse's own refusal for an unknown name
        rc = main(["lut", "build", "--teacher", TEACHER, "--out", str(tmp_path / "t.json"), *argv])
        raise SystemExit(rc)
    assert e.value.code == 2 and needle in capsys.readouterr().err and clock.units == 0


@pytest.mark.slow
def test_a_compiled_runner_computes_what_the_eager_call_does():
    import torch

    mod = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        assert torch.allclose(lut_mod.runner(mod, (x,), {}, "compile")(), mod(x), atol=1e-6)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_cuda_graph_runner_replays_what_the_eager_call_computes():
    import torch

    mod = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).cuda().eval()
    x = torch.randn(3, 8, device="cuda")
    with torch.inference_mode():
        replay = lut_mod.runner(mod, (x,), {}, "cuda-graph")
        x.copy_(torch.randn(3, 8, device="cuda"))  # the graph reads its input where it was captured
        out = replay().clone()
        assert torch.allclose(out, mod(x), atol=1e-5)
