"""The closed-form cost model equals the traced count, integer for integer, and says where it stops."""

import dataclasses
import json

import pytest

from hybridsd_nas.arch import CANDIDATE_PRESETS, Candidate, describe, plan, resolve_candidate
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import InvalidCandidateError, UnknownNameError
from hybridsd_nas.cost import NotAnalyticError, analytic_count, analytic_support, estimate_cost
from hybridsd_nas.spaces import list_spaces, load_space, space_from_dict

from .conftest import TINY_SD1, TINY_SDXL

_ARCHS: dict[str, object] = {}


def _arch(spec):
    key = json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else spec
    if key not in _ARCHS:
        _ARCHS[key] = describe(spec)
    return _ARCHS[key]


def _figures(r):
    return r.params, r.macs, r.macs_conv_linear, r.breakdown, r.by_block


def assert_exact(spec, cand, **kw):
    """Analytic and traced agree on every figure, the per-block breakdown included."""
    arch = _arch(spec)
    a = estimate_cost(spec, cand, arch=arch, by_block=True, method="analytic", **kw)
    t = estimate_cost(spec, cand, arch=arch, by_block=True, method="traced", **kw)
    assert a.method == "analytic" and t.method == "traced"
    assert _figures(a) == _figures(t), f"{cand.to_dict() if isinstance(cand, Candidate) else cand} on {arch.source}"


def _presets(spec):
    arch = _arch(spec)
    out = []
    for name in CANDIDATE_PRESETS.names():
        try:
            plan(arch, resolve_candidate(name, arch))
        except InvalidCandidateError:  # e.g. A-SDM's blocks on a base with fewer stages
            continue
        out.append(name)
    return out


# -- every candidate preset on every base ------------------------------------------------------------
@pytest.mark.slow  # ten full-size presets traced; the fast lane keeps random candidates of each space
def test_every_preset_is_exact_on_full_size_sd_v1():
    names = _presets("sd-v1")
    assert len(names) == len(CANDIDATE_PRESETS.names())
    for name in names:
        assert_exact("sd-v1", name, resolution=512)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tiny", "sd-v2", "sdxl", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", TINY_SD1, TINY_SDXL],
                         ids=["tiny", "sd-v2", "sdxl", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "tiny-sd1", "tiny-sdxl"])
def test_every_preset_is_exact_on_the_other_bases(spec):
    names = _presets(spec)
    assert "identity" in names and "bk-sdm-base" in names
    for name in names:
        assert_exact(spec, name)


# -- random candidates of every shipped space, full-size SD-1.x at 512 px ---------------------------
def _distinct_sample(name, n, seed):
    """``n`` distinct random candidates of a space on SD-1.x (all of them where it has fewer)."""
    pts = load_space(name).sample(_arch("sd-v1"), 3 * n, seed=seed)
    return list({p.candidate.key: p.candidate for p in pts}.values())[:n]


@pytest.mark.parametrize("space", sorted(list_spaces()))
def test_random_candidates_of_each_space_are_exact(space):
    for cand in _distinct_sample(space, 3, seed=1):
        assert_exact("sd-v1", cand, resolution=512)


@pytest.mark.slow
@pytest.mark.parametrize("space", sorted(list_spaces()))
def test_20_random_candidates_of_each_space_are_exact(space):
    # 200 per space: benchmarks/bench_cost_analytic.py --per-space 200 (results/bench_cost_analytic_200.md)
    for cand in _distinct_sample(space, 20, seed=0):  # hybrid-schedule has fewer: all of them
        assert_exact("sd-v1", cand, resolution=512)


@pytest.mark.slow
def test_sdxl_spaces_with_depth_and_pruning_are_exact():
    arch = _arch("sdxl")
    depth = space_from_dict({"name": "d", "version": 1, "kind": "layer-removal", "options": {"depth": ["full", 1, 2]}}, "<test>")
    prune = space_from_dict({"name": "p", "version": 1, "kind": "channel-pruning", "options": {"start": "identity"}}, "<test>")
    for sp in (depth, prune):
        for p in sp.sample(arch, 6, seed=3):
            assert_exact("sdxl", p.candidate)


# -- what the presets and spaces do not reach: units, depth, pruning mixes, odd latents, batches ------
UNIT_MIX = Candidate(drop_units=["down1.0.attn", "mid.1.resnet", "down0.1.resnet"], depth={"up1": 0, "up2.1": 0},
                     prune={"all": {"resnet": 0.3, "heads": 0.5, "ff": 0.4}, "stage0": {"resnet": 0.75}})


SDXL_MIX = Candidate(drop_units=["down1.1.attn"], depth={"down2.0": 1, "up0": 2},
                     prune={"stage2": {"heads": 0.25, "ff": 0.5}, "mid": {"resnet": 0.5}})


@pytest.mark.parametrize("config, cand, resolution, batch, text_len", [
    (TINY_SD1, UNIT_MIX, 72, 2, 5),
    (TINY_SDXL, SDXL_MIX, 136, 3, 9),
    (TINY_SDXL, Candidate(drop_stages=1, drop_mid=True, depth={"down1": 1}), 72, 1, 77),
], ids=["sd1-units", "sdxl-units", "sdxl-stage"])
def test_units_depth_and_pruning_at_odd_latents_and_batches(config, cand, resolution, batch, text_len):
    assert_exact(config, cand, resolution=resolution, batch=batch, text_len=text_len)


@pytest.mark.parametrize("extra", [
    {"resnet_time_scale_shift": "scale_shift"},
    {"downsample_padding": 0},
    {"conv_in_kernel": 5, "conv_out_kernel": 1},
    {"time_embedding_dim": 96},
    {"use_linear_projection": True, "transformer_layers_per_block": [1, 2, 2, 1]},
], ids=["scale-shift", "padding-0", "kernels", "temb-dim", "linear-deep"])
def test_config_variants_are_exact(extra):
    cand = UNIT_MIX if "transformer_layers_per_block" not in extra else Candidate(depth={"down2.1": 1}, prune={"stage1": {"heads": 0.5}})
    for res in (104, 72) if "downsample_padding" in extra else (72,):  # latents 13 and 9: every size odd somewhere
        assert_exact({**TINY_SD1, **extra}, cand, resolution=res)


def test_mid_heads_follow_the_cut_config():
    """Dropping a stage cuts a stock config's head list, and diffusers gives the mid block the last
    entry: 4 heads of 16 here where the base's mid has 8 of 8; heads pruning then keeps 1 of 4."""
    cfg = {**TINY_SD1, "attention_head_dim": [2, 4, 4, 8]}
    assert_exact(cfg, Candidate(drop_stages=1, prune={"mid": {"heads": 0.1}}), resolution=64)
    assert_exact(cfg, Candidate(drop_stages=1, drop_units=["up1.0.attn"], prune={"mid": {"heads": 0.1}}), resolution=64)


# -- where it stops ------------------------------------------------------------------------------------
LCM = {**TINY_SD1, "time_cond_proj_dim": 8}  # a timestep-condition projection: params that forward leaves unused


def test_unmodelled_config_falls_back_to_tracing_and_says_why():
    arch = _arch(LCM)
    assert "time_cond_proj_dim" in analytic_support(arch)
    r = estimate_cost(LCM, "bk-sdm-base", arch=arch)
    assert r.method == "traced" and "time_cond_proj_dim" in r.method_reason
    d = r.to_dict()
    assert d["method"] == "traced" and "not modelled" in d["method_reason"]
    t = estimate_cost(LCM, "bk-sdm-base", arch=arch, method="traced")
    assert (r.params, r.macs, r.macs_conv_linear) == (t.params, t.macs, t.macs_conv_linear) and t.method_reason is None
    with pytest.raises(NotAnalyticError, match="time_cond_proj_dim"):
        estimate_cost(LCM, "bk-sdm-base", arch=arch, method="analytic")


def test_a_module_the_closed_form_misreads_is_refused():
    """The parameter check against the modules ``describe`` read catches a variant the config check
    lets through (simulated: one unit reports a parameter more)."""
    arch = describe(TINY_SD1)
    blk = arch.down[1]
    r = blk.layers[0].resnet
    layer = dataclasses.replace(blk.layers[0], resnet=dataclasses.replace(r, params=r.params + 1))
    down = (arch.down[0], dataclasses.replace(blk, layers=(layer, *blk.layers[1:])), *arch.down[2:])
    odd = dataclasses.replace(arch, down=down)
    assert analytic_support(arch) is None
    assert "down1.0.resnet" in analytic_support(odd) and "closed form gives" in analytic_support(odd)
    with pytest.raises(NotAnalyticError):
        analytic_count(plan(odd, Candidate()), 128)


def test_default_is_analytic_and_unknown_method_is_refused():
    r = estimate_cost("sd-v1", "bk-sdm-small", resolution=512)
    assert r.method == "analytic" and r.method_reason is None and "closed form" in r.measured["method"]
    assert r.to_dict()["method"] == "analytic"
    with pytest.raises(UnknownNameError, match="count method"):
        estimate_cost("sd-v1", method="exact")


def test_no_model_is_built_unless_latency_needs_one(monkeypatch):
    import hybridsd_nas.cost.engine as engine

    built = []
    real_build = engine.build_student
    monkeypatch.setattr(engine, "build_student", lambda p: built.append(p) or real_build(p))

    class Stats:
        median_ms = 1.0

        def as_dict(self):
            return {"device": "cpu", "dtype": "float32"}

    monkeypatch.setattr(engine, "measure_latency", lambda *a, **k: Stats())
    r = estimate_cost(TINY_SD1, "bk-sdm-tiny", resolution=64)
    assert r.method == "analytic" and not built
    r = estimate_cost(TINY_SD1, "bk-sdm-tiny", resolution=64, latency="measure")
    assert r.method == "analytic" and len(built) == 1 and r.latency_ms == 1.0


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cost_cli_method(capsys):
    assert main(["cost", "--candidate", "bk-sdm-tiny", "--resolution", "256", "--method", "traced", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert main(["cost", "--candidate", "bk-sdm-tiny", "--resolution", "256", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert (t["method"], a["method"]) == ("traced", "analytic")
    assert (a["params"], a["macs"], a["macs_conv_linear"]) == (t["params"], t["macs"], t["macs_conv_linear"])
    assert main(["cost", "--candidate", "bk-sdm-tiny", "--resolution", "256"]) == 0
    assert "closed form" in capsys.readouterr().out


def test_cost_cli_analytic_on_an_unmodelled_base_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(LCM))
    assert main(["cost", "--teacher", str(f), "--method", "analytic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "time_cond_proj_dim" in err
    assert main(["cost", "--teacher", str(f)]) == 0
    assert "counted by tracing" in capsys.readouterr().out


def test_space_enumerate_with_cost(capsys):
    assert main(["space", "enumerate", "layer-removal", "--limit", "3", "--with-cost", "--resolution", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cost_measured"] == {"resolution": 512, "batch": 1, "text_tokens": 77}
    arch = _arch("sd-v1")
    for row in out["candidates"][:2]:
        t = estimate_cost("sd-v1", Candidate.from_dict(row["candidate"]), resolution=512, arch=arch, method="traced")
        assert row["cost"] == {"params": t.params, "macs": t.macs, "macs_conv_linear": t.macs_conv_linear, "method": "analytic"}
        assert isinstance(row["params"], dict)  # the space's choices stay where they were
    assert main(["space", "enumerate", "channel-pruning", "--limit", "2", "--with-cost"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["key", "params"] and "MACs (G)" in lines[0] and "MACs c+l (G)" in lines[0]
    for line, p in zip(lines[1:3], load_space("channel-pruning").enumerate(arch, limit=2)):
        t = estimate_cost("sd-v1", p.candidate, arch=arch, method="traced")
        assert line.split()[:4] == [p.candidate.key, f"{t.params / 1e6:.2f}", f"{t.macs / 1e9:.2f}", f"{t.macs_conv_linear / 1e9:.2f}"]
    assert main(["space", "enumerate", "layer-removal", "--limit", "1", "--resolution", "512"]) == 2
    assert "--with-cost" in capsys.readouterr().err
