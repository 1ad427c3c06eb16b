import json

import pytest
import torch

from hybridsd_nas.arch import Candidate, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.cost import LatencyTable, count_macs, estimate_cost, measure_latency, unet_inputs

from .conftest import TINY_SD1, TINY_SDXL

# Field notes, measured with diffusers 0.42.1 at 512 px (64x64 latent), 77 tokens, batch 1.
PUBLISHED = {
    "identity": (859.52, 338.7),
    "bk-sdm-base": (579.38, 223.8),
    "bk-sdm-small": (482.35, 217.7),
    "bk-sdm-tiny": (323.38, 205.0),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_reproduces_published_sd_v1_and_bk_sdm_costs(name):
    r = estimate_cost("sd-v1", name, resolution=512)
    params_m, macs_cl_g = PUBLISHED[name]
    assert round(r.params / 1e6, 2) == params_m
    assert round(r.macs_conv_linear / 1e9, 1) == macs_cl_g
    assert all(isinstance(getattr(r, k), int) for k in ("params", "macs", "macs_conv_linear"))
    if name == "identity":
        assert round(r.macs / 1e9, 1) == 401.6


def test_preset_unet_and_candidate_agree():
    """bk-sdm-tiny as a config preset and as a candidate of sd-v1 cost the same."""
    a = estimate_cost("bk-sdm-tiny", None, resolution=256)
    b = estimate_cost("sd-v1", "bk-sdm-tiny", resolution=256)
    assert (a.params, a.macs, a.macs_conv_linear) == (b.params, b.macs, b.macs_conv_linear)


def _real(cfg, cand, seed=0):
    torch.manual_seed(seed)
    return build_student(plan(describe(cfg), cand), device="cpu")


CASES = [
    (TINY_SD1, Candidate()),
    (TINY_SD1, Candidate(drop_layers=["down0.1", "down1.1", "down2.1", "down3.1", "up0.1", "up1.1", "up2.1", "up3.1"])),
    (TINY_SD1, Candidate(drop_units=["down1.0.attn", "mid.1.resnet"], drop_mid=False)),
    (TINY_SDXL, Candidate(depth={"down2": 1})),
]


@pytest.mark.parametrize("cfg, cand", CASES)
@pytest.mark.slow
def test_conv_linear_convention_agrees_with_thop_and_fvcore(cfg, cand):
    from fvcore.nn import FlopCountAnalysis
    from thop import profile

    meta = build_student(plan(describe(cfg), cand))
    ours = count_macs(meta, unet_inputs(meta.config if cand.is_identity else cfg, 128, 1, 7))
    model = _real(cfg, cand)
    x = unet_inputs(cfg, 128, 1, 7, device="cpu")
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"])
    kwargs = {k: v for k, v in x.items() if k not in ("sample", "timestep", "encoder_hidden_states")}

    class Wrap(torch.nn.Module):  # thop and fvcore take positional inputs only
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, s, t, e):
            return self.m(s, t, e, return_dict=False, **kwargs)[0]

    with torch.no_grad():
        thop_macs, _ = profile(Wrap(model), inputs=args, verbose=False)
    assert int(thop_macs) == ours.macs_conv_linear
    fa = FlopCountAnalysis(Wrap(model), args)
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = fa.by_operator()
    fv_conv_linear = by_op.get("conv", 0) + by_op.get("linear", 0) + by_op.get("addmm", 0)
    assert fv_conv_linear == ours.conv + ours.linear
    assert ours.params == sum(p.numel() for p in model.parameters())
    assert ours.attention_matmul > 0


def test_attention_macs_match_formula():
    """QK^T and AV of one SD-1.x self-attention at 64x64 latent: 2 * (4096^2 * 320) MACs."""
    from hybridsd_nas.cost.macs import count_macs as cm

    m = build_student(plan(describe("sd-v1"), Candidate()))
    r = cm(m, unet_inputs(m.config, 512, 1, 77))
    b = r.by_block["down_blocks.0"]
    self_attn = 2 * 2 * (4096 * 4096 * 320)  # two layers, QK^T + AV
    cross_attn = 2 * 2 * (4096 * 77 * 320)
    assert b["attention_matmul"] == self_attn + cross_attn


def test_by_block_sums_to_total():
    r = estimate_cost("sd-v1", "bk-sdm-tiny", resolution=256, by_block=True)
    assert sum(v["macs"] for v in r.by_block.values()) == r.macs
    assert sum(v["params"] for v in r.by_block.values()) == r.params
    assert "up1" in r.by_block and "up0" not in r.by_block  # base names: stage 3 is gone


def test_measured_latency_states_how(tmp_path):
    r = estimate_cost(TINY_SD1, None, resolution=128, latency="measure", repeats=3)
    lt = r.latency
    assert r.latency_ms > 0 and lt["p10_ms"] <= lt["median_ms"] <= lt["p90_ms"]
    assert lt["dtype"] == "float32" and lt["device"].startswith("cpu") and lt["resolution"] == 128


@pytest.mark.slow
def test_latency_table_is_cached_and_reused(tmp_path):
    path = tmp_path / "lut.json"
    t = LatencyTable("cpu", torch.float32, 128, 1, path=path, warmup=1, repeats=2)
    r1 = estimate_cost(TINY_SD1, "bk-sdm-base", resolution=128, latency="lut", lut=t)
    assert path.is_file()
    n_units = len(t.units)
    saved = json.loads(path.read_text())
    assert len(saved["units"]) == n_units and saved["meta"]["resolution"] == 128
    # a reload answers from disk: same prediction, nothing timed again
    t2 = LatencyTable("cpu", torch.float32, 128, 1, path=path)
    r2 = estimate_cost(TINY_SD1, "bk-sdm-base", resolution=128, latency="lut", lut=t2)
    assert r2.latency_ms == pytest.approx(r1.latency_ms)
    assert len(t2.units) == n_units
    # the base was timed once to calibrate the fixed overhead: its units are all in the table
    (over,) = t2.overhead.values()
    assert over["measured_ms"] > 0 and over["units_ms"] > 0
    r3 = estimate_cost(TINY_SD1, None, resolution=128, latency="lut", lut=t2)
    assert len(t2.units) == n_units
    assert r3.latency["n_units"] > r1.latency["n_units"]


def test_measure_latency_on_real_model():
    m = _real(TINY_SD1, Candidate())
    st = measure_latency(m, unet_inputs(TINY_SD1, 128, 1, 7, device="cpu"), "cpu", warmup=1, repeats=3)
    assert st.median_ms > 0 and st.repeats == 3
