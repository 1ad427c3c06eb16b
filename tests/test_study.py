"""Studies: config validation, cost-first rejection, resume, failures, the CLI, and many workers
on real storages (SQLite and the PostgreSQL server) with SIGKILL and Ctrl-C."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError, UnknownNameError
from hybridsd_nas.core.paths import RESULTS_ENV
from hybridsd_nas.study import (
    SAMPLERS,
    StopReason,
    TrialStatus,
    build_report,
    hypervolume,
    load_study_config,
    make_sampler,
    pareto_front,
    run_study,
    study_from_dict,
    summarize,
)

PG_URL = os.environ.get("HYBRIDSD_NAS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

COST_ONLY = {
    "teacher": "tiny", "space": "layer-removal",
    "objectives": [{"metric": "macs"}, {"metric": "output_mse"}],
    "sampler": {"name": "random", "seed": 0},
    "proxy": {"data_images": 32},
}
# the shortest real proxy: a few distillation steps, a few samples (seconds per trial)
SHORT_PROXY = {"distill_steps": 4, "batch_size": 8, "data_images": 64, "samples": 4, "sampler_steps": 2,
               "reference_images": 20, "kid_subset": 4}


@pytest.fixture(autouse=True)
def _results_root(tmp_path, monkeypatch):
    """Studies that set no storage write under $HYBRIDSD_NAS_RESULTS: a temporary folder here."""
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results-root"))


def _default_results_root(tmp_path, monkeypatch):
    """In ``tmp_path``, with no $HYBRIDSD_NAS_RESULTS: studies write under ./runs/ (the default)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RESULTS_ENV, raising=False)


def _cfg(tmp_path, name, **kw):
    d = {"name": name, **COST_ONLY, "artifacts": str(tmp_path / "artifacts"), **kw}
    return study_from_dict(d, "<test>")


def _sqlite(tmp_path, name="s"):
    return f"sqlite:///{tmp_path / (name + '.db')}"


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, needle", [
    ({"objectives": [{"metric": "fid"}]}, "objectives[0].metric: 'fid' is not a metric; known: params"),
    ({"objectives": [{"metric": "macs", "direction": "down"}]}, "objectives[0].direction: 'down' is not one of minimize, maximize"),
    ({"sampler": {"name": "cmaes"}}, "sampler.name: 'cmaes' is not one of nsga2, tpe, gp, bruteforce, random"),
    ({"constraints": [{"metric": "params"}]}, "constraints[0]: needs max, min or both"),
    ({"constraints": [{"metric": "params", "max": "lots"}]}, "constraints[0].max: must be a number, got 'lots'"),
    ({"objectives": [{"metric": "latency_ms"}]}, "latency.mode: latency_ms is an objective or constraint, so latency.mode must be lut or measure"),
    ({"proxy": {"distill_step": 3}}, "proxy.distill_step: unknown key; allowed: distill_steps"),
    ({"trials": 0}, "trials: must be >= 1, got 0"),
    ({"name": "a b"}, "name: 'a b' must be letters"),
    ({"wandb": "maybe"}, "wandb: 'maybe' is not one of off, offline, online"),
    ({"heartbeat": {"interval": 10, "grace": 5}}, "heartbeat.grace: must exceed heartbeat.interval"),
    ({"prefilter": [{"metric": "proxy_fid", "max": 1}]}, "prefilter: proxy_fid needs the distillation"),
    ({"colour": "red"}, "colour: unknown key; allowed: name, teacher"),
])
def test_config_errors_name_the_key(patch, needle):
    with pytest.raises(ConfigError) as e:
        study_from_dict({"name": "x", **COST_ONLY, **patch}, "study.yaml")
    msg = str(e.value)
    assert needle in msg and msg.startswith("study.yaml: ") and "\n" not in msg


def test_config_reads_yaml_numbers_and_defaults(tmp_path, monkeypatch):
    _default_results_root(tmp_path, monkeypatch)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "y", **COST_ONLY, "constraints": [{"metric": "params", "max": "5.0e6"}], "wandb": False}))
    cfg = load_study_config(p)
    assert cfg.constraints[0].max == 5.0e6 and cfg.wandb == "off"
    assert cfg.storage_url() == "sqlite:///runs/y/study.db"
    assert cfg.results_dir == Path("runs/y") and cfg.artifacts_dir() == Path("runs/y/artifacts")
    assert [o.direction for o in cfg.objectives] == ["minimize", "minimize"]
    assert study_from_dict({"name": "z", **COST_ONLY, "objectives": ["adherence"]}).objectives[0].direction == "maximize"


def test_results_go_under_the_results_root_unless_the_yaml_names_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "elsewhere"))
    cfg = study_from_dict({"name": "r", **COST_ONLY}, "<test>")
    assert cfg.results_dir == tmp_path / "elsewhere" / "r"
    assert cfg.storage_url() == f"sqlite:///{(tmp_path / 'elsewhere' / 'r' / 'study.db').as_posix()}"
    own = study_from_dict({"name": "r", **COST_ONLY, "results_dir": str(tmp_path / "mine")}, "<test>")
    assert own.results_dir == tmp_path / "mine" and own.artifacts_dir() == tmp_path / "mine" / "artifacts"
    assert own.storage_url() == f"sqlite:///{(tmp_path / 'mine' / 'study.db').as_posix()}"
    assert own.storage_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match=r"^<test>: results_dir: must be a string, got 3$"):
        study_from_dict({"name": "r", **COST_ONLY, "results_dir": 3}, "<test>")


def test_status_values_are_the_stored_strings():
    assert [s.value for s in TrialStatus] == ["ok", "infeasible", "rejected", "duplicate", "failed", "interrupted", "surplus"]
    for s in (*TrialStatus, *StopReason):
        assert s == s.value and str(s) == f"{s}" == s.value and json.dumps(s) == json.dumps(s.value)


class _CountingSampler(optuna.samplers.RandomSampler):
    def __init__(self, seed):
        super().__init__(seed=seed)
        self.calls = 0

    def sample_independent(self, *a, **kw):
        self.calls += 1
        return super().sample_independent(*a, **kw)


@pytest.fixture
def counting_sampler():
    made = []

    def factory(cfg):
        made.append(_CountingSampler(cfg.seed))
        return made[-1]

    SAMPLERS.register("test-counting", factory, help="random, counting its draws (a test's own sampler)")
    yield made
    SAMPLERS.unregister("test-counting")


def test_a_registered_sampler_is_accepted_and_used(tmp_path, counting_sampler):
    cfg = _cfg(tmp_path, "own-sampler", objectives=["params", "macs"], sampler={"name": "test-counting", "seed": 5}, trials=3)
    assert cfg.sampler == "test-counting" and isinstance(make_sampler(cfg), _CountingSampler)
    res = run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    assert res["evaluated"] == 3 and res["stopped"] == "trials"
    assert counting_sampler and sum(s.calls for s in counting_sampler) >= len(res["trials_run"])
    study = optuna.load_study(study_name="own-sampler", storage=_sqlite(tmp_path))
    assert study.user_attrs["config"]["sampler"] == "test-counting"


def test_an_unknown_sampler_is_one_line_listing_the_registered_ones(counting_sampler):
    with pytest.raises(ConfigError) as e:
        study_from_dict({"name": "x", **COST_ONLY, "sampler": {"name": "cmaes"}}, "study.yaml")
    assert str(e.value) == "study.yaml: sampler.name: 'cmaes' is not one of nsga2, tpe, gp, bruteforce, random, test-counting"
    cfg = study_from_dict({"name": "x", **COST_ONLY}, "<test>")
    with pytest.raises(UnknownNameError) as e:
        make_sampler(dataclasses.replace(cfg, sampler="cmaes"))
    assert str(e.value) == "unknown sampler 'cmaes'; known: bruteforce, gp, nsga2, random, test-counting, tpe"


@pytest.mark.parametrize("content, needle", [
    ("name: [unclosed\n", "malformed YAML at line"),
    ("- just\n- a list\n", "a study must be a YAML mapping"),
])
def test_cli_bad_study_file_one_line_exit_2(tmp_path, capsys, content, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    assert main(["search", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert main(["search", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_enqueue_outside_the_space_is_refused_before_any_trial(tmp_path):
    cfg = _cfg(tmp_path, "enq", space="recombination", enqueue=["bk-sdm-small"], trials=2)
    with pytest.raises(ConfigError, match="enqueue: 'bk-sdm-small' is not a point of space 'recombination'; its presets: asdm-m1"):
        run_study(cfg, storage=_sqlite(tmp_path), progress=False)


# -- one worker ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cost_first_rejection_records_every_figure_and_the_front(tmp_path):
    cap = 3.3e6  # between BK-SDM-Small (3.23 M) and BK-SDM-Base (3.79 M) on the tiny teacher
    cfg = _cfg(tmp_path, "cost", trials=10, enqueue=["bk-sdm-base", "bk-sdm-small"],
               constraints=[{"metric": "params", "max": cap}])
    res = run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    assert res["evaluated"] == 10 and res["stopped"] == "trials"
    study = optuna.load_study(study_name="cost", storage=_sqlite(tmp_path))
    trials = study.get_trials()
    assert study.metric_names == ["macs", "output_mse"]
    assert [t.user_attrs.get("enqueued_as") for t in trials[:2]] == ["bk-sdm-base", "bk-sdm-small"]
    # BK-SDM-Base breaks the budget: rejected from the cost engine, before any proxy work
    base = trials[0]
    assert base.state == TrialState.PRUNED and base.user_attrs["status"] == "rejected"
    from hybridsd_nas.cost import estimate_cost

    expected = estimate_cost("tiny", "bk-sdm-base").params
    assert expected > cap and base.user_attrs["params"] == expected
    assert base.user_attrs["reason"] == f"params = {expected:.6g} breaks params <= 3.3e+06"
    assert "output_mse" not in base.user_attrs and "proxy_seconds" not in base.user_attrs["timings"]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done, "the random sampler found no candidate under the budget"
    for t in done:
        ua = t.user_attrs
        assert ua["params"] <= cap and ua["status"] in ("ok", "duplicate")
        assert t.values == [ua["macs"], ua["output_mse"]]
        assert ua["candidate"] is not None and len(ua["candidate_key"]) == 12
        assert ua["timings"]["trial_seconds"] >= ua["timings"]["cost_seconds"] > 0
    rejected = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["params"] > cap for t in rejected if "params" in t.user_attrs)
    # the front: exactly the non-dominated feasible trials, checked by brute force
    feas = [t for t in done if "duplicate_of" not in t.user_attrs]
    dominated = {a.number for a in feas for b in feas
                 if all(x <= y for x, y in zip(b.values, a.values)) and b.values != a.values}
    assert {t.number for t in pareto_front(study)} == {t.number for t in feas} - dominated
    s = summarize(study)
    assert 0 < s["hypervolume"] <= 1.1 ** 2 and s["counts"]["evaluated"] == 10
    assert len(feas) == 10  # the budget counts new candidates scored; rejections and repeats come free


@pytest.mark.slow
def test_budgets_as_fractions_of_the_teacher(tmp_path):
    from hybridsd_nas.cost import estimate_cost

    cfg = _cfg(tmp_path, "rel", trials=4, constraints=[{"metric": "macs", "max": 0.8, "of": "teacher"}])
    run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    limit = 0.8 * estimate_cost("tiny").macs
    trials = optuna.load_study(study_name="rel", storage=_sqlite(tmp_path)).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 4
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["macs"] <= limit
        elif t.user_attrs["status"] == "rejected" and "macs" in t.user_attrs:
            assert t.user_attrs["macs"] > limit and t.user_attrs["reason"].endswith(f"breaks macs <= {limit:g}")
    with pytest.raises(ConfigError, match=r"constraints\[0\].of: fractions of the teacher apply to cost metrics"):
        _cfg(tmp_path, "rel2", constraints=[{"metric": "proxy_fid", "max": 2, "of": "teacher"}])


@pytest.mark.slow
def test_rerun_resumes_to_the_asked_total(tmp_path):
    cfg = _cfg(tmp_path, "resume", trials=3)
    first = run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    assert first["trials_run"][0] == 0 and first["evaluated"] == 3
    before = {t.number: t.params for t in optuna.load_study(study_name="resume", storage=_sqlite(tmp_path)).trials}
    again = run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    assert again["trials_run"] == [] and again["evaluated"] == 3
    more = run_study(cfg, storage=_sqlite(tmp_path), n_trials=5, progress=False)
    n = len(first["trials_run"])
    assert more["trials_run"][0] == n and more["evaluated"] == 5
    after = optuna.load_study(study_name="resume", storage=_sqlite(tmp_path)).trials
    assert {t.number: t.params for t in after[:n]} == before
    # a changed meaning of the trials (other objectives) under the same name is refused
    other = _cfg(tmp_path, "resume", trials=3, proxy={"data_images": 64})
    with pytest.raises(ConfigError, match=r"study 'resume' already exists with other settings \(proxy\)"):
        run_study(other, storage=_sqlite(tmp_path), progress=False)


@pytest.mark.slow
def test_a_failing_proxy_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    from hybridsd_nas.study import Evaluator

    real = Evaluator.proxy
    calls = []

    def flaky(self, candidate, prefilter, quality, point=None, **kw):
        calls.append(candidate.key)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, candidate, prefilter, quality, point=point, **kw)

    monkeypatch.setattr(Evaluator, "proxy", flaky)
    res = run_study(_cfg(tmp_path, "flaky", trials=4), storage=_sqlite(tmp_path), progress=False)
    assert res["evaluated"] == 4 and len(res["trials_run"]) == 5
    trials = optuna.load_study(study_name="flaky", storage=_sqlite(tmp_path)).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number == 1
    assert failed[0].user_attrs["status"] == "failed"
    assert failed[0].user_attrs["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_example_studies_load_and_the_quickstart_ranks_by_the_default_ranking_score():
    from hybridsd_nas.proxy import ProxySettings

    root = Path(__file__).resolve().parents[1] / "experiments"
    examples = sorted(root.glob("*.yaml"))
    assert {p.name for p in examples} >= {"quickstart.yaml", "hybrid_schedule.yaml"}
    for p in examples:
        if p.name == "byo_teacher.yaml":  # a template: its paths are for the user to fill in, and say so
            with pytest.raises(ConfigError, match="path/to/your/image-text-folder' does not exist"):
                load_study_config(p)
            continue
        load_study_config(p)  # every example is a valid study
    q = load_study_config(root / "quickstart.yaml")
    # the decision of results/proxy_fidelity/notes.md: rank by heldout_mse at the default proxy settings (40 steps)
    assert [o.metric for o in q.objectives][0] == "heldout_mse" and not q.needs_sampling()
    assert ProxySettings(**q.proxy) == ProxySettings() and ProxySettings().distill_steps == 40


@pytest.mark.slow
def test_a_study_ranked_by_the_held_out_score_distils_but_never_samples(tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("the study sampled the student")

    monkeypatch.setattr("hybridsd_nas.proxy.run.evaluate_student", no_sampling)  # what the proxy's sampling stage calls
    cfg = _cfg(tmp_path, "heldout", objectives=[{"metric": "macs"}, {"metric": "heldout_mse"}], proxy=SHORT_PROXY, trials=2)
    assert not cfg.needs_sampling() and _cfg(tmp_path, "fid", objectives=["macs", "proxy_fid"]).needs_sampling()
    res = run_study(cfg, storage=_sqlite(tmp_path), progress=False)
    assert res["evaluated"] == 2
    done = [t for t in optuna.load_study(study_name="heldout", storage=_sqlite(tmp_path)).trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        assert t.user_attrs["heldout_mse"] > 0 and t.values[1] == t.user_attrs["heldout_mse"] and "proxy_fid" not in t.user_attrs


@pytest.mark.slow
def test_nan_in_the_proxy_fails_trials_then_stops_with_one_line(tmp_path, capsys, monkeypatch):
    _default_results_root(tmp_path, monkeypatch)
    proxy = {**SHORT_PROXY, "lr": 1.0e12}
    Path("nan.yaml").write_text(yaml.safe_dump({"name": "nan", **COST_ONLY, "objectives": ["proxy_fid", "macs"],
                                                "proxy": proxy, "trials": 3, "max_failures": 2}))
    assert main(["search", "nan.yaml", "--quiet"]) == 1  # the run failed (not the user's input): exit status 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("trial 0 failed: proxy failed: loss is nan at step")  # each failure, one line
    assert len(err) == 3 and err[-1].startswith("hybridsd-nas: failed: ")
    assert "study nan: 2 trials failed in a row, stopped (last: trial 1: proxy failed: loss is nan" in err[-1]
    trials = optuna.load_study(study_name="nan", storage="sqlite:///runs/nan/study.db").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("macs" in t.user_attrs for t in trials)  # what was computed is kept


@pytest.mark.slow
def test_cli_search_pareto_export(tmp_path, capsys, monkeypatch):
    from hybridsd_nas.export import load_unet, read_metadata

    _default_results_root(tmp_path, monkeypatch)
    Path("s.yaml").write_text(yaml.safe_dump({"name": "cli", **COST_ONLY, "trials": 5, "enqueue": ["bk-sdm-tiny"]}))
    assert main(["search", "s.yaml", "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["evaluated"] == 5 and Path("runs/cli/study.db").is_file()
    assert set(res["outputs"].values()) == {"runs/cli/pareto.json", "runs/cli/pareto.csv", "runs/cli/best_unet",
                                            "runs/cli/pareto.md", "runs/cli/report.html"}
    assert main(["pareto", "--study", "cli", "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front["objectives"] == [{"metric": "macs", "direction": "minimize"}, {"metric": "output_mse", "direction": "minimize"}]
    rows = front["front"]
    assert rows and all("macs" in r and "output_mse" in r for r in rows) and front["hypervolume"] > 0
    assert main(["pareto", "--study", "cli", "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("trial,label,candidate_key,status,params,macs") and len(lines) == len(rows) + 1
    assert main(["pareto", "--study", "cli"]) == 0
    assert "Pareto front: %d trials" % len(rows) in capsys.readouterr().out
    pick = rows[0]
    assert main(["export", "--study", "cli", "--trial", str(pick["trial"]), "--out", "best"]) == 0
    capsys.readouterr()
    unet = load_unet("best")
    assert sum(p.numel() for p in unet.parameters()) == pick["params"]
    meta = read_metadata("best")
    assert meta["candidate_key"] == pick["candidate_key"] and meta["study"] == "cli" and meta["trial"] == pick["trial"]
    card = Path("best/README.md").read_text()
    assert pick["candidate_key"] in card and "How they were measured" in card
    # bad references: one line, exit 2
    assert main(["export", "--study", "cli", "--trial", "999", "--out", "x"]) == 2
    assert "has no completed trial 999" in capsys.readouterr().err
    assert main(["pareto", "--study", "nope"]) == 2
    assert "no study 'nope' at runs/nope/study.db" in capsys.readouterr().err


# -- many workers, faults --------------------------------------------------------------------------
def _spawn(cfg_path: Path, storage: str, cwd: Path, n_trials: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "hybridsd_nas", "search", str(cfg_path), "--storage", storage, "--quiet", "--json"]
    if n_trials:
        argv += ["--n-trials", str(n_trials)]
    # a worker started from a background job (no job control) would inherit SIGINT ignored, and Python
    # then installs no Ctrl-C handler: give it the default disposition, as a terminal would
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_running(name: str, storage: str, pid: int, timeout: float = 180) -> int:
    """Number of the trial that worker ``pid`` is running, once it has one."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            for t in optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker", "").endswith(f":{pid}") and "candidate_key" in t.user_attrs:
                    return t.number
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"worker {pid} never ran a trial")


def _short_quality_study(tmp_path, name, trials):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({
        "name": name, "teacher": "tiny", "space": "layer-removal", "objectives": ["proxy_fid", "macs"],
        "sampler": {"name": "random", "seed": 1}, "trials": trials, "proxy": SHORT_PROXY,
        "heartbeat": {"interval": 1, "grace": 4}, "artifacts": str(tmp_path / "artifacts")}))
    return p


def _check_finished_study(name, storage, target, killed):
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(finished) == target, [(t.number, t.state.name, t.user_attrs.get("status")) for t in trials]
    dead = trials[killed]
    assert dead.state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == dead.params
    assert retry[0].user_attrs["candidate_key"] == dead.user_attrs["candidate_key"]
    keys = [t.user_attrs["candidate_key"] for t in finished]
    assert len(keys) == len(set(keys)), "a candidate was evaluated twice"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


@pytest.mark.slow
def test_sqlite_worker_killed_mid_trial_is_retried_on_rerun(tmp_path):
    name = "kill-sqlite"
    cfg = _short_quality_study(tmp_path, name, trials=2)
    url = _sqlite(tmp_path, name)
    a = _spawn(cfg, url, tmp_path)
    killed = _wait_running(name, url, a.pid)
    a.send_signal(signal.SIGKILL)
    a.wait(30)
    b = _spawn(cfg, url, tmp_path)  # the same command again: detects the dead trial, retries it, finishes
    out, err = b.communicate(timeout=400)
    assert b.returncode == 0, err[-2000:]
    assert json.loads(out)["evaluated"] == 2
    trials = _check_finished_study(name, url, 2, killed)
    ok = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.user_attrs.get("sample_grid_artifact") for t in ok)  # samples stored as artifacts
    assert all((tmp_path / "artifacts" / t.user_attrs["sample_grid_artifact"]).is_file() for t in ok)
    # the report embeds the sample grid of every front member
    study = optuna.load_study(study_name=name, storage=url)
    page = build_report([study], tmp_path / "r.html").read_text()
    front = pareto_front(study)
    assert len(front) > 0
    assert page.count("<img alt='samples of trial") == len(front)  # (plotly.js itself may hold the data-URI prefix)
    for t in front:
        assert f"<img alt='samples of trial {t.number}' src='data:image/png;base64," in page


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(tmp_path):
    name = "ctrl-c"
    cfg = _short_quality_study(tmp_path, name, trials=2)
    url = _sqlite(tmp_path, name)
    a = _spawn(cfg, url, tmp_path)
    stopped = _wait_running(name, url, a.pid)
    a.send_signal(signal.SIGINT)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 130 and "rerun the same command to resume" in err
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert trials[stopped].state == TrialState.FAIL and trials[stopped].user_attrs["status"] == "interrupted"
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == trials[stopped].params
    b = _spawn(cfg, url, tmp_path)
    out, err = b.communicate(timeout=400)
    assert b.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    # two candidates evaluated; a random sampler may also propose one of them again (reused, not re-run)
    assert sum(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in trials) == 2
    again = trials[queued[0].number]
    assert again.state == TrialState.COMPLETE and again.params == trials[stopped].params
    assert again.user_attrs["retry_of"] == stopped


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_postgres_two_workers_one_killed_study_completes(tmp_path):
    if not _pg_available():
        pytest.skip(f"no PostgreSQL server at {PG_URL} (set HYBRIDSD_NAS_TEST_PG)")
    name = f"pg-{uuid.uuid4().hex[:10]}"
    cfg = _short_quality_study(tmp_path, name, trials=3)
    try:
        a = _spawn(cfg, PG_URL, tmp_path)
        killed = _wait_running(name, PG_URL, a.pid)
        b = _spawn(cfg, PG_URL, tmp_path)  # a second worker joins the same study
        _wait_running(name, PG_URL, b.pid)
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        out, err = b.communicate(timeout=500)
        assert b.returncode == 0, err[-2000:]
        res = json.loads(out)
        assert res["evaluated"] == 3
        trials = _check_finished_study(name, PG_URL, 3, killed)
        workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
        assert workers == {str(a.pid), str(b.pid)}
        assert {t.number for t in trials if t.user_attrs["worker"].endswith(f":{b.pid}")} == set(res["trials_run"])
    finally:
        try:
            optuna.delete_study(study_name=name, storage=PG_URL)
        except KeyError:
            pass


def test_hypervolume_matches_a_hand_computed_case():
    pts = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    # normalised = the points themselves (range 0..1); reference 1.1; area by vertical strips
    expected = (0.5 - 0.0) * (1.1 - 1.0) + (1.0 - 0.5) * (1.1 - 0.5) + (1.1 - 1.0) * (1.1 - 0.0)
    assert hypervolume(pts, ["minimize", "minimize"]) == pytest.approx(expected)
    flipped = pts.copy()
    flipped[:, 1] = -flipped[:, 1]
    assert hypervolume(flipped, ["minimize", "maximize"]) == pytest.approx(expected)
