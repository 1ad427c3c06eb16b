import json

import pytest
import torch

from hybridsd_nas.arch import Candidate, candidate_preset, describe, instantiate, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.sources import unet_preset
from hybridsd_nas.core.errors import InvalidCandidateError

from .conftest import TINY_SD1, TINY_SDXL, real_inputs


def _effective(cfg):
    """A config as diffusers sees it (defaults filled in)."""
    return {k: v for k, v in instantiate(cfg).config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"])
def test_bk_candidates_equal_published_configs(name):
    arch = describe("sd-v1")
    p = plan(arch, candidate_preset(name, arch))
    assert p.expressible
    assert _effective(p.diffusers_config()) == _effective(unet_preset(name))


def test_describe_tiers_sd1():
    arch = describe("sd-v1")
    assert [b.name for b in arch.blocks] == ["down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3"]
    assert [len(b.layers) for b in arch.down] == [2, 2, 2, 2]
    assert [len(b.layers) for b in arch.up] == [3, 3, 3, 3]
    assert arch.down[0].layers[0].attn.heads == 8 and arch.down[0].layers[0].attn.head_dim == 40
    assert arch.down[3].layers[0].attn is None and arch.up[0].layers[0].attn is None
    assert arch.mid.layers[0].attn is not None and arch.mid.layers[1].attn is None
    assert arch.params == 859_520_964


def test_describe_sd2_and_sdxl():
    sd2 = describe("sd-v2")
    assert [b.layers[0].attn.heads for b in sd2.down[:3]] == [5, 10, 20]
    assert {b.layers[0].attn.head_dim for b in sd2.down[:3]} == {64}
    xl = describe("sdxl")
    assert xl.down[0].layers[0].attn is None
    assert [xl.down[1].layers[0].attn.depth, xl.down[2].layers[0].attn.depth, xl.mid.layers[0].attn.depth] == [2, 10, 10]
    assert xl.params == 2_567_463_684


def test_candidate_is_canonical_and_hash_stable():
    a = Candidate(drop_layers=["up1.1", "down0.1", "down0.1"], depth={"up1": 1}, name="x")
    b = Candidate.from_dict({"drop_layers": ["down0.1", "up1.1"], "depth": {"up1": 1}})
    assert a == b and a.key == b.key and hash(a) == hash(b)
    assert a.to_dict()["drop_layers"] == ["down0.1", "up1.1"]
    assert Candidate.from_dict(json.loads(a.to_json())) == a
    # the hash is part of the on-disk contract (caches and studies are keyed by it)
    assert Candidate().key == "afbf9d0f3560"
    assert a.key == "762206c67ca3"
    assert a.key != Candidate(drop_layers=["down0.1"]).key


def test_candidate_file_roundtrip(tmp_path):
    c = Candidate(drop_units=["down1.0.attn"], drop_mid=True, name="c1")
    (tmp_path / "c.json").write_text(c.to_json())
    (tmp_path / "c.yaml").write_text("drop_units: [down1.0.attn]\ndrop_mid: true\n")
    assert Candidate.load(tmp_path / "c.json") == c == Candidate.load(tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("drop_units: [down1.0.attn\n")
    with pytest.raises(Exception, match="cannot parse"):
        Candidate.load(tmp_path / "bad.yaml")
    with pytest.raises(InvalidCandidateError, match="unknown candidate key 'drop_block'"):
        Candidate.from_dict({"drop_block": ["mid"]})


@pytest.mark.parametrize(
    "cand, match",
    [
        (Candidate(drop_layers=["down7.1"]), "block 'down7' does not exist"),
        (Candidate(drop_layers=["down1.5"]), "down1 has no layer 5"),
        (Candidate(drop_layers=["up1.0", "up1.1", "up1.2"]), "up1: an up block needs at least one layer"),
        (Candidate(drop_layers=["down1.1"]), "skip connections no longer meet"),
        (Candidate(drop_layers=["down1.0"]), "down1: skip connections no longer meet at down1.1"),
        (Candidate(drop_units=["down1.0.resnet"]), "down1.0.resnet changes channels 32->64"),
        (Candidate(drop_units=["up1.0.resnet"]), "drop the whole layer up1.0"),
        (Candidate(drop_units=["down3.0.attn"]), "down3.0 has no Transformer unit"),
        (Candidate(depth={"down0.0": 2}), "depth can only shrink"),
        (Candidate(drop_stages=4), "at most 3 can be removed"),
        (Candidate(drop_stages=1, drop_layers=["down3.1"]), "drop_stages=1 removes"),
        (Candidate(drop_layers=["up3.2"]), "1 produced by the down path are never consumed \\(conv_in\\)"),
    ],
)
def test_impossible_candidates_are_rejected_before_build(cand, match):
    with pytest.raises(InvalidCandidateError, match=match):
        plan(describe(TINY_SD1), cand)


def test_noop_candidate_reproduces_teacher_exactly(tiny_sd1_teacher):
    arch = describe(TINY_SD1)
    x = real_inputs(TINY_SD1)
    with torch.no_grad():
        ref = tiny_sd1_teacher(**x).sample
        for surgery in (False, True):
            s = build_student(plan(arch, Candidate()), teacher=tiny_sd1_teacher, device="cpu", force_surgery=surgery)
            assert torch.equal(s(**x).sample, ref)


def test_bk_weight_mapping_follows_bk_sdm(tiny_sd1_teacher):
    arch = describe(TINY_SD1)
    t = tiny_sd1_teacher.state_dict()
    s = build_student(plan(arch, candidate_preset("bk-sdm-base", arch)), teacher=tiny_sd1_teacher, device="cpu").state_dict()
    # BK-SDM copy_weight_from_teacher: student up layer 1 <- teacher up layer 2
    assert torch.equal(s["up_blocks.1.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(s["up_blocks.1.attentions.1.proj_in.weight"], t["up_blocks.1.attentions.2.proj_in.weight"])
    assert torch.equal(s["down_blocks.2.resnets.0.conv1.weight"], t["down_blocks.2.resnets.0.conv1.weight"])
    tiny = build_student(plan(arch, candidate_preset("bk-sdm-tiny", arch)), teacher=tiny_sd1_teacher, device="cpu").state_dict()
    assert torch.equal(tiny["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert "down_blocks.2.downsamplers.0.conv.weight" not in tiny


@pytest.mark.parametrize(
    "cfg_name, cand",
    [("sd1", c) for c in [
        Candidate(drop_layers=["down0.1", "up3.1"]),
        Candidate(drop_mid=True),
        Candidate(drop_stages=1, drop_mid=True),
        Candidate(drop_stages=2, drop_mid=True, drop_layers=["down0.1", "up3.1"]),
    ]] + [("sdxl", c) for c in [
        Candidate(depth={"down2": 1, "up0": 1, "mid": 1}),
        Candidate(depth={"down1.1": 1, "up1.0": 1}),
        Candidate(drop_layers=["down1.1", "up1.1"], depth={"up0.2": 2}),
    ]],
)
def test_config_build_equals_surgery_build(cfg_name, cand, tiny_sd1_teacher, tiny_sdxl_teacher):
    cfg, teacher = (TINY_SD1, tiny_sd1_teacher) if cfg_name == "sd1" else (TINY_SDXL, tiny_sdxl_teacher)
    p = plan(describe(cfg), cand)
    assert p.expressible, p.config_reason
    a = build_student(p, teacher=teacher, device="cpu")
    b = build_student(p, teacher=teacher, device="cpu", force_surgery=True)
    x = real_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(a(**x).sample, b(**x).sample)
    from diffusers import UNet2DConditionModel

    assert isinstance(a, UNet2DConditionModel)


@pytest.mark.parametrize(
    "cand",
    [
        Candidate(drop_units=["down0.0.attn", "mid.0.attn", "up2.1.attn"]),
        Candidate(drop_units=["down1.1.resnet", "mid.1.resnet"]),
        Candidate(drop_layers=["mid.0"]),
        Candidate(drop_layers=["down0.1", "up3.2"], drop_units=["down0.0.attn"]),
        Candidate(depth={"down0.0": 0}),
    ],
)
def test_surgery_candidates_run_and_skip_what_they_say(cand, tiny_sd1_teacher):
    arch = describe(TINY_SD1)
    p = plan(arch, cand)
    assert not p.expressible and "surgery" in p.config_reason
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu")
    x = real_inputs(TINY_SD1)
    with torch.no_grad():
        out = s(**x).sample
    assert out.shape == x["sample"].shape and torch.isfinite(out).all()
    meta = build_student(p)
    assert sum(q.numel() for q in meta.parameters()) == sum(q.numel() for q in s.parameters())
    assert sum(q.numel() for q in s.parameters()) < arch.params


def test_dropped_attention_is_identity(tiny_sd1_teacher):
    """Removing a Transformer unit by surgery equals running the teacher with that unit bypassed."""
    import copy

    from hybridsd_nas.build import SkippedTransformer

    arch = describe(TINY_SD1)
    s = build_student(plan(arch, Candidate(drop_units=["down1.1.attn"])), teacher=tiny_sd1_teacher, device="cpu")
    manual = copy.deepcopy(tiny_sd1_teacher)
    manual.down_blocks[1].attentions[1] = SkippedTransformer()
    x = real_inputs(TINY_SD1)
    with torch.no_grad():
        assert torch.equal(s(**x).sample, manual(**x).sample)


def test_an_unnamed_candidate_is_labelled_by_its_structure_not_a_hash():
    from hybridsd_nas.arch import Candidate

    assert Candidate(drop_layers=("up2.0", "down1.1"), drop_mid=True).label == "-down1.1 -up2.0 -mid"
    c = Candidate(drop_units=("down2.0.attn",), depth={"up1": 2}, prune={"stage1": {"ff": 0.5}}, importance="taylor")
    assert c.label == "-down2.0.attn up1=2 prune[stage1: ff 0.5](taylor)"
    assert Candidate(base_blocks=("up3", "down0"), frozen=("up1",), drop_stages=1).label == "-stages1 base[down0,up3] frozen[up1]"
    assert Candidate().label == "identity" and Candidate(drop_mid=True, name="mine").label == "mine"
    long = Candidate(drop_layers=tuple(f"down{i}.{j}" for i in range(4) for j in range(2)) + tuple(f"up{i}.{j}" for i in range(4) for j in range(3)))
    assert len(long.label) <= 80 and long.label.endswith("…") and long.label.startswith("-down0.0 -down0.1")
