"""The HTML report: content, common-normalisation hypervolumes, and a real headless browser."""

import re
import shutil
import subprocess

import numpy as np
import optuna
import pytest

from hybridsd_nas.study import build_report, feasible_trials, hypervolume, normaliser, pareto_front, run_study, study_from_dict

BASE = {"teacher": "tiny", "space": "layer-removal", "objectives": [{"metric": "macs"}, {"metric": "output_mse"}],
        "proxy": {"data_images": 32}, "trials": 6}


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{d / 'studies.db'}"
    out = []
    for name, sampler in (("budget-a", "random"), ("budget-b", "tpe")):
        cfg = study_from_dict({"name": name, **BASE, "sampler": {"name": sampler, "seed": 3},
                               "artifacts": str(d / "art")}, "<test>")
        run_study(cfg, storage=url, progress=False)
        out.append(optuna.load_study(study_name=name, storage=url))
    return d, out


@pytest.mark.slow
def test_report_compares_fronts_on_one_normalisation(two_studies):
    d, studies = two_studies
    page = build_report(studies, d / "r.html").read_text()
    assert "<script src=" not in page and "http://" not in page.split("<script>", 1)[0]
    directions = ["minimize", "minimize"]
    union = np.array([t.values for s in studies for t in feasible_trials(s)])
    scale = normaliser(union, directions)
    for s in studies:
        assert f"<td class='l'>{s.study_name}</td>" in page
        hv = hypervolume(np.array([t.values for t in pareto_front(s)]), directions, scale)
        assert f"<td>{hv:.4f}</td>" in page
        for t in pareto_front(s):
            assert t.user_attrs["candidate_key"] in page
    assert page.count("no samples stored") == sum(len(pareto_front(s)) for s in studies)  # cost-only: no grids
    assert len(re.findall(r"Plotly\.newPlot\(", page)) == 1  # two objectives: one scatter for both studies


@pytest.mark.slow
def test_report_draws_in_a_real_browser(two_studies):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: `apt-get install chromium` (scripts/bootstrap.sh does it)")
    d, studies = two_studies
    page = build_report(studies, d / "browser.html")
    p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                        "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert dom.count('class="main-svg"') >= 2  # plotly drew its SVG layers
    n_points = sum(len([t for t in feasible_trials(s)]) + len(pareto_front(s)) for s in studies)
    assert dom.count('class="point"') == n_points  # every feasible trial and every front member is a drawn marker
    assert "Uncaught" not in p.stderr and "Failed to load resource" not in p.stderr
