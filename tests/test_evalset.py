"""Evaluation sets for any teacher, and the scores that need a CLIP model."""

import json

import numpy as np
import pytest
import torch

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.data.evalset import load_eval_set, resolve_eval_set, teacher_eval_set
from hybridsd_nas.metrics.clip import ClipModel, cmmd, mmd
from hybridsd_nas.sources import resolve_teacher


def test_prompt_files_of_each_format(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na red car\n\na blue bird\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red car", "label": 3}\n\n{"prompt": "a blue bird", "class_index": 1}\n')
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a red car", "label": 3}, "a blue bird"]))
    txt, jsonl, js = (load_eval_set(tmp_path / f"p.{s}") for s in ("txt", "jsonl", "json"))
    assert txt.prompts == jsonl.prompts == js.prompts == ("a red car", "a blue bird")
    assert txt.labels == (None, None) and jsonl.labels == (3, 1) and js.labels == (3, None)
    assert jsonl.labelled and not js.labelled
    assert [r["prompt"] for r in txt.rows(5)] == ["a red car", "a blue bird"] * 2 + ["a red car"]
    assert [r["sample"] for r in txt.rows(3)] == [0, 1, 2]
    assert txt.fingerprint != jsonl.fingerprint


@pytest.mark.parametrize("content, suffix, match", [
    ("", ".txt", "the prompt file is empty"),
    ("# only a comment\n", ".txt", "the prompt file is empty"),
    ('{"text": "x"}\n', ".jsonl", "entry 1 has no \"prompt\""),
    ("{not json\n", ".jsonl", "p.jsonl:1: not JSON"),
    ('{"prompt": "x"}', ".json", "a .json prompt file is a list"),
    ('[{"prompt": "x", "label": "shoe"}]', ".json", "label must be an integer"),
    ("a prompt", ".csv", "is .txt, .jsonl, .json"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, suffix, match):
    f = tmp_path / f"p{suffix}"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        load_eval_set(f)
    assert "\n" not in str(e.value)


def test_a_classifier_needs_a_label_on_every_prompt(tmp_path):
    (tmp_path / "clf").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "label": 0}\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match="entry 2 has no label"):
        load_eval_set(tmp_path / "p.jsonl", classifier=tmp_path / "clf")
    with pytest.raises(ConfigError, match="does not exist"):
        load_eval_set(tmp_path / "missing.txt")


def test_the_embedded_teacher_ships_its_evaluation_set():
    es = teacher_eval_set(resolve_teacher("tiny"))
    assert len(es.prompts) == 20 and es.labelled
    assert es.classifier.endswith("eval_classifier") and es.real_reference == "fashion-mnist:test"


def test_a_teacher_without_an_evaluation_set_must_be_given_one(tmp_path):
    import shutil

    from hybridsd_nas.zoo import model_path

    bare = tmp_path / "bare"
    shutil.copytree(model_path("tiny"), bare, ignore=shutil.ignore_patterns("eval_*", "evaluation.json"))
    t = resolve_teacher(str(bare))
    assert teacher_eval_set(t) is None
    with pytest.raises(ConfigError, match="ships no evaluation prompts; name a prompt file"):
        resolve_eval_set(t)
    (tmp_path / "p.txt").write_text("a sneaker\n")
    assert resolve_eval_set(t, tmp_path / "p.txt").prompts == ("a sneaker",)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from hybridsd_nas.zoo.recipe import write_clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(d, ["a red car", "a blue bird", "a photo of a sneaker"])
    tok = CLIPTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                                  "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                     vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    return d


def test_clip_score_and_cmmd_from_a_local_clip_model(clip_dir):
    clip = ClipModel(clip_dir)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    b = np.clip(a.astype(int) + 120, 0, 255).astype(np.uint8)
    score = clip.clip_score(a, ["a red car"] * 6)
    assert 0.0 <= score <= 100.0
    assert cmmd(clip, a, a) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(clip, a, b) > 0.0
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-9) and mmd(x, -x) > 0


def test_a_folder_that_is_not_a_clip_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        ClipModel(tmp_path)


def test_proxy_and_sweep_refuse_a_teacher_without_evaluation_set_before_loading_it(tmp_path, capsys, monkeypatch):
    import shutil

    from hybridsd_nas.cli import main
    from hybridsd_nas.sources import teacher as teacher_module
    from hybridsd_nas.zoo import model_path

    bare = tmp_path / "bare"
    shutil.copytree(model_path("tiny"), bare, ignore=shutil.ignore_patterns("eval_*", "evaluation.json"))

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(teacher_module, "_load", no_loading)
    assert main(["proxy", "--teacher", str(bare), "--candidate", "bk-sdm-small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no training data of its own" in err[0] and "--data SPEC" in err[0]
    assert main(["proxy", "--teacher", str(bare), "--candidate", "bk-sdm-small", "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ships no evaluation prompts" in err[0] and "--eval-prompts" in err[0]
    assert main(["hybrid-sweep", "--teacher", str(bare), "--unets", "teacher", "bk-sdm-small", "--out", str(tmp_path / "o")]) == 2
    assert "ships no evaluation prompts" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["proxy", "--teacher", str(bare), "--candidate", "bk-sdm-small", "--data", "fashion-mnist",
                 "--eval-prompts", str(empty)]) == 2
    assert "empty.txt: the prompt file is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_study_names_its_evaluation_set_and_is_refused_what_it_cannot_measure(tmp_path):
    from hybridsd_nas.study import Evaluator, study_from_dict

    base = {"name": "e", "teacher": "tiny", "space": "layer-removal", "sampler": {"name": "random", "seed": 0}}
    with pytest.raises(ConfigError, match=r"<t>: eval_prompts: prompt file 'nope.txt' does not exist"):
        study_from_dict({**base, "objectives": ["macs"], "eval_prompts": "nope.txt"}, "<t>")
    with pytest.raises(ConfigError, match="classifier: needs eval_prompts"):
        study_from_dict({**base, "objectives": ["macs"], "classifier": str(tmp_path)}, "<t>")
    (tmp_path / "p.txt").write_text("a sneaker\na bag\n")
    cfg = study_from_dict({**base, "objectives": ["macs", "clip_score"], "eval_prompts": str(tmp_path / "p.txt")}, "<t>")
    assert cfg.proxy["eval_prompts"] == str(tmp_path / "p.txt")
    with pytest.raises(ConfigError, match="clip_score needs clip_model"):
        Evaluator(cfg)
    cfg = study_from_dict({**base, "objectives": ["macs", "adherence"], "eval_prompts": str(tmp_path / "p.txt")}, "<t>")
    with pytest.raises(ConfigError, match="adherence needs an adherence classifier"):
        Evaluator(cfg)
    own = study_from_dict({**base, "objectives": ["macs", "adherence", "fid_real"]}, "<t>")  # the embedded teacher's own set
    assert Evaluator(own).settings.eval_prompts is None


def test_an_exported_trial_records_what_its_quality_figures_were_measured_on():
    from hybridsd_nas.study import model_card
    from hybridsd_nas.study.outputs import export_extra

    prov = {"teacher": "me/sd", "teacher_fingerprint": "/snap@1234", "data": "folder /d, examples 0..55",
            "heldout": "folder /d, examples 56..63", "resolution": 512, "sampler": "DDIMScheduler", "sampler_steps": 25,
            "guidance": 7.5, "eval_set": {"source": "p.txt", "prompts": 4, "fingerprint": "ab12"}}
    row = {"trial": 3, "candidate_key": "k", "candidate": {"drop_layers": []}, "heldout_mse": 0.1, "provenance": prov}
    summary = {"study": "s", "config": {"teacher": "me/sd", "space": "layer-removal"}, "objectives": [], "constraints": []}
    cost = {"measured": {"resolution": 512, "batch": 1, "text_tokens": 77}, "params": 1, "macs": 2, "macs_conv_linear": 2}
    card = model_card(row, summary, cost)
    assert "fingerprint `/snap@1234`" in card and "held out for the ranking score: folder /d, examples 56..63" in card
    assert "evaluation set: `p.txt` (4 prompts" in card
    assert export_extra(row, summary)["provenance"] == prov
