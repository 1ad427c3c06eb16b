"""Hybrid schedules as study points: architecture (the small U-Net) and schedule searched jointly."""

import json

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.study import Evaluator, load_or_create_study, open_storage, pareto_front, run_study, study_from_dict

SHORT_PROXY = {"distill_steps": 3, "batch_size": 4, "data_images": 32, "samples": 4, "sampler_steps": 4,
               "reference_images": 16, "kid_subset": 4}


def _space(tmp_path):
    p = tmp_path / "hybrid4.yaml"
    p.write_text(yaml.safe_dump({"name": "hybrid4", "version": 1, "kind": "hybrid-schedule", "description": "4 steps",
                                 "options": {"steps": 4, "switch_every": 2, "orders": ["large-first", "small-first"],
                                             "small": ["bk-sdm-tiny", "bk-sdm-small"]}}))
    return str(p)


def _cfg(tmp_path, **kw):
    d = {"name": "hyb", "teacher": "tiny", "space": _space(tmp_path),
         "objectives": [{"metric": "proxy_fid"}, {"metric": "cloud_share"}], "sampler": {"name": "random", "seed": 0},
         "proxy": SHORT_PROXY, "artifacts": str(tmp_path / "artifacts"), **kw}
    return study_from_dict(d, "<test>")


def test_hybrid_metrics_need_a_hybrid_space(tmp_path):
    cfg = study_from_dict({"name": "x", "teacher": "tiny", "space": "layer-removal",
                           "objectives": [{"metric": "macs"}, {"metric": "cloud_share"}]}, "<test>")
    with pytest.raises(ConfigError, match="cloud_share is a figure of hybrid schedules; it needs a hybrid-schedule space"):
        Evaluator(cfg)
    bad = _cfg(tmp_path, constraints=[{"metric": "cloud_share", "max": 0.5, "of": "teacher"}])
    with pytest.raises(ConfigError, match="cloud_share takes no 'of: teacher'"):
        Evaluator(bad)
    with pytest.raises(ConfigError, match="hybrid-schedule space \\(leave enqueue out\\)"):
        Evaluator(_cfg(tmp_path, enqueue=["bk-sdm-tiny"]))
    with pytest.raises(ConfigError, match="heldout_mse is a figure of one distilled U-Net; a hybrid-schedule space is ranked"):
        Evaluator(_cfg(tmp_path, objectives=[{"metric": "heldout_mse"}, {"metric": "cloud_share"}]))


def _expected_share(large_steps: int, total: int) -> float:
    """The cloud share by hand: guided U-Net steps (batch 2) of the teacher on the cloud plus the text
    encoder (cond + uncond) over the same with every step on the cloud plus the decoder."""
    from pathlib import Path

    from hybridsd_nas.cost import estimate_cost
    from hybridsd_nas.cost.pipeline import decoder_macs, text_encoder_macs
    from hybridsd_nas.sources import pipeline_path

    root = Path(pipeline_path("tiny"))
    m = estimate_cost("tiny", "identity").macs
    te = 2 * text_encoder_macs(json.loads((root / "text_encoder" / "config.json").read_text()))
    vae = json.loads((root / "vae" / "config.json").read_text())
    dec = decoder_macs({k: v for k, v in vae.items() if not k.startswith("_")}, (16, 16))
    return (large_steps * 2 * m + te) / (total * 2 * m + te + dec)


@pytest.mark.slow
def test_a_hybrid_study_scores_schedules_and_reuses_each_small_unet(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    cfg = _cfg(tmp_path, trials=4, constraints=[{"metric": "cloud_share", "max": 0.9}])
    study = load_or_create_study(cfg, open_storage(cfg, url))
    # the teacher alone, two halves in both orders with one small U-Net, and one over the budget
    for params in ({"order": "large-first", "switch": 2, "small": "bk-sdm-tiny"},
                   {"order": "small-first", "switch": 2, "small": "bk-sdm-tiny"},
                   {"order": "large-first", "switch": 4, "small": "bk-sdm-tiny"},
                   {"order": "large-first", "switch": 0, "small": "bk-sdm-tiny"},
                   {"order": "small-first", "switch": 4, "small": "bk-sdm-small"}):
        study.enqueue_trial(params)
    res = run_study(cfg, storage=url, progress=False)
    assert res["evaluated"] == 4, res
    trials = optuna.load_study(study_name="hyb", storage=url).get_trials()
    t_half, t_half_rev, t_teacher, t_small = trials[:4]
    # cost: the hand-computed cloud share, before any proxy work for the one over the budget
    assert t_half.user_attrs["cloud_share"] == pytest.approx(_expected_share(2, 4), rel=1e-9)
    assert t_half_rev.user_attrs["cloud_share"] == pytest.approx(_expected_share(2, 4), rel=1e-9)
    assert t_teacher.state == TrialState.PRUNED and t_teacher.user_attrs["status"] == "rejected"
    assert t_teacher.user_attrs["cloud_share"] == pytest.approx(_expected_share(4, 4), rel=1e-9)
    assert t_teacher.user_attrs["cloud_share"] > 0.9 and "proxy_seconds" not in t_teacher.user_attrs["timings"]
    assert t_small.user_attrs["cloud_share"] == pytest.approx(_expected_share(0, 4), rel=1e-9)
    assert t_small.user_attrs["edge_macs"] > t_half.user_attrs["edge_macs"] > 0
    # the same small U-Net serves every schedule: distilled once, in the first trial that needed it
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len({t.user_attrs["candidate_key"] for t in done}) == len(done) == 4
    tiny = [t for t in done if t.params["small"] == "bk-sdm-tiny"]
    assert tiny[0].user_attrs["timings"]["distill_seconds"] > 0
    assert all(t.user_attrs["timings"].get("distill_seconds", 0) == 0 for t in tiny[1:])
    assert all(t.user_attrs["schedule"]["total_steps"] == 4 and t.user_attrs["proxy_fid"] >= 0 for t in done)
    # large-first and small-first halves are different runs with different samples
    assert t_half.user_attrs["proxy_fid"] != t_half_rev.user_attrs["proxy_fid"]
    assert {t.number for t in pareto_front(optuna.load_study(study_name="hyb", storage=url))} <= {t.number for t in done}
