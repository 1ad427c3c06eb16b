import json

import pytest
import torch

from hybridsd_nas.export import load_unet
from hybridsd_nas.arch import Candidate, candidate_preset, describe, plan
from hybridsd_nas.build import apply_frozen, build_student
from hybridsd_nas.cli import main
from hybridsd_nas.export import export_unet

from .conftest import TINY_SD1, real_inputs


@pytest.fixture(scope="module")
def teacher_dir(tiny_sd1_dirs, tiny_sd1_teacher):
    return tiny_sd1_dirs / "pipe", tiny_sd1_teacher


def _out(model, x):
    with torch.no_grad():
        return model(**x).sample


def test_config_expressible_export_is_stock_diffusers(teacher_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    d, teacher = teacher_dir
    assert main(["prune", "--teacher", str(d), "--candidate", "bk-sdm-small", "--out", str(tmp_path / "small")]) == 0
    stock = UNet2DConditionModel.from_pretrained(tmp_path / "small")
    arch = describe(TINY_SD1)
    ref = build_student(plan(arch, candidate_preset("bk-sdm-small", arch)), teacher=teacher, device="cpu")
    x = real_inputs(TINY_SD1)
    assert torch.equal(_out(stock, x), _out(ref, x))
    meta = json.loads((tmp_path / "small" / "hybridsd_nas.json").read_text())
    assert meta["format"] == "diffusers" and meta["candidate"]["name"] == "bk-sdm-small"
    assert meta["teacher"] == str(d) and meta["cost"]["params"] == sum(q.numel() for q in stock.parameters())
    assert meta["hybridsd_nas_version"]


@pytest.mark.slow
def test_surgery_export_loads_back_exactly(teacher_dir, tmp_path):
    d, teacher = teacher_dir
    cand = Candidate(drop_units=["down1.1.attn", "mid.1.resnet"], depth={"up2.0": 0}, name="units")
    (tmp_path / "c.json").write_text(cand.to_json())
    assert main(["prune", "--teacher", str(d), "--candidate", str(tmp_path / "c.json"), "--out", str(tmp_path / "u")]) == 0
    loaded = load_unet(tmp_path / "u")
    ref = build_student(plan(describe(TINY_SD1), cand), teacher=teacher, device="cpu")
    x = real_inputs(TINY_SD1)
    assert torch.equal(_out(loaded, x), _out(ref, x))
    assert loaded.hybridsd_candidate == cand
    assert not list((tmp_path / "u").glob("*.bin")) and not list((tmp_path / "u").glob("*.pkl"))


@pytest.mark.slow
def test_recombination_takes_base_blocks_from_the_base(teacher_dir, tmp_path):
    d, teacher = teacher_dir
    arch = describe(TINY_SD1)
    base_p = plan(arch, candidate_preset("bk-sdm-base", arch))
    torch.manual_seed(5)
    base = build_student(base_p, device="cpu")  # a "trained" Base: weights unlike the teacher's
    base.save_pretrained(tmp_path / "base")
    assert main(["prune", "--teacher", str(d), "--candidate", "asdm-m1", "--out", str(tmp_path / "m1"),
                 "--base-unet", str(tmp_path / "base")]) == 0
    m1 = load_unet(tmp_path / "m1")
    sd, bsd, tsd = m1.state_dict(), base.state_dict(), teacher.state_dict()
    assert torch.equal(sd["down_blocks.0.resnets.0.conv1.weight"], bsd["down_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(sd["up_blocks.3.resnets.1.conv1.weight"], bsd["up_blocks.3.resnets.1.conv1.weight"])
    assert torch.equal(sd["down_blocks.1.resnets.1.conv1.weight"], tsd["down_blocks.1.resnets.1.conv1.weight"])
    frozen = apply_frozen(m1, plan(arch, m1.hybridsd_candidate))
    trainable = {n for n, q in m1.named_parameters() if q.requires_grad}
    assert trainable and all(n.startswith(("down_blocks.0.", "up_blocks.3.")) for n in trainable)
    assert any(n.startswith("mid_block.") for n in frozen) and any(n.startswith("conv_in.") for n in frozen)


def test_export_is_atomic(teacher_dir, tmp_path, monkeypatch):
    d, teacher = teacher_dir
    arch = describe(TINY_SD1)
    p = plan(arch, candidate_preset("bk-sdm-base", arch))
    student = build_student(p, teacher=teacher, device="cpu")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(student), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_unet(student, p, tmp_path / "x", teacher_id="t")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    export_unet(student, p, tmp_path / "x", teacher_id="t")
    with pytest.raises(Exception, match="already exists"):
        export_unet(student, p, tmp_path / "x", teacher_id="t")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["prune", "--teacher", "/no/dir", "--candidate", "bk-sdm-base", "--out", "o"], "unknown U-Net"),
        (["prune", "--teacher", "sd-v1", "--candidate", "bk-sdm-base", "--out", "o"], "config preset with no weights"),
    ],
)
def test_prune_bad_input(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_load_unet_errors(tmp_path):
    from hybridsd_nas.core.errors import ConfigError

    with pytest.raises(ConfigError, match="not a directory"):
        load_unet(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a hybridsd_nas export"):
        load_unet(tmp_path / "plain")


def test_channel_pruned_export_loads_back_exactly_and_costs_as_predicted(tiny_sd1_teacher, tmp_path):
    from hybridsd_nas.cost import estimate_cost

    arch = describe(TINY_SD1)
    cand = Candidate(drop_layers=candidate_preset("bk-sdm-base", arch).drop_layers,
                     prune={"all": {"resnet": 0.5, "heads": 0.5, "ff": 0.5}})
    p = plan(arch, cand)
    x = real_inputs(TINY_SD1)
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu",
                      prune_kwargs={"teacher": tiny_sd1_teacher, "example_inputs": x})
    predicted = estimate_cost(TINY_SD1, cand, resolution=128)
    assert sum(q.numel() for q in s.parameters()) == predicted.params < arch.params
    export_unet(s, p, tmp_path / "pruned", teacher_id="t")
    assert (tmp_path / "pruned" / "prune_record.json").is_file()
    loaded = load_unet(tmp_path / "pruned")
    assert torch.equal(_out(loaded, x), _out(s, x))
