"""optuna-dashboard on a study's storage and artifact store: it is started on 127.0.0.1 and the
study, its trials, user attributes and sample-grid artifacts are read back through its HTTP API."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hybridsd_nas.core.paths import RESULTS_ENV
from hybridsd_nas.metrics.sampling import save_grid
from hybridsd_nas.study import TrialStatus, study_from_dict
from hybridsd_nas.study.storage import load_or_create_study, open_storage

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[test]')")

START_TIMEOUT = 60.0  # seconds for the server to answer


@pytest.fixture(autouse=True)
def _results_root(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results-root"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_command() -> list[str]:
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())"]


class Dashboard:
    """A running ``optuna-dashboard`` process and a JSON/bytes client for it."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.base, self.log = proc, f"http://127.0.0.1:{port}", log

    def get(self, path: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "")

    def json(self, path: str):
        status, body, _ = self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]!r}"
        return json.loads(body)


@pytest.fixture
def dashboard(tmp_path):
    """Start optuna-dashboard on a storage URL and an artifact folder; always stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(storage_url: str, artifact_dir: Path | None) -> Dashboard:
        port = _free_port()
        log = tmp_path / f"dashboard-{port}.log"
        args = [storage_url, "--host", "127.0.0.1", "--port", str(port)]
        if artifact_dir is not None:
            args += ["--artifact-dir", str(artifact_dir)]
        with open(log, "wb") as out:
            proc = subprocess.Popen([*_dashboard_command(), *args], stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        dash = Dashboard(proc, port, log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited with status {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if dash.get("/api/meta")[0] == 200:
                    return dash
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"optuna-dashboard did not answer on {dash.base} within {START_TIMEOUT:.0f} s:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _attrs(serialized: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in serialized}


def _study_by_name(dash: Dashboard, name: str) -> dict:
    listed = dash.json("/api/studies")["study_summaries"]
    mine = [s for s in listed if s["study_name"] == name]
    assert len(mine) == 1, [s["study_name"] for s in listed]
    return mine[0]


def _grid_png(seed: int, path: Path) -> Path:
    images = np.random.default_rng(seed).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    return save_grid(images, path, cols=2)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_dashboard_reads_a_hand_made_study_and_its_sample_grids(tmp_path, dashboard):
    # the workbench's layout: storage and artifact store under the study's results folder
    cfg = study_from_dict({"name": "dash", "teacher": "tiny", "space": "layer-removal",
                           "objectives": [{"metric": "macs"}, {"metric": "proxy_fid"}],
                           "sampler": {"name": "random", "seed": 0}, "proxy": {"data_images": 32}, "trials": 2}, "<test>")
    assert cfg.artifacts_dir() == cfg.results_dir / "artifacts"
    study = load_or_create_study(cfg, open_storage(cfg))
    cfg.artifacts_dir().mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(str(cfg.artifacts_dir()))

    pngs, uploaded = {}, {}
    for i, (macs, fid) in enumerate([(1.5e6, 12.25), (9.0e5, 30.5)]):
        trial = study.ask()
        trial.suggest_categorical("remove_down_0_0", [False, True])
        path = _grid_png(i, tmp_path / f"trial-{trial.number}-samples.png")
        aid = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                               mimetype="image/png")
        for k, v in {"candidate_key": f"key-{i}", "candidate": {"removed": [i]}, "macs": macs, "proxy_fid": fid,
                     "sample_grid_artifact": aid, "status": TrialStatus.OK.value}.items():
            trial.set_user_attr(k, v)
        study.tell(trial, [macs, fid])
        pngs[trial.number], uploaded[trial.number] = path.read_bytes(), aid
    rejected = study.ask()  # a candidate over budget: pruned, no values, no artifact
    rejected.set_user_attr("status", TrialStatus.REJECTED.value)
    rejected.set_user_attr("reason", "params over budget")
    study.tell(rejected, state=TrialState.PRUNED)

    dash = dashboard(cfg.storage_url(), cfg.artifacts_dir())
    summary = _study_by_name(dash, "dash")
    assert summary["directions"] == ["minimize", "minimize"]
    assert "config" in _attrs(summary["user_attrs"])  # the study's config, set by the workbench

    detail = dash.json(f"/api/studies/{summary['study_id']}")
    assert detail["name"] == "dash" and detail["directions"] == ["minimize", "minimize"]
    assert detail["objective_names"] == ["macs", "proxy_fid"]
    trials = {t["number"]: t for t in detail["trials"]}
    assert sorted(trials) == [0, 1, 2]
    assert [trials[n]["state"] for n in (0, 1, 2)] == ["Complete", "Complete", "Pruned"]
    assert trials[0]["values"] == [1.5e6, 12.25] and trials[1]["values"] == [9.0e5, 30.5]
    assert "values" not in trials[2]
    assert _attrs(trials[2]["user_attrs"]) == {"status": "rejected", "reason": "params over budget"}
    assert {t["number"] for t in detail["best_trials"]} == {0, 1}  # neither dominates the other

    for n, png in pngs.items():
        t = trials[n]
        attrs = _attrs(t["user_attrs"])
        assert attrs["status"] == "ok" and attrs["candidate_key"] == f"key-{n}"
        assert attrs["sample_grid_artifact"] == uploaded[n]
        assert float(attrs["macs"]) == t["values"][0] and float(attrs["proxy_fid"]) == t["values"][1]
        assert json.loads(attrs["candidate"]) == {"removed": [n]}
        assert [(a["artifact_id"], a["mimetype"]) for a in t["artifacts"]] == [(uploaded[n], "image/png")]
        status, body, ctype = dash.get(f"/artifacts/{summary['study_id']}/{t['trial_id']}/{uploaded[n]}")
        assert status == 200 and ctype == "image/png"
        assert body == png and body.startswith(b"\x89PNG\r\n\x1a\n")
    assert trials[2]["artifacts"] == []
    # an artifact asked for under another trial is not served
    wrong = dash.get(f"/artifacts/{summary['study_id']}/{trials[1]['trial_id']}/{uploaded[0]}")
    assert wrong[0] == 404


def test_dashboard_without_the_artifact_dir_lists_the_study_but_not_its_grids(tmp_path, dashboard):
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    study = optuna.create_study(study_name="bare", storage=url, direction="maximize")
    trial = study.ask()
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    aid = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(_grid_png(0, tmp_path / "g.png")),
                                           study_or_trial=trial, mimetype="image/png")
    study.tell(trial, 1.0)
    dash = dashboard(url, None)
    sid = _study_by_name(dash, "bare")["study_id"]
    served = dash.json(f"/api/studies/{sid}")["trials"][0]
    assert [a["artifact_id"] for a in served["artifacts"]] == [aid]  # listed from the storage ...
    assert dash.get(f"/artifacts/{sid}/{served['trial_id']}/{aid}")[0] == 400  # ... but not served
