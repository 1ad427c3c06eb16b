"""The proxy-fidelity scripts: their statistics, rules, exit codes and record round trips, on synthetic records."""

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from experiments.research.proxy_fidelity import bound, ema_check, ema_reference, extrapolate, run, settle, sweep
from experiments.research.proxy_fidelity.records import Records


def _fidelity_row(name, space, proxy_fid, long_fid):
    ev = lambda fid, n: {"proxy_fid": fid, "kid": 0.01, "fid_real": 100.0, "adherence": 0.5, "eval_seconds": 10.0, "samples": n}  # noqa: E731
    return {"candidate": name, "candidate_key": name, "space": space, "params": 1e6, "macs": 1e8, "trainable_params": 1e6,
            "frozen_params": 0, "zero_cost": {"output_mse": proxy_fid, "latent_stat_shift": 0.1 * long_fid}, "zero_cost_seconds": 0.1,
            "status": "ok", "curve": [{"step": s, "loss": proxy_fid / s} for s in range(1, 101)],
            "evals": {"10": {"distill_seconds": 5.0, "heldout": {"output_mse": proxy_fid, "seconds": 0.5}, "proxy": ev(proxy_fid, 8)},
                      "100": {"distill_seconds": 50.0, "heldout": {"output_mse": long_fid, "seconds": 0.5}, "long": ev(long_fid, 32)}}}


@pytest.mark.slow
def test_fidelity_analysis_counts_only_the_pairs_the_long_run_separates(tmp_path):
    # long FIDs: a and b tied within noise, c and d well apart; the proxy swaps the tied pair only
    rows = [_fidelity_row("a", "layer-removal", 2.0, 10.0), _fidelity_row("b", "layer-removal", 1.0, 10.3),
            _fidelity_row("c", "recombination", 3.0, 20.0), _fidelity_row("d", "recombination", 4.0, 30.0)]
    out = run.kendall_spearman(np.array([2.0, 1.0, 3.0, 4.0]), np.array([10.0, 10.3, 20.0, 30.0]), separation=1.0)
    assert out["separated_pairs"] == 5 and out["separated_agree"] == 5
    assert out["kendall_tau"] == pytest.approx(4 / 6)  # 5 concordant, 1 discordant of 6 pairs
    args = argparse.Namespace(teacher="tiny", long_steps=100, checkpoints=[10], score_checkpoints=[10], proxy_samples=8,
                              long_samples=32, default_steps=10, seed=0, batch_size=4, lr=1e-3, sampler_steps=5,
                              guidance=4.0, notes=None)
    meta = {"machine": "test", "sampler": "PNDMScheduler", "torch": torch.__version__, "wall_seconds": 60}
    from hybridsd_nas.sources import pipeline_fingerprint

    f = tmp_path / "noise_floor.json"
    # an earlier report's own run-to-run figures are not used: the replicates measure them
    f.write_text(json.dumps({"teacher_fingerprint": pipeline_fingerprint("tiny"), "seeds": [0, 1], "samples": 32,
                             "students": {"a": {"mean": 10.0, "sd": 0.4}}, "fid_sd": 0.4, "diff_sd": 0.3, "train_sd": 9.0}))
    noise = run.load_noise(f, "tiny")
    assert "train_sd" not in noise
    # candidate a was run twice (10.0, then 10.4 with another training seed): run-to-run sd sqrt(0.08), reference 10.2
    run.analyse(rows, args, meta, tmp_path, noise, {"a": [{"tag": "r2", "long_fid": 10.4, "train_seed": 1}]})
    assert (tmp_path / "proxy_fidelity.md").stat().st_size > 0 and (tmp_path / "proxy_fidelity.png").is_file()
    saved = json.loads((tmp_path / "proxy_fidelity.json").read_text())
    default = saved["settings"][0]
    assert default["what"] == "10 steps, 8 samples (FID)" and default["kendall_tau"] == pytest.approx(4 / 6)
    # a-b (0.1 apart) is not separated; the proxy's swap there is not counted
    assert (default["separated_pairs"], default["separated_agree"]) == (5, 5)
    # two one-run candidates differ by sd sqrt(0.3^2 + 2 * 0.08) = 0.5: separated beyond 1.0
    assert saved["noise_floor"]["fid_sd"] == 0.4 and saved["noise_floor"]["separation"] == pytest.approx(1.0)
    assert saved["run_to_run"]["long_fid_by_seed"]["a"] == {"0": [10.0], "1": [10.4]}
    assert saved["noise_floor"]["diff_sd"] == 0.3
    assert saved["noise_floor"]["train_sd"] == pytest.approx(0.08 ** 0.5)
    assert "run_vs_repeat" not in saved["run_to_run"]  # one candidate run twice: too few for a rank correlation
    rows_csv = list(csv.DictReader((tmp_path / "proxy_fidelity.csv").open()))
    assert [(r["candidate"], r["long_runs"], r["long_seeds"], r["long_fid_mean"]) for r in rows_csv][0] == ("a", "2", "2", "10.2")
    rt = saved["run_to_run"]["repeat_tau"]
    assert rt["p10"] <= rt["median"] <= rt["p90"] <= 1.0
    # a repeat of a run whose noise is tiny against the spread of its FIDs ranks like it; one whose noise swamps it does not
    assert run.repeat_tau(np.arange(8.0) * 10, 0.1)["median"] == pytest.approx(1.0)
    assert run.repeat_tau(np.arange(8.0) * 0.01, 10.0)["median"] < 0.5
    # three candidates repeated: the repeat swaps c and d against the first runs -> tau 1/3 of the 3 pairs
    more = {"a": [{"tag": "r2", "long_fid": 10.4}], "c": [{"tag": "r2", "long_fid": 31.0, "train_seed": 1}],
            "d": [{"tag": "r2", "long_fid": 29.0, "train_seed": 1}]}
    run.analyse(rows, args, meta, tmp_path / "rep", noise, more)
    # repeats with the first runs' seed only: the reference averages them, but they measure no run-to-run noise
    run.analyse(rows, args, meta, tmp_path / "seed0", noise, {"a": [{"tag": "r2", "long_fid": 10.4}]})
    rows0 = list(csv.DictReader((tmp_path / "seed0" / "proxy_fidelity.csv").open()))
    assert (rows0[0]["long_runs"], rows0[0]["long_seeds"], rows0[0]["long_fid_mean"]) == ("2", "1", "10.2")
    assert json.loads((tmp_path / "seed0" / "proxy_fidelity.json").read_text())["run_to_run"] is None
    rvr = json.loads((tmp_path / "rep" / "proxy_fidelity.json").read_text())["run_to_run"]["run_vs_repeat"]
    assert rvr["candidates"] == 3 and rvr["kendall_tau"] == pytest.approx(1 / 3) and rvr["tag"] == "r2"
    # runs with one training seed (another machine's rounding only) are one draw of the run-to-run noise: a's two
    # seed-0 runs average into one value, b's two seeds give the noise; a keeps one seed in the separation
    same = {"a": [{"tag": "r2", "long_fid": 10.4}, {"tag": "s1", "long_fid": 11.2, "train_seed": 1}],
            "b": [{"tag": "s1", "long_fid": 10.9, "train_seed": 1}]}
    assert run.reference_runs(rows, same, 100) == {"a": [pytest.approx(10.2), 11.2], "b": [10.3, 10.9], "c": [20.0], "d": [30.0]}
    run.analyse(rows, args, meta, tmp_path / "same", noise, same)
    saved = json.loads((tmp_path / "same" / "proxy_fidelity.json").read_text())["run_to_run"]
    # pooled over the seed means: a (10.2, 11.2) and b (10.3, 10.9): (0.5 + 0.18) / 2
    assert saved["train_sd"] == pytest.approx((0.68 / 2) ** 0.5) and saved["df"] == 2
    assert saved["same_seed"]["train_sd"] == pytest.approx(0.08 ** 0.5) and saved["same_seed"]["df"] == 1
    assert saved["long_fid_by_seed"]["a"] == {"0": [10.0, 10.4], "1": [11.2]}
    rows_same = list(csv.DictReader((tmp_path / "same" / "proxy_fidelity.csv").open()))
    assert (rows_same[0]["long_runs"], rows_same[0]["long_seeds"], rows_same[0]["long_fid_mean"]) == ("3", "2", "10.7")
    run.analyse(rows, args, meta, tmp_path / "plain")  # without a noise report or repeats: no separation, no averaging
    plain = json.loads((tmp_path / "plain" / "proxy_fidelity.json").read_text())
    assert plain["noise_floor"] is None and plain["run_to_run"] is None
    assert not any("separated_pairs" in s or "kendall_tau_first_run" in s for s in plain["settings"])


@pytest.mark.slow
def test_fidelity_run_to_run_noise_pools_the_repeats_and_averaging_narrows_the_separation(tmp_path, capsys):
    rr = run.run_to_run({"a": [1.0, 3.0], "b": [10.0, 11.0, 12.0], "c": [5.0]})
    # pooled: (2 + 2) / (1 + 2) degrees of freedom
    assert rr["train_sd"] == pytest.approx((4.0 / 3.0) ** 0.5) and rr["df"] == 3 and rr["candidates_repeated"] == 2
    assert run.run_to_run({"a": [1.0], "b": [2.0]}) is None
    # a run repeated to the last bit is one run made twice, not a second draw of the noise
    assert run.distinct_runs("a", [47.9892578125, 52.68, 47.9892578125]) == [47.9892578125, 52.68]
    assert "47.9892578125" in capsys.readouterr().err  # warned of
    sep = run.pair_separation(0.0, 1.0, np.array([1, 2, 4]))
    assert sep[0, 1] == pytest.approx(2 * 1.5 ** 0.5) and sep[1, 2] == pytest.approx(2 * 0.75 ** 0.5)
    # averaging more runs makes a repeat of the reference agree better
    fid = np.arange(8.0)
    assert run.repeat_tau(fid, 2.0, runs=8)["median"] > run.repeat_tau(fid, 2.0, runs=1)["median"]
    # a noise-free score faces the reference's noise alone, a repeat faces it twice: the score can show more
    rt = run.repeat_tau(fid, 2.0, runs=2)
    assert rt["predictor_median"] > rt["median"] and rt["predictor_p10"] <= rt["predictor_median"] <= rt["predictor_p90"]
    # and it is the repeat's figure at twice the runs (the same noise, sd sqrt(1 / runs) = sqrt(2 / (2 runs)))
    assert rt["predictor_median"] == pytest.approx(run.repeat_tau(fid, 2.0, runs=4)["median"], abs=0.05)
    # repeats are read by candidate and tag; one of another length is left out with a warning
    rd = tmp_path / "replicates"
    rd.mkdir()
    long = lambda fid, steps: {"status": "ok", "evals": {str(steps): {"long": {"proxy_fid": fid}}}}  # noqa: E731
    (rd / "bk-sdm-base.rep2.json").write_text(json.dumps({"candidate": "bk-sdm-base", **long(50.0, 400)}))
    (rd / "bk-sdm-base.first-run.json").write_text(json.dumps({"candidate": "bk-sdm-base", **long(52.0, 400)}))
    (rd / "bk-sdm-base.seed1.json").write_text(json.dumps({"candidate": "bk-sdm-base", "train_seed": 1, **long(49.0, 400)}))
    (rd / "asdm-m1.short.json").write_text(json.dumps({"candidate": "asdm-m1", **long(40.0, 100)}))
    reps = run.load_replicates(tmp_path, 400)
    # a record without a training seed was written before --train-seed existed, when every run trained with seed 0
    unnamed = {"machine": None, "deferred": False, "ema_decay": None, "long_ema_fid": None}  # records before --device name no machine, nor an EMA
    assert reps == {"bk-sdm-base": [{"tag": "first-run", "long_fid": 52.0, "wall_seconds": 0.0, "train_seed": 0, **unnamed},
                                    {"tag": "rep2", "long_fid": 50.0, "wall_seconds": 0.0, "train_seed": 0, **unnamed},
                                    {"tag": "seed1", "long_fid": 49.0, "wall_seconds": 0.0, "train_seed": 1, **unnamed}]}
    assert "asdm-m1.short.json" in capsys.readouterr().err  # warned of
    # another training seed is only for repeats: the first runs carry the proxy evaluations at --seed
    with pytest.raises(SystemExit) as e:
        run.main(["--train-seed", "1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--replicate" in capsys.readouterr().err


@pytest.mark.slow
def test_a_missing_base_export_is_rebuilt_from_its_record_which_stays_as_it_was(tmp_path, monkeypatch):
    from hybridsd_nas.arch import describe

    args = argparse.Namespace(out=str(tmp_path), replicate="seed1", train_seed=1, long_steps=400, rescore=True,
                              base=None, rebuild_base=False, base_rebuilt=None)
    export_dir = tmp_path / "replicates" / "seed1"
    bf = export_dir / "bk-sdm-base-long"
    # without --rebuild-base the error says how to get the Base
    with pytest.raises(SystemExit, match="--rebuild-base"):
        run._base_for("asdm-m3", "asdm-m3", describe("tiny"), args, export_dir, None, ())
    args.rebuild_base = True
    # no record of the set's Base: nothing to rebuild from
    with pytest.raises(SystemExit, match="bk-sdm-base.seed1.json"):
        run.rebuild_base(args, export_dir, bf, *[None] * 5)
    rd = tmp_path / "replicates"
    rd.mkdir(exist_ok=True)
    record = {"candidate": "bk-sdm-base", "status": "ok", "train_seed": 1, "final_loss": 0.25,
              "evals": {"400": {"long": {"proxy_fid": 53.42}}}}
    (rd / "bk-sdm-base.seed1.json").write_text(json.dumps(record))
    # another training seed would not rebuild the same Base
    args.train_seed = 2
    with pytest.raises(SystemExit, match="--train-seed 1"):
        run.rebuild_base(args, export_dir, bf, *[None] * 5)
    args.train_seed, args.long_steps = 1, 500
    with pytest.raises(SystemExit, match="500"):
        run.rebuild_base(args, export_dir, bf, *[None] * 5)
    args.long_steps = 400
    seen = {}

    def fake_run(name, spec, a, *rest):  # the distillation itself is the one every candidate runs
        seen.update(name=name, rescore=a.rescore, train_seed=a.train_seed, out_dir=rest[-1])
        (rest[-1] / f"{name}-long").mkdir(parents=True)
        return {"candidate": name, "status": "ok", "reason": None, "final_loss": 0.26, "evals": {"400": {"long": {"proxy_fid": 53.5}}}}

    monkeypatch.setattr(run, "run_candidate", fake_run)
    row = run.rebuild_base(args, export_dir, bf, *[None] * 5)
    assert seen == {"name": "bk-sdm-base", "rescore": False, "train_seed": 1, "out_dir": export_dir}
    assert json.loads((rd / "bk-sdm-base.seed1.json").read_text()) == record  # the set's record is what the analysis reads
    assert json.loads((bf / "rebuilt_run.json").read_text())["recorded"]["long_fid"] == 53.42 == row["recorded"]["long_fid"]
    assert args.base_rebuilt["long_fid"] == 53.5 and args.base_rebuilt["recorded_long_fid"] == 53.42
    assert run.load_replicates(tmp_path, 400)["bk-sdm-base"] == [{"tag": "seed1", "long_fid": 53.42, "wall_seconds": 0.0, "train_seed": 1,
                                                                  "machine": None, "deferred": False, "ema_decay": None,
                                                                  "long_ema_fid": None}]
    # the same from the packed record
    Records(tmp_path).pack()
    assert not (rd / "bk-sdm-base.seed1.json").exists() and (tmp_path / "replicates.tar.xz").is_file()
    shutil.rmtree(bf)
    assert run.rebuild_base(args, export_dir, bf, *[None] * 5)["recorded"]["long_fid"] == 53.42


@pytest.mark.slow
def test_deferred_long_samples_score_as_a_direct_evaluation_would(tmp_path, monkeypatch):
    import copy
    import functools

    from hybridsd_nas.sources import load_pipeline
    from hybridsd_nas.proxy import ProxySettings, evaluate_student

    # without a replicate tag there is nothing to defer: the first runs score their proxies as they train
    with pytest.raises(SystemExit) as e:
        run.main(["--defer-fid"])
    assert e.value.code == 2
    for bad in (["--ema-decay", "1.5", "--replicate", "x"], ["--ema-decay", "-0.5"]):  # a decay is in (0, 1)
        with pytest.raises(SystemExit) as e:
            run.main(bad)
        assert e.value.code == 2
    small = functools.partial(ProxySettings, reference_images=16, kid_subset=4)
    monkeypatch.setattr(run, "ProxySettings", small)
    pipe = load_pipeline("tiny")
    student = copy.deepcopy(pipe.unet)  # a student that differs from the teacher
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = argparse.Namespace(teacher="tiny", long_samples=6, long_steps=400, seed=0, sampler_steps=2, guidance=4.0,
                              batch_size=16, lr=5e-4, device="cpu")
    export_dir = tmp_path / "replicates" / "seed2"
    d = run.save_long_samples(args, pipe, student, "prune-mixed", export_dir)
    assert d["samples"] == 6 and (export_dir / d["samples_file"]).is_file()
    rec = tmp_path / "replicates" / "prune-mixed.seed2.json"
    rec.write_text(json.dumps({"candidate": "prune-mixed", "status": "ok", "train_seed": 2, "machine": "gpu-x (cuda)",
                               "evals": {"400": {"long_deferred": d}}}))
    assert "prune-mixed" not in run.load_replicates(tmp_path, 400)  # not scored yet: left out of the analysis
    store = Records(tmp_path)
    assert run.score_deferred(args, pipe, export_dir, store, ["replicates/prune-mixed.seed2.json"]) == 1
    long = json.loads(rec.read_text())["evals"]["400"]["long"]
    direct = evaluate_student("tiny", pipe, student, small(samples=6, seed=0), 2, 4.0)
    assert direct["proxy_fid"] > 1.0  # the comparison below is not of two zeros
    for k in ("proxy_fid", "kid", "fid_real", "adherence", "paired_mse"):
        assert long[k] == pytest.approx(direct[k], rel=1e-5, abs=1e-9), k
    assert run.score_deferred(args, pipe, export_dir, store, ["replicates/prune-mixed.seed2.json"]) == 0  # scored once
    store.pack()  # and once packed, the archived record is the scored one
    assert not rec.exists() and run.score_deferred(args, pipe, export_dir, store, ["replicates/prune-mixed.seed2.json"]) == 0
    [x] = run.load_replicates(tmp_path, 400)["prune-mixed"]
    assert x["long_fid"] == long["proxy_fid"] and x["deferred"] and x["machine"] == "gpu-x (cuda)"
    # --ema-decay: the moving average's samples beside the last weights', both scored, the average's FID read apart
    pipe_teacher = pipe.unet  # another "student": the teacher itself
    d_ema = run.save_long_samples(args, pipe, pipe_teacher, "prune-heads-half", export_dir, "-ema")
    assert d_ema["samples_file"] == "prune-heads-half-long-ema-samples.safetensors"
    rec2 = tmp_path / "replicates" / "prune-heads-half.seed2.json"
    rec2.write_text(json.dumps({"candidate": "prune-heads-half", "status": "ok", "train_seed": 2,
                                "evals": {"400": {"long_deferred": d, "long_ema_deferred": d_ema}}}))
    assert run.score_deferred(args, pipe, export_dir, store, ["replicates/prune-heads-half.seed2.json"]) == 2
    ev = json.loads(rec2.read_text())["evals"]["400"]
    direct_ema = evaluate_student("tiny", pipe, pipe_teacher, small(samples=6, seed=0), 2, 4.0)
    assert ev["long"]["proxy_fid"] == pytest.approx(direct["proxy_fid"], rel=1e-5)
    assert ev["long_ema"]["proxy_fid"] == pytest.approx(direct_ema["proxy_fid"], rel=1e-5, abs=1e-9)
    assert ev["long_ema"]["proxy_fid"] != pytest.approx(ev["long"]["proxy_fid"], rel=1e-3)
    [y] = run.load_replicates(tmp_path, 400)["prune-heads-half"]
    assert y["long_fid"] == ev["long"]["proxy_fid"] and y["long_ema_fid"] == ev["long_ema"]["proxy_fid"]
    assert x["long_ema_fid"] is None  # a run without the average
    # samples that did not come back: the error names them and the fix
    other = tmp_path / "replicates" / "drop-mid.seed2.json"
    other.write_text(json.dumps({"candidate": "drop-mid", "status": "ok", "evals": {"400": {"long_deferred": {**d, "samples_file": "drop-mid-long-samples.safetensors"}}}}))
    with pytest.raises(SystemExit, match="drop-mid-long-samples.safetensors"):
        run.score_deferred(args, pipe, export_dir, store, ["replicates/drop-mid.seed2.json"])


def test_a_noise_report_of_other_teacher_weights_is_not_used(tmp_path, capsys):
    f = tmp_path / "noise_floor.json"
    f.write_text(json.dumps({"teacher_fingerprint": "0" * 16, "diff_sd": 0.5}))
    assert run.load_noise(f, "tiny") is None
    assert str(f) in capsys.readouterr().err  # warned of
    assert run.load_noise(tmp_path / "missing.json", "tiny") is None


def test_fidelity_picks_a_score_on_the_first_candidates_and_checks_it_on_fresh_ones(tmp_path):

    def with_scores(row, paired, high, fresh=False):
        ext = {"distill_seconds": 5.0, "heldout": {"output_mse": 1.0, "output_mse_high": high, "output_mse_low": 1.0,
                                                    "x0_mse": high, "seconds": 0.5},
               "paired": {"paired_mse": paired, "samples": 8, "seconds": 0.5}}
        row["zero_cost"]["latent_stat_shift"] = high  # not a perfect ranker here
        if fresh:  # a fresh run carries the scores itself; a first run got them from a rescore
            row["set"] = "fresh"
            row["evals"]["10"].update(ext)
        else:
            row["evals"]["10"]["rescore"] = ext
        return row

    # long FIDs 10..50; the paired score ranks the first five perfectly, the FID proxy and the high-noise MSE do not
    first = [with_scores(_fidelity_row(n, "layer-removal", p, f), paired=f / 100, high=h)
             for n, p, f, h in [("a", 5.0, 10.0, 3.0), ("b", 1.0, 20.0, 1.0), ("c", 3.0, 30.0, 2.0),
                                ("d", 2.0, 40.0, 5.0), ("e", 4.0, 50.0, 4.0)]]
    # fresh: f and g fall between the first ones; the paired score swaps f and g
    fresh = [with_scores(_fidelity_row("f", "channel-pruning", 1.0, 32.0), paired=0.36, high=1.0, fresh=True),
             with_scores(_fidelity_row("g", "channel-pruning", 2.0, 35.0), paired=0.34, high=1.0, fresh=True),
             with_scores(_fidelity_row("h", "channel-pruning", 3.0, 60.0), paired=0.60, high=1.0, fresh=True)]
    for r, m in zip(first + fresh, [3e8, 2e8, 5e8, 1e8, 4e8, 2e8, 6e8, 1e8]):
        r["macs"] = m
    args = argparse.Namespace(teacher="tiny", long_steps=100, checkpoints=[10], score_checkpoints=[10], proxy_samples=8,
                              long_samples=32, default_steps=10, seed=0, batch_size=4, lr=1e-3, sampler_steps=5,
                              guidance=4.0, notes=None)
    names = [s["what"] for s in run.score_vectors(first, args)]
    assert "paired sample MSE (8 samples, no feature network), after 10 steps" in names
    assert "held-out output MSE, noisiest third of timesteps, after 10 steps (no sampling)" in names
    # the first runs' own held-out record is not the rescore's
    assert run.score_vectors(first, args)[names.index("held-out output MSE after 10 steps (no sampling)")]["score"].tolist() == [5, 1, 3, 2, 4]
    # a rescore that ran at half the speed of the first run has its costs halved back onto the first run's scale
    slow = json.loads(json.dumps(first[0]))
    slow["evals"]["10"]["rescore"]["distill_seconds"] = 10.0
    assert run._rescore_speed(slow) == 0.5 and run._rescore_speed(fresh[0]) == 1.0
    cost = {s["what"]: s["cost"][0] for s in run.score_vectors([slow], args)}
    assert cost["paired sample MSE (8 samples, no feature network), after 10 steps"] == pytest.approx(0.5 * (10.0 + 0.5))
    # the rule: highest tau within the cost; a tie goes to the cheaper
    pick = run.choose([{"what": "x", "kendall_tau": 0.9, "cost_fraction_mean": 0.2}, {"what": "y", "kendall_tau": 0.7, "cost_fraction_mean": 0.05},
                       {"what": "z", "kendall_tau": 0.7, "cost_fraction_mean": 0.01}])
    assert pick["what"] == "z" and run.choose([{"what": "x", "kendall_tau": 0.9, "cost_fraction_mean": 0.2}]) is None
    meta = {"machine": "test", "sampler": "PNDMScheduler", "torch": torch.__version__, "wall_seconds": 60}
    run.analyse(first + fresh, args, meta, tmp_path)
    saved = json.loads((tmp_path / "proxy_fidelity.json").read_text())
    assert saved["chosen"]["what"].startswith("paired sample MSE") and saved["chosen"]["kendall_tau"] == pytest.approx(1.0)
    check = {c["what"]: c for c in saved["fresh_check"]}
    paired = check[saved["chosen"]["what"]]
    # 3 fresh pairs + 3 x 5 fresh-first pairs = 18; the only one out of order is f-g
    assert paired["pairs_with_fresh"] == 18 and paired["pairs_with_fresh_agree"] == 17
    assert paired["kendall_tau_fresh"] == pytest.approx(1 / 3)
    # the default is checked beside it, and so are the baselines (the cost read as quality), which the rule never picks
    combo = "10 steps, 8 samples + MACs alone (rank sum; formed after the fresh results were seen)"
    assert set(check) == {saved["chosen"]["what"], "10 steps, 8 samples (FID)", "MACs alone (baseline: the cost, no training)",
                          "parameter count alone (baseline: the cost, no training)", combo,
                          "held-out output MSE after 10 steps (no sampling)"}
    assert paired["kendall_tau_first"] == pytest.approx(1.0) and not paired["post_hoc"] and check[combo]["post_hoc"]
    # the rank sum is taken over all 8 candidates (tied values share a rank): the proxy's ranks plus the MACs'
    proxy = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 1.0, 2.0, 3.0])
    from scipy.stats import kendalltau, rankdata

    macs = -np.array([float(r["macs"]) for r in first + fresh])
    y = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 32.0, 35.0, 60.0])
    assert check[combo]["kendall_tau_all"] == pytest.approx(kendalltau(rankdata(proxy) + rankdata(macs), y).statistic)
    assert run.choose([{"what": "macs", "kendall_tau": 1.0, "cost_fraction_mean": 0.0, "baseline": True}]) is None
    # partial tau: a cost unrelated to both leaves the tau as it is; one that ranks the reference perfectly leaves nothing
    assert run.partial_tau([1, 2, 3, 4], [1, 2, 3, 4], [2, 4, 1, 3]) == pytest.approx(1.0)
    assert np.isnan(run.partial_tau([1, 2, 3, 4], [1, 2, 4, 3], [1, 2, 4, 3]))
    # a score given itself (with ties, where float rounding leaves its tau a hair under 1) has no partial tau
    ties = np.array([2e8, 2e8, 3e8])
    assert np.isnan(run.partial_tau(ties, np.arange(3.0), ties))
    assert [r["set"] for r in csv.DictReader((tmp_path / "proxy_fidelity.csv").open())][-1] == "fresh"


def test_a_second_fresh_list_is_checked_on_its_own_and_leaves_the_first_check_as_it_was(tmp_path):
    args = argparse.Namespace(teacher="tiny", long_steps=100, checkpoints=[10], score_checkpoints=[10], proxy_samples=8,
                              long_samples=32, default_steps=10, seed=0, batch_size=4, lr=1e-3, sampler_steps=5,
                              guidance=4.0, notes=None)
    meta = {"machine": "test", "sampler": "PNDMScheduler", "torch": torch.__version__, "wall_seconds": 60}
    first = [_fidelity_row(n, "layer-removal", p, f) for n, p, f in [("a", 2.0, 10.0), ("b", 1.0, 20.0), ("c", 3.0, 30.0),
                                                                       ("d", 5.0, 40.0), ("e", 4.0, 50.0)]]
    fresh = [_fidelity_row(n, "channel-pruning", p, f) for n, p, f in [("f", 1.5, 15.0), ("g", 3.5, 35.0), ("h", 2.5, 45.0)]]
    # the second list: the proxy orders x, y, z the wrong way round, MACs the right way
    second = [_fidelity_row(n, "recombination", p, f) for n, p, f in [("x", 6.0, 12.0), ("y", 4.5, 25.0), ("z", 0.5, 55.0)]]
    for r in fresh:
        r["set"] = "fresh"
    for r in second:
        r["set"] = "fresh-b"
    for r, m in zip(first + fresh + second, [5e8, 4e8, 3e8, 2e8, 1e8, 6e8, 3e8, 2e8, 9e8, 5e8, 1e8]):
        r["macs"] = m
    run.analyse(first + fresh, args, meta, tmp_path / "before")
    run.analyse(first + fresh + second, args, meta, tmp_path / "after")
    before, after = (json.loads((tmp_path / d / "proxy_fidelity.json").read_text()) for d in ("before", "after"))
    assert after["fresh_check"] == before["fresh_check"] and after["settings"] == before["settings"] and before["second_check"] == []
    check = {c["what"]: c for c in after["second_check"]}
    assert set(check) == {c["what"].replace("formed after the fresh results were seen", "fixed before these candidates were run")
                          for c in before["fresh_check"]}
    combo = check["10 steps, 8 samples + MACs alone (rank sum; fixed before these candidates were run)"]
    proxy = check["10 steps, 8 samples (FID)"]
    assert not combo["post_hoc"] and (combo["first"], combo["fresh"], combo["all"]) == (8, 3, 11)
    # 3 pairs within the second list + 3 x 8 with the earlier candidates
    assert proxy["pairs_with_fresh"] == combo["pairs_with_fresh"] == 27
    assert proxy["kendall_tau_fresh"] == pytest.approx(-1.0) and check["MACs alone (baseline: the cost, no training)"]["kendall_tau_fresh"] == pytest.approx(1.0)
    from scipy.stats import kendalltau, rankdata

    p = np.array([2.0, 1.0, 3.0, 5.0, 4.0, 1.5, 3.5, 2.5, 6.0, 4.5, 0.5])
    m = -np.array([5e8, 4e8, 3e8, 2e8, 1e8, 6e8, 3e8, 2e8, 9e8, 5e8, 1e8])
    y = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 15.0, 35.0, 45.0, 12.0, 25.0, 55.0])
    assert combo["kendall_tau_all"] == pytest.approx(kendalltau(rankdata(p) + rankdata(m), y).statistic)
    assert combo["kendall_tau_fresh"] == pytest.approx(kendalltau((rankdata(p) + rankdata(m))[8:], y[8:]).statistic)
    # the latent-statistics score here is the long FID / 10: picked on the first five, perfect over all 11, and
    # the reading says a score fixed beforehand reaches tau >= 0.8 over all candidates
    lss = check["zero-cost `latent_stat_shift` (no training)"]
    assert not lss["post_hoc"] and lss["kendall_tau_all"] == pytest.approx(1.0) and round(proxy["kendall_tau_all"], 3) == -0.055
    assert "reaches tau >= 0.8 over all of them" in (tmp_path / "after" / "proxy_fidelity.md").read_text()
    # without it, only MACs (0.850 over all 11) reaches 0.8; a cost baseline is no proxy and cannot meet the target
    for r in first + fresh + second:
        r["zero_cost"]["latent_stat_shift"] = r["evals"]["10"]["proxy"]["proxy_fid"]
    run.analyse(first + fresh + second, args, meta, tmp_path / "no-lss")
    no_lss = {c["what"]: c for c in json.loads((tmp_path / "no-lss" / "proxy_fidelity.json").read_text())["second_check"]}
    assert round(no_lss["MACs alone (baseline: the cost, no training)"]["kendall_tau_all"], 3) == 0.85
    assert max(c["kendall_tau_all"] for c in no_lss.values() if not c["baseline"] and not c["post_hoc"]) < 0.8
    assert "target is not met over all candidates" in (tmp_path / "no-lss" / "proxy_fidelity.md").read_text()
    assert [r["set"] for r in csv.DictReader((tmp_path / "after" / "proxy_fidelity.csv").open())][-3:] == ["fresh-b"] * 3
    # two fresh-b candidates are not enough for a check
    run.analyse(first + fresh + second[:2], args, meta, tmp_path / "two")
    assert json.loads((tmp_path / "two" / "proxy_fidelity.json").read_text())["second_check"] == []


def test_fidelity_sweep_scales_costs_ranks_failures_last_and_picks_by_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "SETTINGS", [("s1", 4, 1e-3, (10, 20)), ("s2", 16, 2e-3, (10,)), ("s3", 8, 1e-3, (10,))])
    longs = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "e": 50.0, "f": 15.0, "g": 35.0, "h": 45.0}
    records = [_fidelity_row(n, "layer-removal", 1.0, f) for n, f in longs.items()]
    for r in records[5:]:
        r["set"] = "fresh"

    def ev(steps_scores, seconds_per_step=0.25):
        return {"evals": {str(n): {"distill_seconds": seconds_per_step * n, "heldout": {"output_mse": s, "seconds": 0.5}}
                          for n, s in steps_scores}}

    runs = {"calibration": {n: ev([(10, 0.1)], 1.0) for n in longs},  # twice as slow as the long runs' machine (5 s at step 10)
            # s1: reversed at step 10, the reference's order at 20, except that e diverged after step 10 (no step 20)
            "s1": {n: ev([(10, -f), (20, f)] if n != "e" else [(10, -f)]) for n, f in longs.items()},
            "s2": {n: ev([(10, [3, 1, 2, 5, 4, 1, 2, 3][i])]) for i, n in enumerate(longs)},
            "s3": {n: ev([(10, 1.0)]) for n in list(longs)[:-1]}}  # h was never run with s3: the setting is left out
    table = {s["what"]: s for s in sweep.sweep_scores(records, runs)}
    s1_20 = "s1: held-out output MSE after 20 steps (batch 4, lr 0.001)"
    assert set(table) == {"s1: held-out output MSE after 10 steps (batch 4, lr 0.001)", s1_20,
                          "s2: held-out output MSE after 10 steps (batch 16, lr 0.002)"}
    assert np.isinf(table[s1_20]["score"][4]) and table[s1_20]["score"][0] == 10.0
    # this machine's seconds halved onto the long run's; the failed run costs what it ran (10 steps, no score)
    assert table[s1_20]["cost"][0] == pytest.approx(0.5 * 5.5) and table[s1_20]["cost"][4] == pytest.approx(0.5 * 2.5)
    args = argparse.Namespace(teacher="tiny", long_steps=100, heldout_latents=64, seed=0, notes=None, batch_size=16, lr=5e-4)
    ref = {n: [f] for n, f in longs.items()}
    report = sweep.analyse(records, runs, ref, None, args, {"machine": "test", "torch": torch.__version__}, tmp_path)
    # the long run costs 50 + 10 s: step 20 costs 2.75 of it (the failed run 1.25)
    assert report["chosen"]["what"] == s1_20 and report["chosen"]["kendall_tau"] == pytest.approx(1.0)
    assert report["chosen"]["cost_fraction_mean"] == pytest.approx((4 * 2.75 + 1.25) / 5 / 60)
    assert report["chosen"]["failed_first"] == 1 and report["chosen"]["kendall_tau_all"] == pytest.approx(1.0)
    by_what = {t["what"]: t for t in report["table"]}
    assert by_what["s1: held-out output MSE after 10 steps (batch 4, lr 0.001)"]["kendall_tau"] == pytest.approx(-1.0)
    assert {c["speed"] for c in report["calibration"].values()} == {0.5} and report["long_samples"] == 32
    assert (tmp_path / "proxy_fidelity_sweep.md").stat().st_size > 0
    assert (tmp_path / "proxy_fidelity_sweep.png").stat().st_size > 1000


def _ema_record(name, seed, raw, ema, raw_earlier, ema_earlier):
    ev = lambda v: {"proxy_fid": v}  # noqa: E731
    return {"candidate": name, "train_seed": seed, "machine": "cpu-x", "status": "ok", "config": {"batch_size": 16, "lr": 5e-4, "ema_decay": 0.99},
            "ema": {"last_decay": 0.978}, "evals": {"380": {"raw": ev(raw_earlier), "ema": ev(ema_earlier)}, "400": {"raw": ev(raw), "ema": ev(ema)}}}


def test_ema_check_pools_the_seed_spread_of_both_weights_and_reads_the_fixed_ratio(tmp_path):
    check = ema_check
    out = tmp_path / "pf"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "bk-sdm-tiny.json").write_text(json.dumps({"candidate": "bk-sdm-tiny", "status": "ok", "train_seed": 0,
                                                               "evals": {"400": {"long": {"proxy_fid": 41.5}}}}))
    recs = [_ema_record("bk-sdm-tiny", 0, 40.0, 41.0, 43.0, 41.5), _ema_record("bk-sdm-tiny", 1, 44.0, 42.0, 41.0, 42.5),
            _ema_record("drop-mid-attention", 0, 50.0, 48.0, 47.0, 48.0), _ema_record("drop-mid-attention", 1, 46.0, 47.0, 50.0, 47.0)]
    rep = check.analyse(recs, out, tmp_path / "results", 400, 380)
    # raw: groups (40, 44) and (50, 46), pooled sd sqrt((8 + 8) / 2); EMA: (41, 42) and (48, 47), sqrt((0.5 + 0.5) / 2)
    assert rep["raw_seed_sd"]["train_sd"] == pytest.approx(np.sqrt(8.0)) and rep["raw_seed_sd"]["df"] == 2
    assert rep["ema_seed_sd"]["train_sd"] == pytest.approx(np.sqrt(0.5))
    assert rep["sd_ratio"] == pytest.approx(0.25) and rep["adopted"] is True
    assert sorted(rep["within_run_change_raw"]) == [3.0, 3.0, 3.0, 4.0] and sorted(rep["within_run_change_ema"]) == [0.0, 0.0, 0.5, 0.5]
    assert rep["raw_minus_recorded_same_seed"] == [pytest.approx(-1.5)]  # tiny seed 0 against run.py's own run
    row = rep["rows"][0]
    assert (row["candidate"], row["train_seed"], row["raw_earlier"], row["raw"], row["ema_earlier"], row["ema"],
            row["recorded_raw_same_seed"]) == ("bk-sdm-tiny", 0, 43.0, 40.0, 41.5, 41.0, [41.5])
    assert (tmp_path / "results" / "proxy_fidelity_ema.md").stat().st_size > 0
    # the same EMA spread against a raw spread that is not twice as large: not adopted
    recs[1] = _ema_record("bk-sdm-tiny", 1, 41.0, 42.0, 41.0, 42.5)
    recs[3] = _ema_record("drop-mid-attention", 1, 49.0, 47.0, 50.0, 47.0)
    rep = check.analyse(recs, out, tmp_path / "results", 400, 380)
    assert rep["sd_ratio"] == pytest.approx(1.0) and rep["adopted"] is False
    # the same from records: the run and the ema_check records packed, read through ema_check's own reading
    for r in recs:
        Records(out).write(f"ema_check/{r['candidate']}.seed{r['train_seed']}.json", r)
    Records(out).pack()
    assert sorted(p.name for p in out.iterdir()) == ["ema_check.tar.xz", "runs.tar.xz"]
    assert check.main(["--out", str(out), "--results", str(tmp_path / "packed"), "--analyse-only"]) == 0
    assert json.loads((tmp_path / "packed" / "proxy_fidelity_ema.json").read_text()) == json.loads(json.dumps(rep))


@pytest.mark.slow
def test_ema_check_scores_both_weights_and_the_average_starts_as_the_weights(tmp_path, monkeypatch):
    import functools

    from hybridsd_nas.arch import describe
    from hybridsd_nas.distill import fashion_mnist_data
    from hybridsd_nas.sources import load_pipeline
    from hybridsd_nas.proxy import ProxySettings

    check = ema_check
    monkeypatch.setattr(check, "ProxySettings", functools.partial(ProxySettings, reference_images=16, kid_subset=4))
    pipe = load_pipeline("tiny")
    from diffusers import DDPMScheduler

    args = argparse.Namespace(teacher="tiny", eval_steps=[1, 3], long_samples=6, seed=0, train_seed=0, sampler_steps=2, guidance=4.0,
                              batch_size=4, lr=5e-4, ema_decay=0.99, device="cpu")
    rec = check.check_candidate("small-prune-ff-half", args, pipe, describe("tiny"), fashion_mnist_data(pipe, n=32, seed=0),
                                DDPMScheduler.from_config(pipe.scheduler.config))
    assert rec["status"] == "ok" and rec["ema"]["steps"] == 3 and set(rec["evals"]) == {"1", "3"}
    one, three = rec["evals"]["1"], rec["evals"]["3"]
    assert one["ema"]["proxy_fid"] == pytest.approx(one["raw"]["proxy_fid"], rel=1e-6)  # after one step the average is the weights
    assert three["ema"]["proxy_fid"] != pytest.approx(three["raw"]["proxy_fid"], rel=1e-6)  # then it lags them
    with pytest.raises(SystemExit, match="recombination"):
        check.check_candidate("asdm-m1", args, pipe, describe("tiny"), None, None)


def _first_run(name, proxy, raw, heldout=None):
    """A synthetic first run of run.py: proxy FID ``proxy`` and held-out MSE ``heldout`` (default: the
    proxy's figure) at 10 steps costing 5% of a 100-step long run with raw long FID ``raw``."""
    heldout = proxy if heldout is None else heldout
    ev = lambda fid, secs: {"proxy_fid": fid, "kid": 0.0, "fid_real": 100.0, "adherence": 0.5, "eval_seconds": secs}  # noqa: E731
    return {"candidate": name, "candidate_key": name, "space": "layer-removal", "params": 1e6, "macs": 1e8 / proxy,
            "trainable_params": 1e6, "frozen_params": 0, "zero_cost": {"output_mse": heldout, "latent_stat_shift": 0.1},
            "zero_cost_seconds": 0.1, "status": "ok", "train_seed": 0,
            "evals": {"10": {"distill_seconds": 1.0, "heldout": {"output_mse": heldout, "seconds": 0.5}, "proxy": ev(proxy, 1.5)},
                      "100": {"distill_seconds": 50.0, "heldout": {"output_mse": heldout, "seconds": 0.5}, "long": ev(raw, 10.0)}}}


def _repeat(name, tag, seed, raw, ema, decay=0.99):
    """A synthetic run.py repeat (``--replicate tag``): raw long FID ``raw`` and, unless None, the EMA's ``ema``."""
    at = {"long": {"proxy_fid": raw}} | ({"long_ema": {"proxy_fid": ema}} if ema is not None else {})
    return name, tag, {"candidate": name, "status": "ok", "train_seed": seed, "ema": {"decay": decay} if ema is not None else None,
                       "evals": {"100": {"distill_seconds": 50.0, **at}}}


def _ema_ref_rows(out):
    """First runs of four real candidate names (the reader takes names from run.py's lists), proxy FIDs
    1-4 at 10 steps costing 5% of a 100-step long run, and their EMA repeats (two run.py repeats per
    candidate, the tiny one from ema_check.py records instead)."""
    first, rep = _first_run, _repeat
    (out / "runs").mkdir(parents=True)
    (out / "replicates").mkdir()
    (out / "ema_check").mkdir()
    for name, proxy, raw in (("bk-sdm-base", 1.0, 12.0), ("bk-sdm-small", 2.0, 11.0), ("bk-sdm-tiny", 3.0, 30.0), ("drop-mid", 4.0, 40.0)):
        (out / "runs" / f"{name}.json").write_text(json.dumps(first(name, proxy, raw)))
    for name, tag, r in (rep("bk-sdm-base", "ema-seed0", 0, 12.0, 10.0), rep("bk-sdm-base", "ema-seed1", 1, 14.0, 10.0),
                         rep("bk-sdm-small", "ema-seed0", 0, 11.5, 20.0), rep("bk-sdm-small", "ema-seed1", 1, 10.5, 20.0),
                         rep("drop-mid", "ema-seed0", 0, 40.0, 40.0), rep("drop-mid", "ema-seed1", 1, 42.0, 39.0),
                         rep("drop-mid", "ema9-seed0", 0, 40.5, 5.0, decay=0.9),  # another decay: not this reference
                         rep("bk-sdm-tiny", "seed1", 1, 31.0, None)):  # a raw repeat: the raw reference only
        (out / "replicates" / f"{name}.{tag}.json").write_text(json.dumps(r))
    for seed, ema in ((0, 30.0), (1, 41.0)):  # the tiny one's seed 1 puts it after drop-mid's
        (out / "ema_check" / f"bk-sdm-tiny.seed{seed}.json").write_text(json.dumps(
            {"candidate": "bk-sdm-tiny", "train_seed": seed, "status": "ok", "ema": {"decay": 0.99},
             "evals": {"100": {"raw": {"proxy_fid": 99.0}, "ema": {"proxy_fid": ema}}}}))


@pytest.mark.slow
def test_ema_reference_reads_every_source_and_a_score_must_hold_on_each_seed_to_replace_the_default(tmp_path, capsys, monkeypatch):
    ref = ema_reference
    out = tmp_path / "pf"
    _ema_ref_rows(out)
    argv = ["--out", str(out), "--results", str(tmp_path / "r"), "--long-steps", "100", "--checkpoints", "10",
            "--proxy-samples", "8", "--default-steps", "10"]
    assert ref.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_text())
    assert "ema9-seed0" in capsys.readouterr().err  # another decay: warned of, not used
    # the same records packed read the same
    shutil.copytree(out, tmp_path / "packed")
    assert set(Records(tmp_path / "packed").pack()) == {"runs", "replicates", "ema_check"}
    assert ref.main(["--out", str(tmp_path / "packed"), "--results", str(tmp_path / "r-packed"), *argv[4:]]) == 0
    assert (tmp_path / "r-packed" / "proxy_fidelity_ema_reference.json").read_bytes() == (
        tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_bytes()
    pc = {c["candidate"]: c for c in rep["per_candidate"]}
    assert pc["bk-sdm-tiny"]["ema_by_seed"] == {"0": [30.0], "1": [41.0]}  # from ema_check.py's records
    assert [pc[n]["ema_reference"] for n in ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "drop-mid")] == [10.0, 20.0, 35.5, 39.5]
    # raw: base seed 0 is 12 twice (one run made twice, counted once) and 14 -> 13; tiny 30 and its raw repeat 31;
    # the ema_check runs' raw FIDs (99) are not in run.py's raw reference
    assert pc["bk-sdm-base"]["raw_reference"] == pytest.approx(13.0) and pc["bk-sdm-tiny"]["raw_reference"] == pytest.approx(30.5)
    # EMA seed-to-seed sd pooled: (0 + 0 + 60.5 + 0.5) / 4 df
    assert rep["ema_seed_sd"]["train_sd"] == pytest.approx(np.sqrt(61.0 / 4)) and rep["ema_seed_sd"]["df"] == 4
    assert rep["complete"] is True
    s = {x["what"]: x for x in rep["settings"]}
    d = s[rep["default"]]
    assert rep["default"] == "10 steps, 8 samples (FID)" and d["cost_fraction_mean"] == pytest.approx(2.5 / 60)
    # the proxy orders the four as the two-seed reference and seed 0 do; seed 1 alone swaps tiny and drop-mid;
    # the raw reference puts small before base
    assert d["kendall_tau"] == pytest.approx(1.0) and d["kendall_tau_seed0"] == pytest.approx(1.0)
    assert d["kendall_tau_seed1"] == pytest.approx(4 / 6) and d["kendall_tau_raw_reference"] == pytest.approx(4 / 6)
    assert rep["target_met"] is True and rep["adoptable"] == []  # the headline needs the mean; replacing needs every seed
    # context: what a whole long run ranks at (the first runs' raw FIDs put small before base; their held-out MSE at
    # the last step is the proxy's order here)
    ctx = {c["what"].split(" (")[0]: c for c in rep["context"]}
    assert ctx["one long run, raw weights"]["kendall_tau"] == pytest.approx(4 / 6)
    assert ctx["one long run's held-out output MSE at step 100"]["kendall_tau"] == pytest.approx(1.0)
    assert ctx["one long run's held-out output MSE at step 100"]["kendall_tau_seed1"] == pytest.approx(4 / 6)
    assert (tmp_path / "r" / "proxy_fidelity_ema_reference.png").is_file()
    # with seed 1 in order too, the proxy passes the rule, and so do the two scores given the same numbers here
    # (the held-out MSE and the zero-cost output MSE); MACs (fewer, worse: ranks them perfectly too) is a baseline, never a default
    (out / "ema_check" / "bk-sdm-tiny.seed1.json").write_text(json.dumps(
        {"candidate": "bk-sdm-tiny", "train_seed": 1, "status": "ok", "ema": {"decay": 0.99}, "evals": {"100": {"ema": {"proxy_fid": 38.0}}}}))
    assert ref.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_text())
    assert sorted(rep["adoptable"]) == ["10 steps, 8 samples (FID)", "held-out output MSE after 10 steps (no sampling)",
                                        "zero-cost `output_mse` (no training)"]
    # a candidate without its second seed: interim, nothing adopted or judged
    (out / "replicates" / "drop-mid.ema-seed1.json").unlink()
    assert ref.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_text())
    assert rep["complete"] is False and rep["target_met"] is None and rep["adoptable"] is None
    assert rep["candidates"] == 4 and sum(len(c["ema_by_seed"]) == 2 for c in rep["per_candidate"]) == 3
    # a first run that shared the cores: its stretched seconds stay out of the cost, its rank does not
    slow = json.loads((out / "runs" / "drop-mid.json").read_text())
    slow["evals"]["10"]["distill_seconds"] = 50.0
    (out / "runs" / "drop-mid.json").write_text(json.dumps(slow))
    monkeypatch.setattr(ref, "SHARED_CORES", ("drop-mid",))
    assert ref.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_text())
    assert rep["settings"][0]["cost_fraction_mean"] == pytest.approx(2.5 / 60) and rep["cost_left_out"] == ["drop-mid"]
    with pytest.raises(SystemExit) as e:
        ref.main(["--out", str(tmp_path / "nowhere")])
    assert e.value.code == 2


@pytest.mark.slow
def test_ema_reference_reads_the_third_fresh_list_from_first_runs_that_kept_the_average_and_decides_by_its_rule(tmp_path, monkeypatch):
    ref = ema_reference
    out = tmp_path / "pf"
    _ema_ref_rows(out)  # EMA reference: base 10, small 20, tiny 35.5 (30, 41), drop-mid 39.5 (40, 39); proxy = MSE = 1..4
    monkeypatch.setattr(ref, "RANKING_STEPS", 10)  # the synthetic runs take the held-out MSE at step 10
    # three of the third list: the first run kept the average (seed 0), a repeat gives seed 1. References 15, 17, 50
    # (between base and small, then last); the held-out MSE orders them so, the default FID proxy swaps the first two
    third = {"drop-down-attentions": (1.8, 1.4, 15.0, 15.0), "bk-base-middle-stages": (1.5, 1.6, 16.0, 18.0),
             "prune-ff-mild": (5.0, 5.0, 50.0, 50.0)}  # name: (proxy FID, held-out MSE, EMA seed 0, EMA seed 1)

    def write(scores):
        for name, (proxy, held, ema0, ema1) in scores.items():
            r = _first_run(name, proxy, 60.0, heldout=held) | {"set": "fresh-c", "ema": {"decay": 0.99}}
            r["evals"]["100"]["long_ema"] = {"proxy_fid": ema0}
            (out / "runs" / f"{name}.json").write_text(json.dumps(r))
            _, tag, rr = _repeat(name, "ema-seed1", 1, 61.0, ema1)
            (out / "replicates" / f"{name}.{tag}.json").write_text(json.dumps(rr))

    write(third)
    argv = ["--out", str(out), "--results", str(tmp_path / "r"), "--long-steps", "100", "--checkpoints", "10",
            "--proxy-samples", "8", "--default-steps", "10"]
    result = lambda: json.loads((tmp_path / "r" / "proxy_fidelity_ema_reference.json").read_text())  # noqa: E731
    # 3 of the list's 5 run: interim, though every candidate there has both seeds
    assert ref.main(argv) == 0
    rep = result()
    pc = {c["candidate"]: c for c in rep["per_candidate"]}
    assert pc["drop-down-attentions"]["ema_by_seed"] == {"0": [15.0], "1": [15.0]}  # seed 0 from the first run itself
    assert pc["bk-base-middle-stages"]["ema_reference"] == 17.0
    assert rep["third_list"] == {"candidates": list(third), "of": 5, "all_run": False}
    assert rep["complete"] is False and rep["adoptable"] is None and rep["ranking_decision"] is None
    s = {x["what"]: x for x in rep["settings"]}
    held, d = s["held-out output MSE after 10 steps (no sampling)"], s["10 steps, 8 samples (FID)"]
    assert held["kendall_tau_third"] == pytest.approx(1.0) and d["kendall_tau_third"] == pytest.approx(1 / 3)
    # the whole list run (here: the three): the rule reads
    monkeypatch.setitem(ref.run.LISTS, "fresh-c", [(n, None) for n in third])
    assert ref.main(argv) == 0
    rep = result()
    s = {x["what"]: x for x in rep["settings"]}
    held, d = s["held-out output MSE after 10 steps (no sampling)"], s["10 steps, 8 samples (FID)"]
    assert rep["complete"] is True
    # over the 7 the held-out MSE is in the reference's order (seed 1 alone swaps tiny and drop-mid: 20 of 21 pairs);
    # the default swaps the third list's first two too: 0.905 over all and on seed 0, 0.81 on seed 1, all >= 0.8 ...
    assert held["kendall_tau"] == pytest.approx(1.0) and held["kendall_tau_seed1"] == pytest.approx(19 / 21)
    assert d["kendall_tau"] == pytest.approx(19 / 21) and d["kendall_tau_seed0"] == pytest.approx(19 / 21)
    assert d["kendall_tau_seed1"] == pytest.approx(17 / 21)
    # ... but 1/3 over the third list alone: no target met, and not a score that passes
    assert rep["target_met"] is False and d["what"] not in rep["adoptable"] and held["what"] in rep["adoptable"]
    rd = rep["ranking_decision"]
    assert rd["adopted"] is True and all(rd["checks"].values()) and rd["against"] == d["what"] and rd["score"] == held["what"]
    # the held-out MSE ranking the third list worse than the default: the decision keeps the default
    write({n: (h, p, e0, e1) for n, (p, h, e0, e1) in third.items()})  # the two scores' figures exchanged
    assert ref.main(argv) == 0
    rd = result()["ranking_decision"]
    assert rd["adopted"] is False and rd["checks"]["third_list_at_least_as_well"] is False


@pytest.mark.slow
def test_settle_scales_costs_by_its_control_ranks_failures_last_and_picks_only_a_variant_that_holds_on_each_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(settle, "STEPS", 10)  # the synthetic first runs score their held-out MSE at step 10
    out = tmp_path / "pf"
    _ema_ref_rows(out)  # first runs: held-out MSE 1-4 at step 10 after 1 s of distillation; long runs 60 s
    # the reference (EMA, two seeds): base 10, small 20, tiny 35.5 (30, 41), drop-mid 39.5 (40, 39): seed 1 alone swaps the last two
    names = ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "drop-mid")

    def rec(score, secs=0.4, status="ok"):
        r = {"status": status, "reason": None if status == "ok" else "diverged", "distill_seconds": secs, "config": {}, "ema": None}
        return r | ({"heldout": {"output_mse": score, "seconds": 0.1}} if status == "ok" else {})

    def write(variants_of):
        (out / "settle").mkdir(exist_ok=True)
        for i, n in enumerate(names):
            (out / "settle" / f"{n}.json").write_text(json.dumps({"candidate": n, "machine": "test CPU", "variants": variants_of(i)}))

    # control: the first runs' training in half their seconds (speed 2), the same held-out MSE but the tiny one's (+1%);
    # cosine orders the four as the two-seed reference does; ema swaps the first two
    write(lambda i: {"constant": rec([1.0, 2.0, 3.03, 4.0][i], secs=0.5), "cosine": rec(0.1 * (i + 1)), "ema": rec([2, 1, 3, 4][i] * 0.01)})
    argv = ["--out", str(out), "--results", str(tmp_path / "r"), "--long-steps", "100", "--analyse-only"]
    assert settle.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_settle.json").read_text())
    s = {x["variant"]: x for x in rep["settings"]}
    assert rep["complete"] is True and rep["speed"]["median"] == pytest.approx(2.0)
    assert s["cosine"]["cost_fraction_mean"] == pytest.approx(2 * 0.5 / 60)  # (0.4 s + 0.1 s held-out) x 2, of 60 s
    ctl = rep["control"]["without_base"]
    assert ctl["max_relative_difference"] == pytest.approx(0.01) and ctl["worst"] == "bk-sdm-tiny" and ctl["candidates"] == 4
    assert "recombinations" not in rep["control"]
    assert s["cosine"]["kendall_tau"] == pytest.approx(1.0) and s["cosine"]["kendall_tau_seed1"] == pytest.approx(4 / 6)
    assert s["ema"]["kendall_tau"] == pytest.approx(4 / 6)
    assert rep["passing"] == [] and rep["picked"] is None  # cosine holds on the mean, not on seed 1 alone
    assert (tmp_path / "r" / "proxy_fidelity_settle.png").is_file()
    # seed 1 in order too: cosine passes; the control, as good, is not a candidate; ema's swap keeps it out
    (out / "ema_check" / "bk-sdm-tiny.seed1.json").write_text(json.dumps(
        {"candidate": "bk-sdm-tiny", "train_seed": 1, "status": "ok", "ema": {"decay": 0.99}, "evals": {"100": {"ema": {"proxy_fid": 38.0}}}}))
    assert settle.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_settle.json").read_text())
    assert rep["passing"] == ["cosine"] and rep["picked"] == "cosine"
    # over the cost budget it does not pass; a failed run ranks last and is named
    write(lambda i: {"constant": rec(float(i + 1), secs=0.5), "cosine": rec(0.1 * (i + 1), secs=3.5),
                     "ema": rec(0.01, status="failed") if i == 0 else rec(0.01 * (i + 1))})
    assert settle.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_settle.json").read_text())
    s = {x["variant"]: x for x in rep["settings"]}
    assert s["cosine"]["cost_fraction_mean"] == pytest.approx(2 * 3.6 / 60) and rep["passing"] == []
    assert s["ema"]["failed"] == ["bk-sdm-base"] and s["ema"]["kendall_tau"] == pytest.approx(0.0)  # base first -> last
    # a candidate without every variant: interim, nothing picked
    (out / "settle" / "drop-mid.json").write_text(json.dumps({"candidate": "drop-mid", "variants": {"constant": rec(4.0)}}))
    assert settle.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_settle.json").read_text())
    assert rep["complete"] is False and rep["missing"] == ["drop-mid"] and rep["picked"] is None
    with pytest.raises(SystemExit) as e:
        settle.main(["--out", str(out), "--only", "no-such-candidate", "--analyse-only"])
    assert e.value.code == 2


def _set_heldout(out, mse: dict, distill_40: float) -> None:
    """Set the synthetic first runs' held-out MSE (``mse[name][step]``, 0.5 s per evaluation) and their
    distillation seconds to step 40."""
    for name, by_step in mse.items():
        f = out / "runs" / f"{name}.json"
        r = json.loads(f.read_text())
        for n, v in by_step.items():
            r["evals"].setdefault(str(n), {})["heldout"] = {"output_mse": v, "seconds": 0.5}
        r["evals"]["40"]["distill_seconds"] = distill_40
        f.write_text(json.dumps(r))


def test_bound_combines_the_measured_scores_post_hoc_and_finds_the_best_within_the_cost(tmp_path, monkeypatch):
    bnd = bound
    # leave-one-out least squares on an exact line predicts every point
    x = np.arange(6.0)
    assert np.allclose(bnd.loo_fit(np.c_[np.ones(6), x], 1 + 2 * x), 1 + 2 * x)
    out = tmp_path / "pf"
    _ema_ref_rows(out)  # reference: base 10, small 20, tiny 35.5, drop-mid 39.5; MACs 1e8 / (1, 2, 3, 4)
    mse40 = {"bk-sdm-base": 0.45, "bk-sdm-small": 0.1, "bk-sdm-tiny": 0.3, "drop-mid": 0.5}

    def write(distill_40=2.0):
        _set_heldout(out, {name: {10: 2 * m, 20: 1.5 * m, 40: m} for name, m in mse40.items()}, distill_40)

    write()
    argv = ["--out", str(out), "--results", str(tmp_path / "r"), "--long-steps", "100"]
    assert bnd.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_bound.json").read_text())
    s = {x["what"]: x for x in rep["scores"]}
    # the held-out MSE alone puts small, tiny, base, drop-mid: 2 of 6 pairs the wrong way
    adopted = s["held-out output MSE after 40 steps (the adopted ranking score)"]
    assert adopted["kendall_tau"] == pytest.approx(1 / 3) and adopted["cost_fraction_mean"] == pytest.approx(2.5 / 60)
    # log MSE - 3 log MACs orders them as the reference; with weight 2 small and base swap
    assert s["log MSE@40 - 3 log MACs"]["kendall_tau"] == pytest.approx(1.0)
    assert s["log MSE@40 - 2 log MACs"]["kendall_tau"] == pytest.approx(4 / 6) and s["log MSE@40 - 2 log MACs"]["searched"] is True
    assert s["log MSE@40 + 1 x its slope over steps 10-40"]["cost_fraction_mean"] == pytest.approx(3.0 / 60)
    # 4 candidates: the small fit (3 regressors) is there, the large one (7) is not
    assert any(w.startswith("leave-one-out least squares of the reference") for w in s)
    assert not any(w.startswith("leave-one-out least squares on log MSE@10") for w in s)
    assert rep["best_tau"] == pytest.approx(1.0) and rep["reaches_target"] is True and rep["complete"] is True
    assert (tmp_path / "r" / "proxy_fidelity_bound.md").stat().st_size > 0
    assert rep["context"][0]["what"].startswith("held-out output MSE at step 100")
    write(distill_40=10.0)  # 10.5 s of 60: every combination over the budget
    assert bnd.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_bound.json").read_text())
    assert rep["best"] is None and rep["reaches_target"] is False
    with pytest.raises(SystemExit) as e:
        bnd.main(["--out", str(tmp_path / "nowhere")])
    assert e.value.code == 2


def test_extrapolate_reads_the_power_law_of_each_run_at_the_later_step_by_the_same_rule(tmp_path, monkeypatch):
    ext = extrapolate
    monkeypatch.setattr(ext, "AT", 100)  # the synthetic long runs are 100 steps
    out = tmp_path / "pf"
    _ema_ref_rows(out)
    # the reference (EMA): base 10, small 20, tiny 35.5, drop-mid 39.5; seed 1 alone in the same order (tiny 38 < 39)
    (out / "ema_check" / "bk-sdm-tiny.seed1.json").write_text(json.dumps(
        {"candidate": "bk-sdm-tiny", "train_seed": 1, "status": "ok", "ema": {"decay": 0.99}, "evals": {"100": {"ema": {"proxy_fid": 38.0}}}}))
    # exact power laws: at step 40 the base is behind the small one (0.15 > 0.126), at step 100 ahead (0.06 < 0.08)
    laws = {"bk-sdm-base": (6.0, -1.0), "bk-sdm-small": (0.8, -0.5), "bk-sdm-tiny": (0.5, -0.2), "drop-mid": (0.3, 0.0)}

    def write(distill_40=2.0):
        _set_heldout(out, {name: {n: c * n ** b for n in (10, 20, 40, 100)} for name, (c, b) in laws.items()}, distill_40)

    write()
    argv = ["--out", str(out), "--results", str(tmp_path / "r"), "--long-steps", "100"]
    assert ext.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_extrapolate.json").read_text())
    pc = {p["candidate"]: p for p in rep["per_candidate"]}
    assert pc["bk-sdm-base"]["extrapolated"] == pytest.approx(0.06) and pc["bk-sdm-base"]["slope"] == pytest.approx(-1.0)
    assert rep["fit_error_at"]["max_abs_log_ratio"] == pytest.approx(0.0, abs=1e-9)
    s = rep["score"]
    assert s["kendall_tau"] == pytest.approx(1.0) and s["kendall_tau_seed1"] == pytest.approx(1.0)
    assert s["cost_fraction_mean"] == pytest.approx(3.5 / 60)  # 2 s to step 40 and three 0.5 s evaluations, of 60 s
    ctx = {c["what"]: c for c in rep["context"]}
    assert ctx["held-out output MSE measured after 40 steps"]["kendall_tau"] == pytest.approx(4 / 6)
    assert rep["complete"] is True and rep["passes"] is True
    write(distill_40=10.0)  # 11.5 s of 60: over the budget
    assert ext.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_extrapolate.json").read_text())
    assert rep["passes"] is False
    # a run without one of the fitted steps: left out, the reading interim
    r = json.loads((out / "runs" / "drop-mid.json").read_text())
    del r["evals"]["20"]
    (out / "runs" / "drop-mid.json").write_text(json.dumps(r))
    assert ext.main(argv) == 0
    rep = json.loads((tmp_path / "r" / "proxy_fidelity_extrapolate.json").read_text())
    assert rep["missing"] == ["drop-mid"] and rep["complete"] is False and rep["passes"] is None
    with pytest.raises(SystemExit) as e:
        ext.main(["--out", str(tmp_path / "nowhere")])
    assert e.value.code == 2
