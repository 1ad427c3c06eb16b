"""Channel pruning: exactness at ratio 1, head split, masking equivalence, exact cost prediction,
replay, importance criteria, rounding and errors. Tiny configs, seconds each on a CPU."""

import copy
import json

import pytest
import torch
import torch_pruning as tp

from hybridsd_nas.arch import Candidate, candidate_preset, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.cost import count_macs, estimate_cost, unet_inputs
from hybridsd_nas.core.errors import ConfigError, HybridSDError, UnknownNameError
from hybridsd_nas.prune import (
    IMPORTANCE,
    TARGETS,
    PruneRecord,
    collect_groups,
    keep_count,
    masking,
    prune_student,
    replay,
)

from .conftest import TINY_SD1, TINY_SDXL, real_inputs

ARCH = describe(TINY_SD1)


def attn_modules(model):
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def build(weights, cand, config=TINY_SD1, **kw):
    arch = ARCH if config is TINY_SD1 else describe(config)
    return build_student(plan(arch, cand), teacher=weights, device="cpu", prune_kwargs=kw or None)


def out(model, x):
    with torch.no_grad():
        return model(**x).sample


# -- ratio 1 -------------------------------------------------------------------------------
def test_ratio_one_is_the_unpruned_student(tiny_sd1_teacher):
    x = real_inputs(TINY_SD1)
    ones = Candidate(prune={"all": {"resnet": 1.0, "heads": 1.0, "ff": 1.0}})
    assert not ones.prune  # nothing to cut
    assert torch.equal(out(build(tiny_sd1_teacher, ones), x), out(tiny_sd1_teacher, x))
    # a ratio below 1 that rounds to every unit cuts nothing: bit-identical, and the record says so
    near = Candidate(prune={"all": {"resnet": 0.99, "heads": 0.99, "ff": 0.999}})
    s = build(tiny_sd1_teacher, near)
    assert torch.equal(out(s, x), out(tiny_sd1_teacher, x))
    summ = s.hybridsd_prune_record.summary()
    assert summ["stage0"]["resnet"]["asked"] == 0.99 and summ["stage0"]["resnet"]["done"] == 1.0
    assert sum(t.numel() for t in s.parameters()) == sum(t.numel() for t in tiny_sd1_teacher.parameters())


# -- every target and ratio: head split, GroupNorm, and "pruning == masking" ----------------
@pytest.mark.parametrize("target", ["resnet", "heads", "ff"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruned_equals_masked_unpruned(tiny_sd1_teacher, target, ratio):
    x = real_inputs(TINY_SD1)
    cand = Candidate(prune={"all": {target: ratio}})
    s = build(tiny_sd1_teacher, cand)
    rec = s.hybridsd_prune_record
    assert rec.groups and all(g.target == target for g in rec.groups)
    for g in rec.groups:
        assert g.kept == keep_count(ratio, g.units) == len(g.keep)
    base_attn = dict(attn_modules(tiny_sd1_teacher))
    for name, a in attn_modules(s):
        head_dim = base_attn[name].to_q.out_features // base_attn[name].heads
        assert a.heads * head_dim == a.to_q.out_features == a.to_k.out_features == a.to_out[0].in_features
        if target == "heads":
            assert a.heads == keep_count(ratio, base_attn[name].heads) < base_attn[name].heads
    if target == "resnet":
        for g in rec.groups:
            r = s.get_submodule(g.path)
            assert r.norm2.num_groups == g.kept and r.norm2.num_channels == g.kept * g.unit_channels
            assert r.conv1.in_channels == r.norm1.num_channels and r.conv2.out_channels == r.out_channels  # block widths kept
    y = out(s, x)
    assert y.shape == x["sample"].shape
    with masking(tiny_sd1_teacher, rec):
        ref = out(tiny_sd1_teacher, x)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-4), float((y - ref).abs().max())
    assert not torch.allclose(y, out(tiny_sd1_teacher, x), atol=1e-3)  # something was really cut


def test_attention_head_split_by_hand(tiny_sd1_teacher):
    """One pruned attention module against the attention formula written out by hand."""
    s = build(tiny_sd1_teacher, Candidate(prune={"stage1": {"heads": 0.5}}))
    _, a = next((n, m) for n, m in attn_modules(s) if n.startswith("down_blocks.1") and "attn2" in n)
    torch.manual_seed(3)
    h = torch.randn(2, 5, a.query_dim)
    ctx = torch.randn(2, 7, a.cross_attention_dim)

    def by_hand(heads):
        q, k, v = a.to_q(h), a.to_k(ctx), a.to_v(ctx)
        d = q.shape[-1] // heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, -1)
        o = (w @ split(v)).transpose(1, 2).reshape(h.shape[0], h.shape[1], heads * d)
        return a.to_out[0](o)

    with torch.no_grad():
        got = a(h, encoder_hidden_states=ctx)
        assert a.heads == 2
        assert torch.allclose(got, by_hand(2), atol=1e-5)
        assert not torch.allclose(got, by_hand(4), atol=1e-3)  # the stale split would differ


# -- cost engine predicts the really pruned model exactly ------------------------------------
def _real_counts(model, config):
    meta = copy.deepcopy(model).to("meta")
    mc = count_macs(meta, unet_inputs(config, config["sample_size"] * 8, 1, 77, 8))
    return sum(t.numel() for t in model.parameters()), mc.macs, mc.macs_conv_linear


PRUNE_MIX = {"stage0": {"resnet": 0.25, "heads": 0.75}, "mid": {"heads": 0.25, "ff": 0.5}, "all": {"resnet": 0.5, "ff": 0.75, "heads": 0.5}}


@pytest.mark.parametrize("start", ["identity", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "units"])
@pytest.mark.slow
def test_params_and_macs_equal_the_cost_engine(tiny_sd1_teacher, start):
    if start == "units":
        s0 = Candidate(drop_units=("down1.1.attn", "mid.0.attn"), depth=(("up1", 1),))
    else:
        s0 = candidate_preset(start, ARCH)
    prune = {k: v for k, v in PRUNE_MIX.items() if not (k == "mid" and (s0.drop_mid or "mid.0.attn" in s0.drop_units))}
    cand = Candidate(drop_layers=s0.drop_layers, drop_units=s0.drop_units, drop_mid=s0.drop_mid, drop_stages=s0.drop_stages,
                     depth=s0.depth, prune=prune)
    s = build(tiny_sd1_teacher, cand)
    c = estimate_cost(TINY_SD1, cand)
    assert _real_counts(s, TINY_SD1) == (c.params, c.macs, c.macs_conv_linear)
    unpruned = estimate_cost(TINY_SD1, s0)
    assert c.params < unpruned.params and c.macs < unpruned.macs
    # and the meta build has the very shapes of the real one
    meta = build_student(plan(ARCH, cand))
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == {k: tuple(v.shape) for k, v in s.state_dict().items()}


@pytest.mark.slow
def test_sdxl_style_pruning_matches_cost(tiny_sdxl_teacher):
    cand = Candidate(prune={"all": {"resnet": 0.5, "heads": 0.5, "ff": 0.25}})
    s = build(tiny_sdxl_teacher, cand, config=TINY_SDXL)
    c = estimate_cost(TINY_SDXL, cand)
    assert _real_counts(s, TINY_SDXL) == (c.params, c.macs, c.macs_conv_linear)
    x = real_inputs(TINY_SDXL)
    with masking(tiny_sdxl_teacher, s.hybridsd_prune_record):
        ref = out(tiny_sdxl_teacher, x)
    assert torch.allclose(out(s, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_full_size_sd1_on_meta_by_hand():
    """SD-1.x, ResNet inner channels at 0.5 everywhere: the drop equals the count written out by hand."""
    from diffusers.models.resnet import ResnetBlock2D

    arch = describe("sd-v1")
    full = build_student(plan(arch, Candidate()))
    removed = 0
    for _, r in full.named_modules():
        if isinstance(r, ResnetBlock2D):
            c, half = r.conv1.out_channels, r.conv1.out_channels // 2  # 32 groups: keeps 16 whole groups
            removed += half * (r.conv1.in_channels * 9 + 1)  # conv1 rows + bias
            removed += half * (r.time_emb_proj.in_features + 1)  # time embedding rows + bias
            removed += 2 * half  # norm2 affine
            removed += r.conv2.out_channels * half * 9  # conv2 columns
            assert c % 32 == 0
    cand = Candidate(prune={"all": {"resnet": 0.5}})
    pruned = build_student(plan(arch, cand))
    n_full = sum(t.numel() for t in full.parameters())
    assert n_full == 859_520_964
    assert sum(t.numel() for t in pruned.parameters()) == n_full - removed
    rec = pruned.hybridsd_prune_record
    assert rec.importance is None and len(rec.groups) == 22
    assert all(g.units == 32 and g.kept == 16 for g in rec.groups)
    # heads and ff too, at the three Hybrid SD ratios, with no error
    for r in (0.25, 0.5, 0.75):
        c = estimate_cost("sd-v1", Candidate(prune={"all": {"resnet": r, "heads": r, "ff": r}}), resolution=512)
        assert 0.2 * n_full < c.params < n_full


# -- replay, record, export -----------------------------------------------------------------
def test_replay_gives_the_same_model(tiny_sd1_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    x = real_inputs(TINY_SD1)
    cand = Candidate(drop_layers=candidate_preset("bk-sdm-base", ARCH).drop_layers, prune=PRUNE_MIX, importance="magnitude")
    p = plan(ARCH, cand)
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu")
    rec_json = json.dumps(s.hybridsd_prune_record.to_dict())
    rec = PruneRecord.from_dict(json.loads(rec_json))
    assert rec == s.hybridsd_prune_record
    # (a) same pre-pruning weights + replay -> same output
    fresh = build_student(p, teacher=tiny_sd1_teacher, device="cpu", prune=False)
    replay(fresh, rec)
    assert torch.equal(out(fresh, x), out(s, x))
    # (b) an uninitialised student + replay + the pruned safetensors -> same output
    save_file({k: v.contiguous() for k, v in s.state_dict().items()}, str(tmp_path / "w.safetensors"))
    empty = build_student(p, device="meta", prune=False).to_empty(device="cpu")
    replay(empty, rec)
    empty.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    assert torch.equal(out(empty.eval(), x), out(s, x))
    # replaying on an already pruned model is refused with one line
    with pytest.raises(ConfigError, match="already pruned") as e:
        replay(s, rec)
    assert "\n" not in str(e.value)


def test_export_and_load_unet_round_trip(tiny_sd1_teacher, tmp_path):
    from hybridsd_nas.export import export_unet, load_unet

    x = real_inputs(TINY_SD1)
    cand = Candidate(prune={"all": {"resnet": 0.5, "heads": 0.5, "ff": 0.5}})
    p = plan(ARCH, cand)
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu")
    export_unet(s, p, tmp_path / "u", teacher_id="tiny")
    back = load_unet(tmp_path / "u")
    assert torch.equal(out(back, x), out(s, x))
    assert back.hybridsd_prune_record == s.hybridsd_prune_record


def test_record_summary_and_rounding_to_whole_units(tiny_sd1_teacher):
    """Ratios that round to nothing keep one GroupNorm group / one head / one channel."""
    s = build(tiny_sd1_teacher, Candidate(prune={"stage0": {"resnet": 0.01, "heads": 0.01, "ff": 0.001}}))
    summ = s.hybridsd_prune_record.summary()["stage0"]
    assert summ["heads"]["units_after"] == summ["heads"]["modules"]  # one head each
    assert summ["resnet"]["units_after"] == summ["resnet"]["modules"]  # one group each
    assert summ["ff"]["channels_after"] == summ["ff"]["modules"]
    assert summ["resnet"]["asked"] == 0.01 and summ["resnet"]["done"] == pytest.approx(1 / 8)
    out(s, real_inputs(TINY_SD1))
    # GroupNorm rounding: 8 groups, 0.3 asks 2.4 groups, keeps 2
    s = build(tiny_sd1_teacher, Candidate(prune={"all": {"resnet": 0.3}}))
    assert {g.kept for g in s.hybridsd_prune_record.groups} == {2}
    assert "resnet" in s.hybridsd_prune_record.table()


# -- importance criteria ----------------------------------------------------------------------
def _kill(model, path, target, units):
    """Zero every weight of the given units: no criterion may keep them."""
    m = model.get_submodule(path)
    t = TARGETS[target]
    _, unit = t.units(m)
    with torch.no_grad():
        for sl in t.slices(m):
            w = getattr(m.get_submodule(sl.module), sl.param)
            for u in units:
                w.narrow(sl.dim, sl.offset + u * unit, unit).zero_()


@pytest.mark.parametrize("criterion", sorted(IMPORTANCE))
def test_every_criterion_cuts_dead_units(tiny_sd1_teacher, criterion):
    x = real_inputs(TINY_SD1, batch=1)
    cand = Candidate(prune={"stage1": {"resnet": 0.5, "heads": 0.5}}, importance=criterion)
    p = plan(ARCH, cand)
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu", prune=False)
    dead = {}
    for g in collect_groups(s, p):
        kill = [1, 2, 4, 7] if g.target.name == "resnet" else [0, 2]  # 8 groups / 4 heads, keep half
        _kill(s, g.path, g.target.name, kill)
        dead[g.path] = kill
    rec = prune_student(s, p, example_inputs=x, teacher=tiny_sd1_teacher, calib_batches=1)
    assert rec.importance == criterion and len(rec.groups) == len(dead) > 4
    for g in rec.groups:
        assert not set(g.keep) & set(dead[g.path]), (g.path, g.keep)


def test_a_registered_criterion_is_accepted_by_candidates_and_spaces_and_used_by_prune(tiny_sd1_teacher, tmp_path):
    from hybridsd_nas.prune import register_importance
    from hybridsd_nas.spaces import load_space

    seen = []

    @register_importance("last-units-test", help="keeps the last units (a test criterion)")
    def last_units(model, groups, ctx):
        seen.append(len(groups))
        return [torch.arange(g.units, dtype=torch.float32) for g in groups]  # higher = kept

    try:
        cand = Candidate(prune={"stage1": {"resnet": 0.5}}, importance="last-units-test")  # validated against IMPORTANCE
        s = build(tiny_sd1_teacher, cand)
        rec = s.hybridsd_prune_record
        assert seen and rec.importance == "last-units-test"
        assert all(list(g.keep) == list(range(g.units - len(g.keep), g.units)) for g in rec.groups)
        f = tmp_path / "space.yaml"
        f.write_text("name: t\nversion: 1\nkind: channel-pruning\noptions:\n  importance: [last-units-test]\n")
        assert load_space(f).options["importance"] == ["last-units-test"]
    finally:
        IMPORTANCE.unregister("last-units-test")
    with pytest.raises(HybridSDError, match="importance 'last-units-test' is unknown"):
        Candidate(prune={"stage1": {"resnet": 0.5}}, importance="last-units-test")


def test_magnitude_keeps_the_largest_norm_channels(tiny_sd1_teacher):
    cand = Candidate(prune={"stage2": {"ff": 0.25}})
    p = plan(ARCH, cand)
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu", prune=False)
    expect = {}
    for g in collect_groups(s, p):  # independent: proj rows (both GEGLU halves) and net[2] columns
        ff = g.module
        inner = ff.net[2].in_features
        w = ff.net[0].proj.weight.detach()
        b = ff.net[0].proj.bias.detach()
        sq = w[:inner].pow(2).sum(1) + w[inner:].pow(2).sum(1) + b[:inner] ** 2 + b[inner:] ** 2 + ff.net[2].weight.detach().pow(2).sum(0)
        expect[g.path] = sorted(torch.topk(sq, keep_count(0.25, inner)).indices.tolist())
    rec = prune_student(s, p)
    assert {g.path: list(g.keep) for g in rec.groups} == expect
    assert any(k != list(range(len(k))) for k in expect.values())


def test_data_criteria_disagree_with_magnitude_and_are_deterministic(tiny_sd1_teacher):
    x = real_inputs(TINY_SD1, batch=1)
    cand = Candidate(drop_layers=candidate_preset("bk-sdm-base", ARCH).drop_layers, prune={"stage0": {"resnet": 0.5}})
    keeps = {}
    for crit in sorted(IMPORTANCE):
        runs = []
        for _ in range(2):
            s = build(tiny_sd1_teacher, cand, importance=crit, example_inputs=x, teacher=tiny_sd1_teacher, calib_batches=1)
            runs.append([g.keep for g in s.hybridsd_prune_record.groups])
        assert runs[0] == runs[1]
        keeps[crit] = runs[0]
    assert keeps["taylor"] != keeps["magnitude"] and keeps["latent-stats"] != keeps["magnitude"]


def test_taylor_when_the_student_is_the_teacher(tiny_sd1_teacher):
    x = real_inputs(TINY_SD1, batch=1)
    s = build(tiny_sd1_teacher, Candidate(prune={"stage0": {"heads": 0.5}}, importance="taylor"),
              example_inputs=x, teacher=tiny_sd1_teacher, calib_batches=2)
    rec = s.hybridsd_prune_record
    assert rec.calib_batches == 2 and any("seeded noise" in n for n in rec.notes)
    assert all(p.grad is None for p in tiny_sd1_teacher.parameters())


def test_torch_pruning_dependency_graph_agrees_with_the_targets(tiny_sd1_teacher):
    """torch-pruning's own dependency analysis couples exactly the layers each target cuts."""
    m = copy.deepcopy(tiny_sd1_teacher).requires_grad_(True)  # tracing follows autograd
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=real_inputs(TINY_SD1, batch=1),
                                              output_transform=lambda o: o.sample)
    names = {mod: n for n, mod in m.named_modules()}
    checked = 0
    for path, target, trigger, fn in [
        ("down_blocks.1.resnets.0", "resnet", "conv2", tp.prune_conv_in_channels),
        ("up_blocks.2.resnets.1", "resnet", "conv2", tp.prune_conv_in_channels),
        ("mid_block.attentions.0.transformer_blocks.0.ff", "ff", "net.2", tp.prune_linear_in_channels),
    ]:
        mod = m.get_submodule(path)
        t = TARGETS[target]
        _, unit = t.units(mod)
        idx = list(range(unit)) + list(range(2 * unit, 3 * unit))
        group = dg.get_pruning_group(mod.get_submodule(trigger), fn, idxs=idx)
        got: dict[str, set[int]] = {}
        for d, i in group:
            if d.target.module in names:  # layers, not torch-pruning's internal op nodes
                got.setdefault(names[d.target.module][len(path) + 1:], set()).update(i)
        want: dict[str, set[int]] = {}
        for sl in t.slices(mod):
            want.setdefault(sl.module, set()).update(sl.offset + c for c in idx)
        assert got == want
        checked += 1
    assert checked == 3


# -- errors ----------------------------------------------------------------------------------
def test_unknown_importance_and_missing_data(tiny_sd1_teacher):
    p = plan(ARCH, Candidate(prune={"all": {"heads": 0.5}}))
    s = build_student(p, teacher=tiny_sd1_teacher, device="cpu", prune=False)
    with pytest.raises(UnknownNameError) as e:
        prune_student(s, p, importance="random")
    assert "magnitude" in str(e.value) and "latent-stats" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HybridSDError, match="teacher=") as e:
        prune_student(s, p, importance="taylor", example_inputs=real_inputs(TINY_SD1))
    assert "\n" not in str(e.value)
    with pytest.raises(HybridSDError, match="example_inputs="):
        prune_student(s, p, importance="latent-stats")
    with pytest.raises(HybridSDError, match="calib_batches"):
        prune_student(s, p, calib_batches=0)
    # nothing was cut by the failed attempts
    assert [a.heads for _, a in attn_modules(s)] == [a.heads for _, a in attn_modules(tiny_sd1_teacher)]


def test_bad_records_are_refused(tiny_sd1_teacher):
    s = build(tiny_sd1_teacher, Candidate(prune={"stage0": {"heads": 0.5}}))
    d = s.hybridsd_prune_record.to_dict()
    with pytest.raises(ConfigError, match="format"):
        PruneRecord.from_dict({**d, "format": "pickle"})
    bad = copy.deepcopy(d)
    bad["groups"][0]["keep"] = [0, 0]
    with pytest.raises(ConfigError, match="keeps"):
        PruneRecord.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["groups"][0]["path"] = "down_blocks.9.x"
    fresh = build_student(plan(ARCH, Candidate(prune={"stage0": {"heads": 0.5}})), teacher=tiny_sd1_teacher, device="cpu", prune=False)
    with pytest.raises(ConfigError, match="no module"):
        replay(fresh, bad)
