"""``hybridsd-nas pick``: budgets, the best feasible candidate of pooled studies, ties, the nearest miss,
and candidates dropped when measured again on the device. Studies are written straight into storage."""

import json
import re

import optuna
import pytest

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import BudgetError, ConfigError
from hybridsd_nas.cost import estimate_cost
from hybridsd_nas.export import load_unet, read_metadata
from hybridsd_nas.study import METRICS, Budget, parse_budget, pick

ARCH = describe("tiny")
PRESETS = ("teacher", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")


def cand(name):
    c = Candidate() if name == "teacher" else candidate_preset(name, ARCH)
    return c.to_dict(), c.key


def make_study(url, name, rows, metrics=("macs", "heldout_mse"), config=None):
    """A finished study: one scored trial per row (``name``: a preset; its figures), plus a rejected and a
    failed trial that pick must ignore. Built in memory, then copied into ``url`` at once."""
    st = optuna.create_study(study_name=name, directions=[METRICS[m].direction for m in metrics])
    st.set_metric_names(list(metrics))
    st.set_user_attr("config", {"name": name, "teacher": "tiny", "space": "layer-removal", "resolution": None, "batch": 1,
                                "sampler": "tpe", "seed": 0, "constraints": [], "proxy": {}, **(config or {})})
    dist = {"i": optuna.distributions.IntDistribution(0, 100)}
    for i, r in enumerate(rows):
        c, key = cand(r["name"])
        figs = {k: v for k, v in r.items() if k != "name"}
        st.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=[figs[m] for m in metrics], params={"i": i}, distributions=dist,
            user_attrs={"status": r.get("status", "ok"), "candidate": c, "candidate_key": key, "label": r["name"], **figs}))
    c, key = cand("bk-sdm-tiny")
    st.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"i": 90}, distributions=dist,
                                           user_attrs={"status": "rejected", "candidate": c, "candidate_key": key, "macs": 1}))
    st.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"i": 91}, distributions=dist,
                                           user_attrs={"status": "failed", "candidate": c, "candidate_key": key}))
    optuna.copy_study(from_study_name=name, from_storage=st._storage, to_storage=url)
    return optuna.load_study(study_name=name, storage=url)


ROWS = [  # heldout_mse is the quality objective (lower is better)
    {"name": "teacher", "macs": 400.0, "heldout_mse": 0.10, "pipeline_latency_ms": 900.0, "peak_memory_mb": 30.0},
    {"name": "bk-sdm-base", "macs": 300.0, "heldout_mse": 0.20, "pipeline_latency_ms": 700.0, "peak_memory_mb": 25.0},
    {"name": "bk-sdm-small", "macs": 250.0, "heldout_mse": 0.30, "pipeline_latency_ms": 600.0, "peak_memory_mb": 20.0},
    {"name": "bk-sdm-tiny", "macs": 200.0, "heldout_mse": 0.45, "pipeline_latency_ms": 500.0, "peak_memory_mb": 15.0},
]


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.mark.parametrize("text, want", [
    ("pipeline_latency_ms<=800", Budget("pipeline_latency_ms", "<=", 800.0)),
    (" peak_memory_mb < 4e3 ", Budget("peak_memory_mb", "<", 4000.0)),
    ("adherence>=0.8", Budget("adherence", ">=", 0.8)),
    ("params>1e6", Budget("params", ">", 1e6)),
])
def test_budget_forms(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("text, needle", [
    ("pipeline_latency_ms=800", "is not one of the forms METRIC<=V, METRIC<V, METRIC>=V, METRIC>V"),
    ("latency_ms<=800ms", "'800ms' is not a number (forms: METRIC<=V"),
    ("macs<<3", "is not one of the forms"),
    ("", "is not one of the forms"),
    ("speed<=800", "'speed' is not a metric; known: params, macs"),
    ("macs<=lots", "'lots' is not a number"),
    ("macs<=nan", "must be a finite number"),
    ("peak_memory_mb<=0", "peak_memory_mb is a time or a size, so an upper bound must be > 0"),
])
def test_bad_budgets_are_one_line(text, needle):
    with pytest.raises(BudgetError) as e:
        parse_budget(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_budget_holds_and_misses():
    b = parse_budget("pipeline_latency_ms<800")
    assert b.holds(799) and not b.holds(800) and b.miss(800) == 0 and b.miss(1000) == pytest.approx(0.25)
    lo = parse_budget("adherence>=0.8")
    assert lo.holds(0.8) and not lo.holds(0.6) and lo.miss(0.6) == pytest.approx(0.25)


def test_cli_bad_budget_exit_2_before_any_study_loads(tmp_path, capsys):
    # the study does not exist: a budget checked after loading would report that instead
    assert main(["pick", "--study", "nope", "--budget", "pipeline_latency_ms=800", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "METRIC<=V, METRIC<V, METRIC>=V, METRIC>V" in err[0]
    assert main(["pick", "--study", "nope", "--budget", "fps>=30", "--out", str(tmp_path / "o")]) == 2
    assert "'fps' is not a metric; known: params" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_best_feasible_is_picked(url):
    st = make_study(url, "a", ROWS)
    budgets = [parse_budget("pipeline_latency_ms<=800"), parse_budget("peak_memory_mb<=22")]
    p = pick([st], budgets)
    feasible = [r for r in ROWS if r["pipeline_latency_ms"] <= 800 and r["peak_memory_mb"] <= 22]
    best = min(feasible, key=lambda r: r["heldout_mse"])
    assert p.chosen.row["label"] == best["name"] == "bk-sdm-small"
    assert [e.row["label"] for e in p.feasible] == ["bk-sdm-small", "bk-sdm-tiny"]
    assert len(p.entries) == 4  # the rejected and the failed trial are no candidates
    assert p.quality == {"metric": "heldout_mse", "direction": "minimize"}
    # no budget: the best of all; a lower bound
    assert pick([st], []).chosen.row["label"] == "teacher"
    assert pick([st], [parse_budget("macs>=260")]).chosen.row["label"] == "teacher"
    assert pick([st], [parse_budget("macs<260")]).chosen.row["label"] == "bk-sdm-small"


def test_a_study_infeasible_trial_is_no_candidate(url):
    rows = [dict(ROWS[0], status="infeasible"), *ROWS[1:]]
    assert pick([make_study(url, "a", rows)], []).chosen.row["label"] == "bk-sdm-base"


def test_ties_go_to_fewer_macs_then_the_earlier_study(url):
    rows = [dict(r, heldout_mse=0.2) for r in ROWS]
    p = pick([make_study(url, "a", rows)], [parse_budget("pipeline_latency_ms<=800")])
    assert p.chosen.row["label"] == "bk-sdm-tiny"  # equal quality: fewest MACs
    same = [dict(ROWS[2])]
    a, b = make_study(url, "x", same), make_study(url, "y", same)
    assert pick([b, a], []).chosen.study == "y" and pick([a, b], []).chosen.study == "x"


def test_several_studies_are_pooled(url):
    a = make_study(url, "a", ROWS[2:])
    b = make_study(url, "b", [dict(ROWS[1], heldout_mse=0.25), dict(ROWS[0], heldout_mse=0.05)])
    p = pick([a, b], [parse_budget("pipeline_latency_ms<=800")])
    assert (p.chosen.study, p.chosen.row["label"]) == ("b", "bk-sdm-base")
    assert {(e.study, e.row["label"]) for e in p.feasible} == {("a", "bk-sdm-small"), ("a", "bk-sdm-tiny"), ("b", "bk-sdm-base")}
    c = make_study(url, "c", [dict(r, output_mse=r["heldout_mse"]) for r in ROWS], metrics=("macs", "output_mse"))
    with pytest.raises(ConfigError, match=r"different quality objectives \(a: minimize heldout_mse, c: minimize output_mse\)"):
        pick([a, c], [])


def test_cost_only_studies_and_unrecorded_figures(url):
    st = make_study(url, "cost", [{k: v for k, v in r.items() if k != "heldout_mse"} for r in ROWS], metrics=("macs",))
    with pytest.raises(ConfigError, match="study 'cost' has no quality objective to rank by"):
        pick([st], [])
    bare = make_study(url, "bare", [{k: r[k] for k in ("name", "macs", "heldout_mse")} for r in ROWS])
    with pytest.raises(ConfigError, match="did not record pipeline_latency_ms for every candidate.*give --table FILE"):
        pick([bare], [parse_budget("pipeline_latency_ms<=800")])
    # params and the predicted peak memory are computed from the candidate, without weights
    p = pick([bare], [parse_budget("params<=3.3e6")])
    assert p.chosen.row["label"] == "bk-sdm-small"
    assert p.chosen.figures["params"] == estimate_cost("tiny", "bk-sdm-small").params
    assert p.chosen.computed["figures"]["params"] == p.chosen.figures["params"]
    p = pick([bare], [parse_budget("peak_memory_mb<=1000")])
    assert p.chosen.row["label"] == "teacher" and 10 < p.chosen.figures["peak_memory_mb"] < 100


def test_cli_exports_the_pick_with_its_card_and_pick_json(url, tmp_path, capsys):
    make_study(url, "a", ROWS)
    out = tmp_path / "picked"
    argv = ["pick", "--study", "a", "--storage", url, "--budget", "pipeline_latency_ms<=800", "--budget", "peak_memory_mb<=22",
            "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("picked trial 2 (bk-sdm-small) of study a: heldout_mse 0.3, the best of 2 of 4 candidates")
    assert load_unet(out) is not None and read_metadata(out)["candidate_key"] == cand("bk-sdm-small")[1]
    data = json.loads((out / "pick.json").read_text())
    assert data["budgets"] == ["pipeline_latency_ms<=800", "peak_memory_mb<=22"]
    assert data["chosen"]["trial"] == 2 and data["chosen"]["budgets"]["peak_memory_mb<=22"] == {"value": 20.0, "holds": True,
                                                                                               "from": "recorded"}
    assert [r["label"] for r in data["runners_up"]] == ["bk-sdm-tiny"] and data["verification"] is None
    card = (out / "README.md").read_text()
    assert "## Picked for a device budget" in card and "| peak_memory_mb<=22 | 20 | recorded |" in card
    assert main(argv) == 2  # the folder exists now
    assert "already exists" in capsys.readouterr().err


def test_no_feasible_candidate_names_the_nearest_miss_and_exits_1(url, tmp_path, capsys):
    make_study(url, "a", ROWS)
    out = tmp_path / "none"
    assert main(["pick", "--study", "a", "--storage", url, "--budget", "pipeline_latency_ms<=450", "--budget",
                 "peak_memory_mb<=14", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists()
    # bk-sdm-tiny misses least: latency 500 vs 450 (11.1%), memory 15 vs 14 (7.1%)
    assert re.search(r"nearest miss: trial 3 \(bk-sdm-tiny\) of study a: pipeline_latency_ms = 500 misses "
                     r"pipeline_latency_ms<=450 by 11\.1%; peak_memory_mb = 15 misses peak_memory_mb<=14 by 7\.1%$", err[0]), err[0]


def test_verify_on_cpu_drops_who_breaks_the_budget_there(url, tmp_path, capsys, monkeypatch):
    # the recorded memory figures are far too low. The re-measurement stands in with the prediction (teacher ~27.5 MB,
    # bk-sdm-tiny ~14.7 MB): a process's peak RSS depends on what ran in it before (28 vs 38 MB for the teacher alone
    # and late in the whole suite), and this test is about what verification does with the figures it gets
    from hybridsd_nas.cost.request import PipelineCost

    monkeypatch.setattr(PipelineCost, "measure_memory", lambda self, cands: {**self.predict_memory(cands), "device": "cpu"})
    rows = [dict(ROWS[0], peak_memory_mb=2.0), dict(ROWS[3], heldout_mse=0.2, peak_memory_mb=1.5),
            dict(ROWS[2], heldout_mse=0.3, peak_memory_mb=2.5)]
    make_study(url, "a", rows)
    out = tmp_path / "verified"
    assert main(["pick", "--study", "a", "--storage", url, "--budget", "peak_memory_mb<=23", "--verify-on", "cpu",
                 "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "picked trial 1 (bk-sdm-tiny)" in cap.out
    assert re.search(r"measured on cpu: trial 0 \(teacher\) of study a: peak_memory_mb [\d.]+; dropped: peak_memory_mb = [\d.]+ "
                     r"measured on cpu misses peak_memory_mb<=23 by [\d.]+%", cap.err), cap.err
    data = json.loads((out / "pick.json").read_text())
    ver = data["verification"]
    assert ver["device"] == "cpu" and len(ver["dropped"]) == 1 and ver["dropped"][0].startswith("trial 0 (teacher) of study a")
    measured = {m["label"]: m["measured"]["peak_memory_mb"] for m in ver["measured"]}
    assert set(measured) == {"teacher", "bk-sdm-tiny"}  # bk-sdm-small is dominated by the tiny one: not measured
    assert measured["teacher"] > 23 >= measured["bk-sdm-tiny"]
    assert data["chosen"]["budgets"]["peak_memory_mb<=23"]["from"] == "measured"
