"""The multi-fidelity policy (hybridsd_nas.study.fidelity) and the replay of benchmarks/bench_multifidelity.py."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.study import fidelity as F

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_multifidelity", ROOT / "benchmarks" / "bench_multifidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- Fidelity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rungs, words", [((40, 40), "strictly increasing"), ((160, 40), "strictly increasing"),
                                          ((0, 40), "positive"), ((-5,), "positive"), ((), "at least one"),
                                          ((40, 80.5), "whole number"), ("40", "list of step counts")])
def test_fidelity_rejects_bad_rungs(rungs, words):
    with pytest.raises(ConfigError) as e:
        F.Fidelity(rungs=rungs, promote=0.3)
    msg = _one_line(e)
    assert msg.startswith("fidelity.rungs") and words in msg


@pytest.mark.parametrize("promote", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "a third"])
def test_fidelity_rejects_promote_outside_unit_interval(promote):
    with pytest.raises(ConfigError) as e:
        F.Fidelity(rungs=(40, 400), promote=promote)
    msg = _one_line(e)
    assert msg.startswith("fidelity.promote") and "(0, 1]" in msg


def test_fidelity_from_dict_round_trip_and_unknown_key():
    f = F.Fidelity.from_dict({"rungs": [40, 160, 640], "promote": 0.3})
    assert f.rungs == (40, 160, 640) and f.promote == 0.3 and (f.first, f.highest) == (40, 640)
    assert F.Fidelity.from_dict(f.to_dict()) == f
    assert f.to_dict() == {"rungs": [40, 160, 640], "promote": 0.3}
    assert F.Fidelity(rungs=[40, 400], promote=1).promote == 1.0  # 1 is valid: promote everything
    with pytest.raises(ConfigError) as e:
        F.Fidelity.from_dict({"rungs": [40, 400], "promote": 0.3, "eta": 3})
    assert _one_line(e) == "fidelity.eta: unknown key; valid keys: rungs, promote"
    with pytest.raises(ConfigError) as e:
        F.Fidelity.from_dict({"rungs": [40, 400]}, source="study.yaml: fidelity")
    assert _one_line(e).startswith("study.yaml: fidelity: missing key 'promote'")
    with pytest.raises(ConfigError) as e:
        F.Fidelity.from_dict({"rungs": [400, 40], "promote": 0.3}, source="study.yaml: fidelity")
    assert _one_line(e).startswith("study.yaml: fidelity.rungs: must be strictly increasing")
    with pytest.raises(ConfigError):
        F.Fidelity.from_dict([40, 400])


def test_budget_is_ceil_without_float_rounding():
    assert F.promote_budget(0.3, 10) == 3
    assert F.promote_budget(0.07, 100) == 7 and F.promote_budget(0.28, 25) == 7  # 7.000000000000001 in floats
    assert F.promote_budget(0.1, 30) == 3 and F.promote_budget(0.1, 31) == 4
    assert F.promote_budget(0.1, 1) == 1 and F.promote_budget(0.5, 0) == 0
    assert F.Fidelity(rungs=(40, 400), promote=0.25).budget(8) == 2


# -- ordering -------------------------------------------------------------------------------------
def test_nondominated_ranks_hand_made():
    pts = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [4, 4], [6, 6], [2, 2]])
    assert F.nondominated_ranks(pts).tolist() == [0, 0, 0, 1, 2, 3, 0]  # equal rows share a rank
    # maximising the second objective: (1, 5) and (6, 6) lead; (5, 1) is behind (4, 4), which (1, 5) dominates
    assert F.nondominated_ranks(pts, [True, False]).tolist() == [0, 1, 2, 1, 1, 0, 1]
    assert F.nondominated_ranks(pts, ["minimize", "maximize"]).tolist() == [0, 1, 2, 1, 1, 0, 1]
    assert F.nondominated_ranks([3.0, 1.0, 2.0, 1.0]).tolist() == [2, 0, 1, 0]  # one objective: dense rank
    assert F.nondominated_ranks(np.zeros((0, 2))).tolist() == []
    with pytest.raises(ValueError):
        F.nondominated_ranks([[1.0, float("nan")]])


def test_crowding_and_selection_order():
    front = np.array([[1, 5], [2, 2], [5, 1]])
    d = F.crowding_distance(front)
    assert math.isinf(d[0]) and math.isinf(d[2]) and d[1] == pytest.approx(2.0)  # (5-1)/4 + (5-1)/4
    assert np.all(np.isinf(F.crowding_distance([[1, 1], [2, 2]])))
    assert F.crowding_distance([[1.0], [1.0], [1.0]]).tolist() == [0.0, 0.0, 0.0]  # ties stay tied
    pts = np.array([[2, 2], [1, 5], [5, 1], [3, 3]])
    # front 0 first, its ends (infinite crowding) before its middle, ties by row order; then front 1
    assert F.selection_order(pts).tolist() == [1, 2, 0, 3]
    assert F.selection_order([2.0, 1.0, 2.0, 0.5]).tolist() == [3, 1, 0, 2]


# -- promotion ------------------------------------------------------------------------------------
def test_promotion_respects_fraction_feasibility_and_already():
    scores = {f"c{i}": (float(i),) for i in range(10)}
    feas = {k: True for k in scores}
    assert F.promotion_candidates(scores, feas, 0.3) == ["c0", "c1", "c2"]
    assert F.promotion_candidates(scores, None, 0.3, already={"c1"}) == ["c0", "c2"]  # c1 keeps its place
    assert F.promotion_candidates(scores, feas, 0.3, already={"c0", "c1", "c2"}) == []
    feas["c0"] = False  # 9 feasible: ceil(2.7) = 3
    assert F.promotion_candidates(scores, feas, 0.3) == ["c1", "c2", "c3"]
    del feas["c1"]  # not known to be feasible: never promoted, not counted (8: ceil(2.4) = 3)
    assert F.promotion_candidates(scores, feas, 0.3) == ["c2", "c3", "c4"]
    scores["c2"] = (float("nan"),)  # a failed score
    assert F.promotion_candidates(scores, feas, 0.3) == ["c3", "c4", "c5"]
    assert F.promotion_candidates(scores, {k: False for k in scores}, 1.0) == []
    assert F.promotion_candidates({"a": 1.0, "b": 2.0}, None, 0.5, directions=["maximize"]) == ["b"]
    with pytest.raises(ConfigError):
        F.promotion_candidates(scores, feas, 0.0)


def test_asynchronous_promotion_never_picks_infeasible_and_stays_near_fraction():
    rng = np.random.default_rng(1)
    n, p = 40, 0.25
    vals = rng.normal(size=(n, 2))
    feasible = {i: bool(i % 5) for i in range(n)}  # every fifth one infeasible
    seen, promoted = {}, []
    for i in rng.permutation(n).tolist():
        seen[i] = tuple(vals[i])
        new = F.promotion_candidates(seen, feasible, p, set(promoted))
        assert not set(new) & set(promoted)
        promoted += new
        n_feas = sum(feasible[k] for k in seen)
        # whatever it promotes now lies within the current best fraction
        assert set(new) <= set(F.promotion_candidates(seen, feasible, p, ()))
        assert len(F.promotion_candidates(seen, feasible, p, ())) == F.promote_budget(p, n_feas)
    assert all(feasible[k] for k in promoted)
    assert len(promoted) >= F.promote_budget(p, 32)


# -- audit ----------------------------------------------------------------------------------------
def test_audit_hand_made():
    first = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "x": 0.0}
    highest = {"a": 10.0, "b": 30.0, "c": 20.0, "d": 40.0}  # one pair of six swapped: tau (5 - 1) / 6
    a = F.audit(first, highest, k=2)
    assert a["possible"] and a["n"] == 4
    assert a["kendall_tau"] == pytest.approx(4 / 6)
    assert a["top_k_recall"] == pytest.approx(0.5)  # first's best 2 {a, b}, highest's {a, c}
    assert a["warning"] is None
    lo, hi = a["tau_interval_90"]
    assert -1 <= lo <= a["kendall_tau"] <= hi <= 1
    same = F.audit(first, {k: v * 10 for k, v in first.items()}, k=3)
    assert same["kendall_tau"] == pytest.approx(1.0) and same["top_k_recall"] == 1.0
    assert same["tau_interval_90"] == [1.0, 1.0]  # every resample keeps the order
    rev = F.audit(first, {k: -v for k, v in first.items()}, k=3)
    assert rev["kendall_tau"] == pytest.approx(-1.0) and rev["top_k_recall"] == pytest.approx(1 / 3)  # only b in both
    assert rev["warning"] and "\n" not in rev["warning"] and "0.6" in rev["warning"]
    # higher is better on both rungs: the top k flips, tau does not
    up = F.audit(first, highest, lower_is_better=False, k=1)
    assert up["top_k_recall"] == 1.0 and up["kendall_tau"] == pytest.approx(4 / 6)
    assert F.audit(first, highest, seed=3) == F.audit(first, highest, seed=3)


def test_audit_needs_three_candidates():
    a = F.audit({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "z": 3.0})
    assert a["possible"] is False and a["n"] == 2 and a["kendall_tau"] is None
    assert "only 2 candidates" in a["reason"] and "at least 3" in a["reason"]
    assert F.audit({}, {})["reason"].startswith("only 0 candidates")
    assert F.audit({"a": float("nan"), "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 3})["possible"] is False


def test_bootstrap_tau_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(5, 9)).astype(float)
    y = rng.integers(0, 4, size=(5, 9)).astype(float)
    ours = F._tau_b_many(x, y)
    ref = [kendalltau(a, b)[0] for a, b in zip(x, y)]
    assert np.allclose(ours, ref, equal_nan=True)


# -- the replay -----------------------------------------------------------------------------------
def _synthetic(n=10, rung_order=None):
    """Candidates c0..c{n-1}: long FID 10 + i (c0 best), first-rung score by ``rung_order`` (default the same order)."""
    rung_order = list(range(n)) if rung_order is None else rung_order
    return [{"name": f"c{i}", "macs": 100 - i, "rung1": {0: float(rung_order[i])}, "long": {0: 10.0 + i, 1: 10.5 + i},
             "seconds": None, "timed": False} for i in range(n)]


def test_replay_order_by_hand():
    b = _bench()
    cands = _synthetic(4)
    fid = F.Fidelity(rungs=(40, 400), promote=0.5)
    top = {"c0", "c1"}
    # worst first: each arrival is the best so far, so all four are promoted: the whole exhaustive cost
    r = b.replay_order(cands, [3, 2, 1, 0], 0, "one-seed", "quality", fid, top, n_boot=50)
    assert r["promoted"] == ["c3", "c2", "c1", "c0"] and r["cost_steps"] == pytest.approx(1.0)
    # best first: c0 (1 seen, budget 1), c1 (3 seen, budget 2), then nothing: 4 x 40 + 2 x 360 of 4 x 400
    r = b.replay_order(cands, [0, 1, 2, 3], 0, "one-seed", "quality", fid, top, n_boot=50)
    assert r["promoted"] == ["c0", "c1"] and r["all_found"] and r["cost_steps"] == pytest.approx(0.55)
    assert r["sync_promoted"] == 2 and r["sync_found"] == 2
    assert r["audit"]["possible"] is False  # 2 promoted: too few to audit


def test_replay_on_synthetic_records():
    b = _bench()
    cands = _synthetic(10)
    orders = b.make_orders(10, 6, seed=0, seeds=[0, 1])
    assert orders == b.make_orders(10, 6, seed=0, seeds=[0, 1])
    rows = b.replay(cands, [0.3, 1.0], orders, variants=("quality",), modes=("one-seed", "seed-mean"), n_boot=100)
    by = {(r["mode"], r["promote"]): r for r in rows}
    for mode in ("one-seed", "seed-mean"):
        # a perfect first rung always holds the top 3 once 30% of 10 candidates are promoted
        r = by[(mode, 0.3)]
        assert r["orders_all_top"] == 6 and r["share_top_mean"] == 1.0
        assert r["audit_tau_mean"] == pytest.approx(1.0) and r["audit_recall_mean"] == 1.0
        assert r["sync_orders_all_top"] == 6 and r["sync_cost_steps_mean"] == pytest.approx((400 + 3 * 360) / 4000)
        assert r["promoted_min"] >= 3 and r["cost_steps_mean"] >= (400 + 3 * 360) / 4000
        r = by[(mode, 1.0)]  # everything promoted: the exhaustive cost
        assert r["promoted_min"] == r["promoted_max"] == 10 and r["cost_steps_mean"] == pytest.approx(1.0)
    # seed 1 has no first-rung score here: orders that drew it take seed 0's, and say so
    assert by[("one-seed", 0.3)]["orders_seed_substituted"] == sum(o["seed"] == 1 for o in orders)
    assert by[("seed-mean", 0.3)]["orders_seed_substituted"] == 0
    # the bound: with a perfect first rung 3 promotions suffice; with c2 placed fifth, 5
    assert b.bound(cands)[0]["promotions_needed"] == 3
    worse = b.bound(_synthetic(10, [0, 1, 4, 2, 3, 5, 6, 7, 8, 9]))[0]
    assert worse["promotions_needed"] == 5 and worse["min_cost_steps"] == pytest.approx((400 + 5 * 360) / 4000)


def test_replay_reversed_first_rung_misses_the_top():
    b = _bench()
    cands = _synthetic(10, rung_order=list(range(9, -1, -1)))  # the first rung ranks the best last
    orders = b.make_orders(10, 6, seed=0, seeds=[0])
    good = b.replay(_synthetic(10), [0.3], orders, variants=("quality",), modes=("seed-mean",), n_boot=50)[0]
    bad = b.replay(cands, [0.3], orders, variants=("quality",), modes=("seed-mean",), n_boot=50)[0]
    assert bad["share_top_mean"] < good["share_top_mean"] == 1.0
    assert bad["sync_orders_all_top"] == 0 and bad["audit_tau_mean"] == pytest.approx(-1.0)
    t = b.target([good, bad], 6)
    assert [x["met"] for x in t] == [False]  # one (variant, mode): 30% of 10 costs more than 30% with early promotions
