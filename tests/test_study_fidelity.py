"""Multi-fidelity studies: rungs in the study YAML, promotions through Optuna's storage (once each, with
many workers; retried when killed; kept over Ctrl-C), the front at each candidate's highest rung, and
the proxy audit in the summary, pareto.md and the CLI."""

import json
import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.paths import RESULTS_ENV
from hybridsd_nas.proxy import ProxySettings, Stage, run_proxy
from hybridsd_nas.study import (
    StopReason,
    TrialStatus,
    checkpoint_dir,
    enqueue_promotions,
    pareto_front,
    requeue,
    run_study,
    study_from_dict,
    summarize,
    write_outputs,
)
from hybridsd_nas.study.rungs import PROMOTION_OF, RUNG, earlier_twin, prune_checkpoints
from hybridsd_nas.study.storage import open_storage

from .test_study import PG_URL, _pg_available

# the shortest real proxy: a few distillation steps, no sampling (heldout_mse)
TINY = {"batch_size": 8, "data_images": 64, "heldout_latents": 8}
BASE = {"teacher": "tiny", "space": "layer-removal", "objectives": ["heldout_mse", "macs"],
        "sampler": {"name": "random", "seed": 0}, "proxy": TINY}


@pytest.fixture(autouse=True)
def _results_root(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results-root"))


def _cfg(tmp_path, name="mf", **kw):
    return study_from_dict({"name": name, **BASE, "artifacts": str(tmp_path / "art"), **kw}, "<test>")


def _sqlite(tmp_path):
    return f"sqlite:///{tmp_path / 's.db'}"


# -- configuration: one line, before any trial --------------------------------------------------
@pytest.mark.parametrize("fidelity, extra, needle", [
    ({"rungs": [40, 40], "promote": 0.3}, {}, "fidelity.rungs: must be strictly increasing, got [40, 40]"),
    ({"rungs": [160, 40], "promote": 0.3}, {}, "fidelity.rungs: must be strictly increasing"),
    ({"rungs": [40, 160], "promote": 0}, {}, "fidelity.promote: must be in (0, 1]"),
    ({"rungs": [40, 160], "promote": 1.5}, {}, "fidelity.promote: must be in (0, 1], the fraction of a rung promoted, got 1.5"),
    ({"rungs": [40, 160]}, {}, "fidelity: missing key 'promote'"),
    ({"rungs": [40, 160], "promote": 0.3, "eta": 3}, {}, "fidelity.eta: unknown key; valid keys: rungs, promote"),
    ({"rungs": [40, 160], "promote": 0.3}, {"objectives": ["macs", "params"]},
     "fidelity: rungs are distillation steps of the quality proxy, and this study's metrics (macs, params) need no distillation"),
    ({"rungs": [40, 160], "promote": 0.3}, {"proxy": {**TINY, "distill_steps": 20}},
     "proxy.distill_steps: 20 differs from fidelity.rungs[0] (40)"),
    ({"rungs": [40, 160], "promote": 0.3}, {"proxy": {**TINY, "lr_schedule": "cosine"}},
     "fidelity.rungs: proxy.lr_schedule cosine sets the rate by the run's length, so the checkpoint at 40 steps cannot continue to 160"),
])
def test_bad_fidelity_is_one_line_naming_the_key(tmp_path, fidelity, extra, needle):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, fidelity=fidelity, **extra)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("<test>: ")


def test_fidelity_sets_the_first_rung_as_the_proxy_steps_and_is_part_of_the_study_identity(tmp_path):
    cfg = _cfg(tmp_path, fidelity={"rungs": [4, 8], "promote": 0.5}, proxy={**TINY, "lr_schedule": "constant_with_warmup"})
    assert cfg.fidelity.rungs == (4, 8) and cfg.proxy["distill_steps"] == 4
    assert json.loads(json.dumps(cfg.to_dict()))["fidelity"] == {"rungs": [4, 8], "promote": 0.5}
    url = _sqlite(tmp_path)
    from hybridsd_nas.study import load_or_create_study
    load_or_create_study(cfg, open_storage(cfg, url))
    other = _cfg(tmp_path, fidelity={"rungs": [4, 16], "promote": 0.5}, proxy={**TINY, "lr_schedule": "constant_with_warmup"})
    with pytest.raises(ConfigError, match=r"already exists with other settings \(fidelity"):
        load_or_create_study(other, open_storage(other, url))


def test_cli_refuses_rungs_on_a_hybrid_schedule_space_before_any_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("hybridsd_nas.study.objective.TrialObjective.__call__", no_model)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "hyb", "teacher": "tiny", "space": "hybrid-schedule", "objectives": ["paired_mse", "cloud_share"],
        "fidelity": {"rungs": [40, 160], "promote": 0.3}}))
    assert main(["search", "s.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fidelity: space 'hybrid-schedule' is a hybrid-schedule space" in err
    assert "cannot continue" in err


# -- a promotion continues the checkpoint; a continued run equals a run from the start ------------
@pytest.mark.slow
def test_continuing_a_rung_checkpoint_equals_distilling_from_the_start(tmp_path):
    s4, s12 = (ProxySettings(**TINY, distill_steps=n) for n in (4, 12))
    ck = tmp_path / "ck"
    a = run_proxy("tiny", "bk-sdm-tiny", s4, until=Stage.HELDOUT, checkpoint_dir=ck)
    assert a.distill["resumed_from_step"] == 0 and (ck / "checkpoints" / "step-0000004" / "state.json").is_file()
    b = run_proxy("tiny", "bk-sdm-tiny", s12, until=Stage.HELDOUT, checkpoint_dir=ck, save_checkpoint=False)
    assert b.distill["resumed_from_step"] == 4
    c = run_proxy("tiny", "bk-sdm-tiny", s12, until=Stage.HELDOUT)
    assert b.heldout["heldout_mse"] == c.heldout["heldout_mse"] != a.heldout["heldout_mse"]
    # a checkpoint of another candidate is refused (one line), not continued
    bad = run_proxy("tiny", "bk-sdm-small", s12, until=Stage.HELDOUT, checkpoint_dir=ck) if False else None
    with pytest.raises(ConfigError, match="belongs to another run"):
        run_proxy("tiny", "bk-sdm-small", s12, until=Stage.HELDOUT, checkpoint_dir=ck)
    assert bad is None


# -- a study with rungs ------------------------------------------------------------------------
def _rows(study):
    return [(t.number, t.state, t.user_attrs.get("status"), t.user_attrs.get(RUNG), t.user_attrs.get(PROMOTION_OF),
             t.user_attrs.get("candidate_key")) for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_a_study_promotes_from_checkpoints_and_ranks_the_front_at_the_highest_rung(tmp_path, capsys):
    cfg = _cfg(tmp_path, trials=5, fidelity={"rungs": [4, 8, 16], "promote": 0.4})
    url = _sqlite(tmp_path)
    res = run_study(cfg, storage=url, progress=False)
    assert res["stopped"] == StopReason.TRIALS and res["evaluated"] == 5  # promotions are not new candidates
    study = optuna.load_study(study_name="mf", storage=url)
    trials = study.get_trials(deepcopy=False)
    scored = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["status"] in ("ok", "infeasible")]
    promos = [t for t in scored if PROMOTION_OF in t.user_attrs]
    assert promos, "nothing was promoted"
    for p in promos:
        src = next(t for t in trials if t.number == p.user_attrs[PROMOTION_OF])
        assert p.params == src.params and p.user_attrs["candidate_key"] == src.user_attrs["candidate_key"]
        assert p.user_attrs[RUNG] == {4: 8, 8: 16}[src.user_attrs[RUNG]]
        assert p.user_attrs["resumed_from_step"] == src.user_attrs[RUNG]  # continued, not redone
        assert p.user_attrs["macs"] == src.user_attrs["macs"]
    # each (candidate, rung) scored once
    pairs = [(t.user_attrs["candidate_key"], t.user_attrs[RUNG]) for t in scored if "duplicate_of" not in t.user_attrs]
    assert len(pairs) == len(set(pairs))
    # the front: one row per candidate, each at its highest rung
    front = pareto_front(study)
    highest = {}
    for t in scored:
        k = t.user_attrs["candidate_key"]
        highest[k] = max(highest.get(k, 0), t.user_attrs[RUNG])
    assert front and all(t.user_attrs[RUNG] == highest[t.user_attrs["candidate_key"]] for t in front)
    assert len({t.user_attrs["candidate_key"] for t in front}) == len(front)
    # every checkpoint is gone once the study is done
    assert not any((tmp_path / "art" / "rung-checkpoints").iterdir())
    s = summarize(study)
    a = s["audit"]
    assert s["fidelity"] == {"rungs": [4, 8, 16], "promote": 0.4} and a["metric"] == "heldout_mse"
    assert a["promotions"] == len(promos) and a["scored_per_rung"]["4"] == 5
    assert all(r["rung"] in (4, 8, 16) and r["label"] for r in s["trials"] if r["status"] == "ok")
    out = write_outputs("mf", url, tmp_path / "out")
    md = out["Pareto table"].read_text()
    assert "Multi-fidelity: rungs [4, 8, 16]" in md and "Proxy audit (heldout_mse" in md
    pj = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert pj["audit"]["promotions"] == len(promos) and all("rung" in r for r in pj["front"])
    assert main(["pareto", "--study", "mf", "--storage", url]) == 0
    printed = capsys.readouterr().out
    assert "Proxy audit (heldout_mse" in printed and "rung" in printed.splitlines()[2]


def test_a_study_without_promotions_says_so(tmp_path):
    study = optuna.create_study(directions=["minimize", "minimize"], study_name="none")
    study.set_metric_names(["heldout_mse", "macs"])
    study.set_user_attr("config", {"fidelity": {"rungs": [40, 400], "promote": 0.3}})
    for i, v in enumerate((0.3, 0.2, 0.1)):
        study.add_trial(optuna.trial.create_trial(values=[v, 100 + i], user_attrs={"status": "ok", "candidate_key": f"k{i}",
                                                                                  "heldout_mse": v, "macs": 100 + i, RUNG: 40}))
    s = summarize(study)
    assert s["audit"]["possible"] is False and s["audit"]["promotions"] == 0
    assert "no promotions yet" in s["audit"]["reason"] and all(r["rung"] == 40 for r in s["trials"])
    assert summarize(optuna.create_study(directions=["minimize"]))["audit"] is None  # a study without rungs: no audit


def _promotion_study(tmp_path, name="p"):
    """A stored study with three candidates scored at the first of rungs [4, 8] (hand-made, no models)."""
    url = _sqlite(tmp_path)
    cfg = _cfg(tmp_path, name=name, fidelity={"rungs": [4, 8], "promote": 0.34}, heartbeat={"interval": 1, "grace": 2})
    storage = open_storage(cfg, url)
    from hybridsd_nas.study import load_or_create_study
    study = load_or_create_study(cfg, storage)
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    for i, (v, status) in enumerate(((0.5, "ok"), (0.1, "ok"), (0.05, "infeasible"))):
        study.add_trial(optuna.trial.create_trial(
            values=[v, 1e6], params={"x": i}, distributions=dist,
            user_attrs={"status": status, "candidate_key": f"key{i}", RUNG: 4}))
    return cfg, study


def test_promotions_are_queued_once_and_a_concurrent_twin_stands_down(tmp_path):
    cfg, study = _promotion_study(tmp_path)
    # ceil(0.34 * 2 feasible) = 1: the better feasible candidate; the infeasible one never
    assert enqueue_promotions(study, cfg.fidelity) == [("key1", 8)]
    assert enqueue_promotions(study, cfg.fidelity) == []  # queued already: not again
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[PROMOTION_OF] == 1 and waiting[0].system_attrs["fixed_params"] == {"x": 1}
    # two workers that decided at the same moment enqueue a twin: the later one finds the earlier
    study.enqueue_trial({"x": 1}, user_attrs={"candidate_key": "key1", RUNG: 8, PROMOTION_OF: 1})
    first, twin = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    assert earlier_twin(study, twin, "key1", 8).number == first and earlier_twin(study, first, "key1", 8) is None


def test_a_killed_promotion_is_retried_with_its_rung(tmp_path):
    cfg, study = _promotion_study(tmp_path)
    enqueue_promotions(study, cfg.fidelity)
    trial = study.ask()  # a worker takes the promotion ...
    assert trial.user_attrs[RUNG] == 8
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)  # ... and dies: no heartbeat for longer than the grace period
    optuna.storages.fail_stale_trials(study)
    retry = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(retry) == 1 and retry[0].user_attrs[RUNG] == 8 and retry[0].user_attrs[PROMOTION_OF] == 1
    assert retry[0].system_attrs["failed_trial"] == trial.number
    assert enqueue_promotions(study, cfg.fidelity) == []  # the retry is the promotion: no third copy


def test_ctrl_c_queues_a_promotion_again_with_its_rung(tmp_path):
    cfg, study = _promotion_study(tmp_path)
    enqueue_promotions(study, cfg.fidelity)
    trial = study.ask()
    assert trial.suggest_int("x", 0, 9) == 1  # the worker had built the candidate when Ctrl-C came
    trial.set_user_attr("status", TrialStatus.INTERRUPTED.value)
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, trial)
    again = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(again) == 1 and again[0].user_attrs[RUNG] == 8 and again[0].user_attrs[PROMOTION_OF] == 1
    assert again[0].user_attrs["retry_of"] == trial.number


def test_checkpoints_outside_twice_the_promoted_fraction_are_pruned(tmp_path):
    cfg, study = _promotion_study(tmp_path)
    for k in ("key0", "key1", "key2", "stray"):
        (checkpoint_dir(cfg, k) / "checkpoints").mkdir(parents=True)
    # 2 * 0.34 of the 2 feasible at rung 4 -> 2 kept; the infeasible one and a stray folder go
    assert sorted(prune_checkpoints(study, cfg)) == ["key2", "stray"]
    assert checkpoint_dir(cfg, "key0").is_dir() and checkpoint_dir(cfg, "key1").is_dir()
    assert sorted(prune_checkpoints(study, cfg, everything=True)) == ["key0", "key1"]


# -- many workers on PostgreSQL ---------------------------------------------------------------
@pytest.mark.slow
def test_postgres_two_workers_promote_each_candidate_once(tmp_path):
    if not _pg_available():
        pytest.skip(f"no PostgreSQL server at {PG_URL} (set HYBRIDSD_NAS_TEST_PG)")
    name = f"mf-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, **BASE, "trials": 6, "fidelity": {"rungs": [4, 8], "promote": 0.5}, "storage": PG_URL,
            "artifacts": str(tmp_path / "art")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    env = {"OMP_NUM_THREADS": "1", RESULTS_ENV: str(tmp_path / "res")}
    cmd = [sys.executable, "-m", "hybridsd_nas", "search", str(tmp_path / "s.yaml"), "--quiet", "--no-outputs"]
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    study = optuna.load_study(study_name=name, storage=PG_URL)
    try:
        scored = [t for t in study.get_trials(deepcopy=False)
                  if t.state == TrialState.COMPLETE and t.user_attrs.get("status") in ("ok", "infeasible")
                  and "duplicate_of" not in t.user_attrs]
        pairs = [(t.user_attrs["candidate_key"], t.user_attrs[RUNG]) for t in scored]
        assert len(pairs) == len(set(pairs)), sorted(pairs)  # each promotion ran once
        assert sum(r == 8 for _, r in pairs) >= 1 and sum(r == 4 for _, r in pairs) == 6
        workers = {t.user_attrs["worker"] for t in scored}
        assert len(workers) == 2  # both workers took trials
        promos = [t for t in scored if PROMOTION_OF in t.user_attrs]
        assert all(t.user_attrs["resumed_from_step"] == 4 for t in promos)  # from the shared checkpoint folder
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)
