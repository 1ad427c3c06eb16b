import json

import optuna
import pytest

from hybridsd_nas.arch import Candidate, candidate_preset, describe
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError, UnknownNameError
from hybridsd_nas.spaces import list_spaces, load_space, space_from_dict

from .conftest import TINY_SD1


@pytest.fixture(scope="module")
def sd1():
    return describe("sd-v1")


def test_every_declared_space_loads_and_has_points(sd1):
    assert set(list_spaces()) >= {"layer-removal", "recombination", "channel-pruning", "hybrid-schedule"}
    for name in list_spaces():
        sp = load_space(name)
        assert sp.version >= 1 and sp.description
        pts = list(sp.enumerate(sd1, limit=3)) if sp.is_discrete(sd1) else sp.sample(sd1, 3)
        assert len(pts) == 3


def test_layer_removal_contains_bk_sdm(sd1):
    sp = load_space("layer-removal")
    keys = {p.candidate.key for p in sp.enumerate(sd1)}
    assert len(keys) == sp.count(sd1) == 792
    for name in ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"):
        assert candidate_preset(name, sd1).key in keys


def test_recombination_contains_asdm_m1_to_m6(sd1):
    sp = load_space("recombination")
    pts = {p.candidate.key: p for p in sp.enumerate(sd1)}
    for i in range(1, 7):
        c = candidate_preset(f"asdm-m{i}", sd1)
        assert c.key in pts
    m1 = candidate_preset("asdm-m1", sd1)
    assert m1.base_blocks == ("down0", "up3") and "down1" in m1.frozen and "up3" not in m1.frozen
    assert pts[m1.key].params == {"stage0": "base", "stage1": "original", "stage2": "original", "stage3": "original",
                                  "mid": "original", "freeze": "original"}


@pytest.mark.slow
def test_enumerate_json_rows_are_accepted_as_candidates(tmp_path, capsys):
    names = ["layer-removal", "recombination", "hybrid-schedule", "channel-pruning"]
    for name in names:
        assert main(["space", "enumerate", name, "--limit", "2", "--json", "--teacher", "sd-v1"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["shown"] == 2 and len(out["candidates"]) == 2
        for i, row in enumerate(out["candidates"]):
            f = tmp_path / f"{name}-{i}.json"
            f.write_text(json.dumps(row))
            assert Candidate.load(f).key == row["key"]
            assert main(["cost", "--candidate", str(f), "--resolution", "64", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["candidate_key"] == row["key"]


def test_channel_pruning_space_counts_and_samples(sd1):
    sp = load_space("channel-pruning")
    assert sp.raw_size(sd1) == 4 ** 9  # 3 stages of BK-SDM-Tiny x 3 targets, 4 ratios each
    cont = space_from_dict({"name": "c", "version": 1, "kind": "channel-pruning",
                            "options": {"start": "bk-sdm-tiny", "ratio_range": [0.25, 1.0]}}, "<test>")
    assert not cont.is_discrete(sd1)
    pts = cont.sample(sd1, 4, seed=1)
    assert len({p.candidate.key for p in pts}) == 4
    assert all(p.candidate.drop_stages == 1 and p.candidate.prune for p in pts)


def test_space_suggest_with_optuna(sd1):
    sp = load_space("layer-removal")
    params = {"stage0": "d0|u0,2", "stage1": "d0|u0,2", "stage2": "d0|u0,2", "stage3": "d0|u0,2",
              "mid": "keep", "innermost_stage": "keep"}
    pt = sp.suggest(optuna.trial.FixedTrial(params), sd1)
    assert pt.candidate == candidate_preset("bk-sdm-base", sd1)


def test_spaces_work_on_other_bases():
    tiny = describe(TINY_SD1)
    assert load_space("layer-removal").count(tiny) > 10
    xl = describe("sdxl")
    sp = space_from_dict({"name": "x", "version": 1, "kind": "layer-removal", "options": {"depth": ["full", 1]}}, "<t>")
    assert "depth_stage2" in sp.dimensions(xl) and "depth_stage0" not in sp.dimensions(xl)


def test_bad_space_files_name_file_key_and_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nkind: layer-removal\noptions:\n  mid: [keep, drop\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d"):
        load_space(bad)
    bad.write_text("name: x\nversion: 1\nkind: layer-removal\noptions:\n  middle: [keep]\n")
    with pytest.raises(ConfigError, match="options.middle is not an option of a layer-removal space; allowed: mid, "):
        load_space(bad)
    bad.write_text("name: x\nversion: 1\nkind: block-shuffle\n")
    with pytest.raises(ConfigError, match="kind 'block-shuffle' is unknown; allowed: layer-removal"):
        load_space(bad)
    bad.write_text("name: x\nversion: 1\nkind: channel-pruning\noptions:\n  ratios: [0, 0.5]\n")
    with pytest.raises(ConfigError, match="options.ratios must be keep ratios"):
        load_space(bad)
    with pytest.raises(UnknownNameError, match="known: channel-pruning"):
        load_space("no-such-space")
