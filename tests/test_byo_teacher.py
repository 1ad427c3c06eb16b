"""Bring your own teacher: experiments/byo_teacher.yaml end to end on a foreign pipeline and a folder."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from hybridsd_nas.data.synthetic import shapes_folder
from hybridsd_nas.zoo.recipe import build_random_pipeline

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green circle", "a blue bar", "a white cross"]


def foreign_pipeline(out: Path) -> Path:
    """A random-weight SD-1.x-topology pipeline that is not the embedded one: other widths, DDIM."""
    return build_random_pipeline(out, CAPTIONS)


@pytest.mark.slow
def test_the_byo_teacher_study_runs_end_to_end_on_a_foreign_pipeline_and_a_folder(tmp_path, monkeypatch):
    from hybridsd_nas.cli import main

    monkeypatch.setenv("HYBRIDSD_NAS_RESULTS", str(tmp_path / "runs"))
    pipe = foreign_pipeline(tmp_path)
    folder = shapes_folder(tmp_path / "data", 64, CAPTIONS)
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    cfg = yaml.safe_load((ROOT / "experiments" / "byo_teacher.yaml").read_text())
    assert cfg["teacher"].startswith("path/to") and cfg["data"].startswith("path/to")  # placeholders for the user
    cfg.update(teacher=str(pipe), data=str(folder), eval_prompts=str(tmp_path / "prompts.txt"), trials=3,
               proxy={"distill_steps": 2, "batch_size": 4, "samples": 4, "sampler_steps": 2, "heldout_latents": 8,
                      "kid_subset": 4, "seed": 0},
               storage=f"sqlite:///{tmp_path / 'study.db'}")
    study = tmp_path / "byo.yaml"
    study.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(study), "--quiet"]) == 0
    import optuna

    trials = optuna.load_study(study_name="byo-teacher", storage=cfg["storage"]).trials
    scored = [t for t in trials if t.user_attrs.get("status") == "ok"]
    assert len(scored) >= 2
    prov = scored[0].user_attrs["provenance"]
    assert prov["teacher"] == str(pipe) and prov["data_spec"]["kind"] == "folder"
    assert prov["data"].endswith("examples 0..55") and prov["heldout"].endswith("examples 56..63")
    assert prov["eval_set"]["source"] == str(tmp_path / "prompts.txt") and prov["sampler"] == "DDIMScheduler"
    for t in scored:
        assert np.isfinite(t.user_attrs["heldout_mse"]) and np.isfinite(t.user_attrs["proxy_fid"])
        assert "adherence" not in t.user_attrs  # no classifier named: not measured
    assert (tmp_path / "runs" / "byo-teacher").is_dir()


def test_a_foreign_teacher_without_data_or_eval_prompts_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from hybridsd_nas.cli import main
    from hybridsd_nas.sources import teacher as teacher_module

    pipe = foreign_pipeline(tmp_path)
    capsys.readouterr()  # what saving the pipeline printed
    monkeypatch.setattr(teacher_module, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = yaml.safe_load((ROOT / "experiments" / "byo_teacher.yaml").read_text())
    cfg.update(teacher=str(pipe), storage=f"sqlite:///{tmp_path / 'study.db'}")
    del cfg["data"]
    cfg["eval_prompts"] = str(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("a red square\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", str(tmp_path / "s.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no training data of its own" in err[0]
    cfg["data"] = str(tmp_path / "no-such-folder")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", str(tmp_path / "s.yaml"), "--quiet"]) == 2
    assert "no-such-folder" in capsys.readouterr().err
