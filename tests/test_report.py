"""The HTML report: content, common-normalisation hypervolumes, and a real headless browser."""

import html
import json
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
    # two objectives: one scatter for both studies, then the hypervolume against trials
    assert len(re.findall(r"Plotly\.newPlot\(", page)) == 2


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
    figs = page_figures(page.read_text())
    feas = trace(figs[0][0], "budget-a: feasible")
    assert len(feas["x"]) == len(feasible_trials(studies[0]))
    assert dom.count('class="point"') == n_markers(figs)  # every marker of every trace is drawn
    assert "Uncaught" not in p.stderr and "Failed to load resource" not in p.stderr


# -- hand-built studies: the page's content without running a model ------------------------------------

LAYERS = ("down1.0", "down1.1", "down2.0", "down2.1", "up1.0", "up1.1", "up2.0", "up2.1", "up3.0")
TEACHER = {"params": 3_600_000.0, "macs": 420_000_000.0, "macs_conv_linear": 380_000_000.0, "heldout_mse": 0.0,
           "output_mse": 0.0, "proxy_fid": 0.0}


def _candidate(i):
    """The i-th hand-made candidate (a few layers dropped): its dict, key and structure label."""
    from hybridsd_nas.arch import Candidate

    c = Candidate(drop_layers=tuple(LAYERS[j] for j in range(len(LAYERS)) if (i >> j) & 1), drop_mid=bool(i % 3 == 0))
    return c.to_dict(), c.key, c.label


def hand_study(tmp_path, name="hand", metrics=("macs", "heldout_mse"), directions=("minimize", "minimize"), n=14,
               fidelity=None, teacher=TEACHER, seed=0):
    """A study written straight into storage: ``n`` scored candidates (two of them enqueued presets,
    one infeasible, one a duplicate), one rejected by a MACs budget, one failed; with ``fidelity``
    the best half of the first rung also has a trial at the second rung (``promotion_of``)."""
    rng = np.random.default_rng(seed)
    st = optuna.create_study(directions=list(directions), study_name=name)  # in memory: writing trials to SQLite takes seconds
    st.set_metric_names(list(metrics))
    cfg = {"name": name, "teacher": "tiny", "space": "layer-removal", "sampler": "tpe", "seed": seed, "resolution": 32,
           "artifacts": str(tmp_path / "art"), "constraints": [{"metric": "heldout_mse", "max": 0.9}]}
    if fidelity:
        cfg["fidelity"] = fidelity
    st.set_user_attr("config", cfg)
    if teacher is not None:
        st.set_user_attr("teacher_figures", teacher)
    dist = {"i": optuna.distributions.IntDistribution(0, 10_000)}
    first = (fidelity or {}).get("rungs", [None])[0]

    def figures(i, shift=0.0):
        macs = int(4.2e8 * (0.25 + 0.7 * rng.random()))
        return {"macs": macs, "params": int(macs / 120), "macs_conv_linear": int(macs * 0.9), "latency_ms": macs / 2e7,
                "heldout_mse": float(0.05 + 0.5 * (4.2e8 - macs) / 4.2e8 + 0.1 * rng.random() - shift),
                "output_mse": float(0.2 + rng.random()), "proxy_fid": float(40 + 100 * rng.random()),
                "adherence": float(0.3 + 0.6 * macs / 4.2e8 * rng.random())}

    def add(i, status, figs, state=optuna.trial.TrialState.COMPLETE, **attrs):
        cand, key, label = _candidate(i)
        ua = {"status": status, "candidate": cand, "candidate_key": key, "label": attrs.get("enqueued_as") or label, **figs, **attrs}
        if first is not None:
            ua.setdefault("rung", first)
        values = [figs[m] for m in metrics] if state == optuna.trial.TrialState.COMPLETE else None
        st.add_trial(optuna.trial.create_trial(state=state, values=values, params={"i": i}, distributions=dist, user_attrs=ua))

    add(1, "ok", figures(1), enqueued_as="bk-sdm-small")
    add(2, "infeasible", {**figures(2), "heldout_mse": 1.4}, enqueued_as="bk-sdm-tiny", reason="heldout_mse = 1.4 breaks heldout_mse <= 0.9")
    for i in range(3, n + 1):
        add(i, "ok", figures(i))
    add(3, "duplicate", figures(3), duplicate_of=2)
    add(n + 1, "rejected", {"macs": int(4.0e8), "params": int(3.3e6)}, state=optuna.trial.TrialState.PRUNED,
        reason="macs = 4e+08 breaks macs <= 3.8e+08")
    add(n + 2, "failed", {"macs": int(2.0e8), "heldout_mse": 0.7, "output_mse": 0.5, "proxy_fid": 90.0},
        state=optuna.trial.TrialState.FAIL, reason="NaN in the distillation loss")
    if fidelity:  # the better half of the first rung continued to the second
        done = [t for t in st.get_trials() if t.user_attrs.get("status") == "ok"]
        done.sort(key=lambda t: t.values[-1])
        for t in done[: len(done) // 2]:
            figs = {m: t.user_attrs[m] for m in ("macs", "params", "macs_conv_linear", "latency_ms", "output_mse")}
            figs.update(heldout_mse=t.user_attrs["heldout_mse"] * 0.7, proxy_fid=t.user_attrs["proxy_fid"] * 0.8)
            extra = {k: t.user_attrs[k] for k in ("enqueued_as",) if k in t.user_attrs}
            add(t.params["i"], "ok", figs, rung=fidelity["rungs"][1], promotion_of=t.number, **extra)
    return st


def edit_summary(monkeypatch, edit):
    """Make the report read ``summarize()``'s output after ``edit(summary)`` has changed it in place."""
    import hybridsd_nas.study.report as report

    real = report.summarize

    def summarize(study, scale=None):
        s = real(study, scale=scale)
        edit(s)
        return s

    monkeypatch.setattr(report, "summarize", summarize)


def page_figures(page):
    """The (data, layout) of every plot on a page, in page order."""
    dec = json.JSONDecoder()
    out = []
    for m in re.finditer(r'Plotly\.newPlot\("[^"]+", ', page):
        data, end = dec.raw_decode(page, m.end())
        layout, _ = dec.raw_decode(page, end + 2)
        out.append((data, layout))
    return out


def page_body(page):
    """The page's HTML without the inlined plotly.js and the plot specs."""
    return page.split("</head>", 1)[1].rsplit("<script>", 1)[0]


def trace(data, name):
    return next(t for t in data if t.get("name") == name)


def test_two_objective_plot_names_axes_teacher_presets_and_toggles(tmp_path):
    st = hand_study(tmp_path)
    page = build_report([st], tmp_path / "r.html").read_text()
    figs = page_figures(page)
    assert len(figs) == 2  # the scatter, then hypervolume against trials
    data, layout = figs[0]
    assert layout["xaxis"]["title"]["text"] == "U-Net MACs (G, per forward at 32 px, lower is better)"
    assert layout["yaxis"]["title"]["text"] == "held-out MSE vs teacher (lower is better)"
    feas = trace(data, "feasible")
    assert max(feas["x"]) < 1  # MACs in G, as the title says
    assert len(feas["x"]) == len(feasible_trials(st))
    assert trace(data, "teacher")["x"] == [0.42] and trace(data, "teacher")["y"] == [0.0]
    assert trace(data, "teacher")["marker"]["symbol"] == "star"
    assert trace(data, "teacher")["hovertext"] == ["<b>teacher</b><br>params: 3.6 M<br>MACs: 0.42 G<br>conv+linear MACs: 0.38 G<br>"
                                                   "output MSE: 0<br>proxy FID: 0<br>held-out MSE: 0"]
    presets = trace(data, "presets")
    assert presets["text"] == ["bk-sdm-small"] and presets["marker"]["symbol"] == "square-open"
    grey = trace(data, "infeasible/rejected")
    assert grey["text"].count("bk-sdm-tiny") == 1 and len(grey["x"]) == 2  # the infeasible preset and the failed trial
    buttons = layout["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["all trials", "feasible only"]
    gi = data.index(grey)
    assert buttons[1]["args"] == [{"visible": False}, [gi]] and buttons[0]["args"] == [{"visible": True}, [gi]]
    # hover: name, trial, status, every figure in its unit, the key small; no rung in a study without rungs
    small = next(r for r in feas["hovertext"] if "bk-sdm-small" in r)
    assert small.startswith("<b>bk-sdm-small</b><br>trial 0 · ok<br>")
    for part in ("MACs: ", " G<br>", "params: ", " M<br>", "latency: ", " ms<br>", "held-out MSE: ", "proxy FID: ", "key "):
        assert part in small
    body = page_body(page)
    assert "rung" not in body.lower() and not any("rung" in json.dumps(d).lower() for d, _ in figs)
    # tables: readable names, the key only as a tooltip
    for t in pareto_front(st):
        key = t.user_attrs["candidate_key"]
        assert f"<td class='l' title='candidate key {key}'>{t.user_attrs['label']}</td>" in body
        assert f">{key}<" not in body.split("<details>", 1)[0]
    assert "'>MACs (G)</th>" in body and "<summary><b>" in body


def test_hypervolume_against_trials_ends_at_the_tables_value(tmp_path):
    a, b = hand_study(tmp_path, "hv-a", seed=1), hand_study(tmp_path, "hv-b", seed=2)
    page = build_report([a, b], tmp_path / "r.html").read_text()
    data, layout = page_figures(page)[1]
    assert layout["title"]["text"].startswith("hypervolume")
    assert layout["xaxis"]["title"]["text"] == "evaluated trials (in trial-number order)"
    union = np.array([t.values for s in (a, b) for t in feasible_trials(s)])
    scale = normaliser(union, ["minimize", "minimize"])
    for st in (a, b):
        tr = trace(data, st.study_name)
        hv = hypervolume(np.array([t.values for t in pareto_front(st)]), ["minimize", "minimize"], scale)
        assert tr["y"][-1] == pytest.approx(hv, abs=1e-12) and f"<td>{hv:.4f}</td>" in page
        assert tr["x"] == sorted(tr["x"]) and tr["x"][-1] == len(feasible_trials(st)) + 1  # + the infeasible preset
        assert all(y2 >= y1 for y1, y2 in zip(tr["y"], tr["y"][1:]))  # a front only grows
    assert trace(page_figures(page)[0][0], "teacher")  # one teacher, one star for both studies


def test_three_objectives_get_parallel_coordinates_and_pairwise_plots(tmp_path):
    st = hand_study(tmp_path, metrics=("macs", "params", "heldout_mse"), directions=("minimize",) * 3)
    page = build_report([st], tmp_path / "r.html").read_text()
    figs = page_figures(page)
    (pc,), _ = figs[0]
    assert pc["type"] == "parcoords"
    assert [d["label"] for d in pc["dimensions"]] == ["MACs (G) ↓", "params (M) ↓", "held-out MSE ↓"]
    assert len(pc["dimensions"][0]["values"]) == len(feasible_trials(st)) + 1  # + the teacher's line
    pairs = figs[1:4]
    assert [(lay["xaxis"]["title"]["text"].split(" (")[0], lay["yaxis"]["title"]["text"].split(" (")[0]) for _, lay in pairs] == [
        ("U-Net MACs", "U-Net parameters"), ("U-Net MACs", "held-out MSE vs teacher"), ("U-Net parameters", "held-out MSE vs teacher")]
    for data, lay in pairs:
        assert trace(data, "teacher") and trace(data, "presets")["text"] == ["bk-sdm-small"] and lay["updatemenus"]
    assert figs[4][1]["title"]["text"].startswith("hypervolume") and len(figs) == 5
    assert page.count("<div class='pairs'>") == 1


def test_teacher_that_cannot_be_placed_is_said_so(tmp_path):
    st = hand_study(tmp_path, metrics=("latency_ms", "heldout_mse"), teacher={"macs": 4.2e8, "heldout_mse": 0.0})
    page = build_report([st], tmp_path / "r.html").read_text()
    data, layout = page_figures(page)[0]
    assert not any(t.get("name") == "teacher" for t in data)
    assert "The teacher is not placed on this plot: no teacher figure for latency_ms." in page
    assert layout["xaxis"]["title"]["text"] == "U-Net latency (ms, per forward, lower is better)"
    none = hand_study(tmp_path, "no-teacher", teacher=None)
    assert "not recorded in no-teacher" in build_report([none], tmp_path / "n.html").read_text()


def test_one_objective_plots_trials_and_the_best_so_far(tmp_path):
    st = hand_study(tmp_path, metrics=("heldout_mse",), directions=("minimize",))
    data, layout = page_figures(build_report([st], tmp_path / "r.html").read_text())[0]
    assert layout["xaxis"]["title"]["text"] == "trial number"
    assert layout["yaxis"]["title"]["text"] == "held-out MSE vs teacher (lower is better)"
    best = trace(data, "best so far")["y"]
    assert best == sorted(best, reverse=True) and best[-1] == min(t.values[0] for t in feasible_trials(st))
    teacher = trace(data, "teacher")
    assert teacher["y"] == [0.0, 0.0] and teacher["line"]["dash"] == "dash"
    assert trace(data, "presets")["text"] == ["bk-sdm-small"]


def test_multi_fidelity_study_shows_rungs_and_audit(tmp_path, monkeypatch):
    fid = {"rungs": [40, 160], "promote": 0.5}
    st = hand_study(tmp_path, fidelity=fid)
    audit = {"metric": "heldout_mse", "possible": True, "n": 6, "kendall_tau": 0.333, "tau_interval_90": [-0.2, 0.8],
             "top_k": 3, "top_k_recall": 0.667, "first_rung": 40, "highest_rung": 160,
             "warning": "the first rung ranks the 6 candidates scored at both rungs at Kendall tau 0.33"}
    edit_summary(monkeypatch, lambda s: s.update(audit=audit))
    page = build_report([st], tmp_path / "r.html").read_text()
    body = page_body(page)
    assert "<th>rung (steps)</th>" in body
    assert "Trials scored per rung: 40 steps: 14 · 160 steps: 6 (promote 0.5 of each rung)." in body
    assert ("Rung audit of heldout_mse between 40 and 160 steps: Kendall tau 0.333 (90% interval -0.2 to 0.8), "
            "top-3 recall 0.667, over n = 6 candidates scored at both.") in body
    assert "<div class='warn'><b>Warning:</b> the first rung ranks the 6 candidates" in body
    data, _ = page_figures(page)[0]
    rung_of = {t.number: t.user_attrs["rung"] for t in st.get_trials()}
    front = trace(data, "Pareto front")["hovertext"]
    assert front and all(f"rung {rung_of[int(re.search('trial ([0-9]+)', h).group(1))]} steps" in h for h in front)
    assert any("rung 160 steps" in h for h in front)
    failed = next(h for h in trace(data, "infeasible/rejected")["hovertext"] if "failed" in h)
    assert "rung 40 steps" in failed and "params: " not in failed  # its sampled parameters are no parameter count
    rejected = re.search(r"<tr>(<td[^>]*>[^<]*</td>){2}<td>([^<]*)</td><td class='l'>rejected</td>", body)
    assert rejected and rejected.group(2) == ""  # rejected by a budget before distilling: no rung to speak of
    earlier = trace(data, "earlier rungs of promoted")
    assert len(earlier["x"]) == 6 and all("rung 40 steps" in h for h in earlier["hovertext"])

    none = {"possible": False, "n": 0, "reason": "no promotions yet", "warning": None}
    edit_summary(monkeypatch, lambda s: s.update(audit=none))
    body = page_body(build_report([st], tmp_path / "r2.html").read_text())
    assert "Rung audit: not possible: no promotions yet." in body and "class='warn'" not in body


def test_label_names_the_candidate_everywhere(tmp_path, monkeypatch):
    st = hand_study(tmp_path)
    edit_summary(monkeypatch, lambda s: [r.update(label=f"cand-{r['trial']}") for r in s["trials"] + s["front"]])
    page = build_report([st], tmp_path / "r.html").read_text()
    front = pareto_front(st)
    for t in front:
        assert f"title='candidate key {t.user_attrs['candidate_key']}'>cand-{t.number}</td>" in page
        assert f"<summary><b>cand-{t.number}</b> (trial {t.number})" in page
    data, _ = page_figures(page)[0]
    assert sorted(h.split("</b>")[0] for h in trace(data, "Pareto front")["hovertext"]) == sorted(f"<b>cand-{t.number}" for t in front)
    assert "bk-sdm-small" in trace(data, "presets")["text"]  # the preset's name on the plot stays the preset's


def n_markers(figs):
    """The markers the scatter traces of ``figs`` draw (one per point of a trace with markers)."""
    return sum(len(t["x"]) for data, _ in figs for t in data if t["type"] == "scatter" and "markers" in t.get("mode", ""))


def rendered(chromium, page):
    """The DOM of ``page`` after headless chromium ran its scripts, and chromium's log."""
    p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                        "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def svg_texts(dom, cls):
    """The text of every SVG ``<text class=cls>`` element plotly drew."""
    return [html.unescape(t) for t in re.findall(rf'<text class="{cls}"[^>]*>([^<]*)<', dom)]


@pytest.mark.slow  # chromium's start alone takes about 4 s here
def test_hand_built_report_draws_titles_teacher_presets_and_toggle_in_a_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: `apt-get install chromium` (scripts/bootstrap.sh does it)")
    st = hand_study(tmp_path, "drawn", n=20)
    page = build_report([st], tmp_path / "drawn.html")
    dom, log = rendered(chromium, page)
    assert "Uncaught" not in log and "Failed to load resource" not in log
    assert svg_texts(dom, "xtitle") == ["U-Net MACs (G, per forward at 32 px, lower is better)",
                                        "evaluated trials (in trial-number order)"]
    assert svg_texts(dom, "ytitle") == ["held-out MSE vs teacher (lower is better)", "hypervolume (higher is better)"]
    assert svg_texts(dom, "gtitle") == ["Pareto front: held-out MSE against MACs",
                                        "hypervolume of the feasible front as the study grew (normalised as in the table above)"]
    legend = svg_texts(dom, "legendtext")
    assert legend.count("teacher") == 1 and {"feasible", "Pareto front", "presets", "infeasible/rejected"} <= set(legend)
    points = re.findall(r'class="textpoint"[^>]*><text[^>]*>([^<]*)<', dom)
    assert sorted(points) == ["bk-sdm-small", "bk-sdm-tiny"]  # the feasible preset and the infeasible one, named on the plot
    assert svg_texts(dom, "updatemenu-item-text") == ["all trials", "feasible only"]
    assert dom.count('class="point"') == n_markers(page_figures(page.read_text()))


def test_without_labels_the_preset_name_then_the_key_names_a_candidate(tmp_path, monkeypatch):
    st = hand_study(tmp_path)
    edit_summary(monkeypatch, lambda s: [r.pop("label", None) for r in s["trials"] + s["front"]])
    body = page_body(build_report([st], tmp_path / "r.html").read_text())
    for t in st.get_trials():
        if t.user_attrs["status"] in ("ok", "infeasible"):
            key = t.user_attrs["candidate_key"]
            assert f"<td class='l' title='candidate key {key}'>{t.user_attrs.get('enqueued_as') or key}</td>" in body


@pytest.mark.parametrize("metrics,directions,shape", [(("macs", "adherence"), ("minimize", "maximize"), "hv"),
                                                      (("adherence", "macs"), ("maximize", "minimize"), "vh")])
def test_front_staircase_follows_the_directions(tmp_path, metrics, directions, shape):
    st = hand_study(tmp_path, metrics=metrics, directions=directions)
    data, layout = page_figures(build_report([st], tmp_path / "r.html").read_text())[0]
    front = trace(data, "Pareto front")
    assert front["line"]["shape"] == shape and front["x"] == sorted(front["x"])
    # a trade-off: along the front, one objective gets better as the other gets worse
    assert front["y"] == sorted(front["y"], reverse=directions[0] == directions[1])
    titles = {layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]}
    assert "prompt adherence (share of samples, higher is better)" in titles


def test_labels_of_neighbouring_presets_take_different_sides(tmp_path, monkeypatch):
    import hybridsd_nas.study.report as report

    st = hand_study(tmp_path)
    inner = report.summarize
    ok = sorted((t for t in feasible_trials(st)), key=lambda t: t.user_attrs["macs"])
    a, b = ok[4].number, ok[5].number  # neighbours in MACs

    def two_presets(study, scale=None):
        s = inner(study, scale=scale)
        for r in s["trials"] + s["front"]:
            r.pop("enqueued_as", None)
            if r["trial"] in (a, b):
                r["enqueued_as"] = r["label"] = f"preset-{r['trial']}"
                r["macs"] = 2.0e8  # the same point, so that the labels would cover each other
                r["heldout_mse"] = 0.3
        return s

    monkeypatch.setattr(report, "summarize", two_presets)
    data, _ = page_figures(build_report([st], tmp_path / "r.html").read_text())[0]
    presets = trace(data, "presets")
    assert sorted(presets["text"]) == sorted([f"preset-{a}", f"preset-{b}"])
    assert len(set(presets["textposition"])) == 2 and presets["cliponaxis"] is False
    assert data[-2] is presets  # drawn after every marker trace but the teacher: the labels stay readable
