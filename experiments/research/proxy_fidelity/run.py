"""Rank fidelity of the quality proxy: does a short distillation rank candidates the way a long one does?

Every candidate (BK-SDM-Base/Small/Tiny, A-SDM's M1-M6, dropping the mid block, and dropping the
first Transformer of every attention block) is distilled once for ``--long-steps`` steps. The
distillation loop has a constant learning rate and draws all of its randomness from one seeded
generator, so the student after ``n`` steps of that run
*is* the student a proxy of ``n`` steps trains (``tests/test_proxy.py`` checks this bit for bit).
The run is therefore evaluated on the way: at every ``--checkpoints`` step with the proxy's
evaluation (``--proxy-samples`` fixed prompts and seeds) and at the end with the long evaluation
(``--long-samples``). Each proxy setting is then compared with the long result: Kendall tau and
Spearman rho between proxy FID and long FID (both against the teacher's samples, same prompts and
seeds), and the proxy's cost (its distillation seconds up to step n plus its evaluation seconds) as
a fraction of the long run's cost (distillation to the end plus the long evaluation).

Three more lists check a choice made on those candidates on candidates it was not made on: ``--fresh`` (FRESH),
``--fresh-b`` (FRESH_B, fixed after the first check was read) and ``--fresh-c`` (FRESH_C, fixed after the complete
reading against the EMA reference, ``ema_reference.py``, which reads it).

Recombinations (M1-M6) take their Base blocks from this experiment's long-distilled BK-SDM-Base,
as A-SDM assembles from a trained compressed U-Net; their proxies use the same Base.

    python -m experiments.research.proxy_fidelity.run --out results/proxy_fidelity

Per-candidate results are written as they finish (``<out>/runs/<name>.json``, loose until
``python -m experiments.research.proxy_fidelity.records pack`` folds them into ``<out>/runs.tar.xz``;
``records.py`` reads both); a rerun skips what is there, so an interrupted experiment loses at most
the candidate in progress.

Repeats of the long runs (``--replicate TAG --train-seed N``) can train on an accelerator: ``--device cuda``
(plain float32 unless ``--tf32``; each record names its machine). Where the FID network cannot go with them,
``--defer-fid`` saves each long run's samples instead of scoring them, and ``--score-deferred`` scores them
on this machine against the same cached teacher samples and reference features:

    python -m experiments.research.proxy_fidelity.run --out DIR --replicate seed1 --train-seed 1 --device cuda --defer-fid  # there
    python -m experiments.research.proxy_fidelity.run --out DIR --replicate seed1 --train-seed 1 --score-deferred           # here

With ``--ema-decay D`` a run (a first run or a repeat) also keeps an exponential moving average of the
trained weights and gives it the long evaluation (``long_ema`` beside ``long``; deferred alike); the
proxies, the last weights, which this analysis reads, and the Base export stay as without it (the average
does not touch the training; ``ema_check.py`` says why one would keep it).

``noise_floor.py`` then re-evaluates two exported long students on other seed sets; with its report
in ``<out>/noise_floor.json``, ``run.py --analyse-only`` also counts how many of the candidate pairs the
long run separates beyond its own noise (sampling, and run-to-run where replicates measured it) each
score orders the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import faulthandler
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from experiments.research.proxy_fidelity.records import Records
from hybridsd_nas.build import build_student
from hybridsd_nas.arch import describe, plan, resolve_candidate
from hybridsd_nas.core.errors import InvalidCandidateError
from hybridsd_nas.cost import estimate_cost
from hybridsd_nas.distill import DistillConfig, averaged_weights, distill, fashion_mnist_data
from hybridsd_nas.sources import load_pipeline, resolve_teacher
from hybridsd_nas.proxy import ProxySettings, evaluate_student, paired_sample_score, zero_cost_scores

CANDIDATES: list[tuple[str, object]] = [
    ("bk-sdm-base", "bk-sdm-base"),  # first: the Base the recombinations take their blocks from
    ("bk-sdm-small", "bk-sdm-small"),
    ("bk-sdm-tiny", "bk-sdm-tiny"),
    ("asdm-m1", "asdm-m1"),
    ("asdm-m2", "asdm-m2"),
    ("asdm-m3", "asdm-m3"),
    ("asdm-m4", "asdm-m4"),
    ("asdm-m5", "asdm-m5"),
    ("asdm-m6", "asdm-m6"),
    ("drop-mid", {"name": "drop-mid", "drop_mid": True}),
    # unit removal: the first Transformer of every cross-attention block, down and up
    ("drop-first-attentions", {"name": "drop-first-attentions",
                               "drop_units": ["down0.0.attn", "down1.0.attn", "down2.0.attn", "up1.0.attn", "up2.0.attn", "up3.0.attn"]}),
]


# Fresh candidates, run after the scores were chosen on the candidates above (``--fresh``): they check a
# choice made on those on candidates it was not made on. Channel pruning is a space of its own here.
def _inner_from_base(arch):
    from hybridsd_nas.arch.candidate import recombine

    inner = (arch.down[-2].name, arch.down[-1].name, arch.up[0].name, arch.up[1].name, "mid")
    return recombine(arch, [b for b in inner if b in arch.block_names], frozen_original=True, name="inner-from-base")


FRESH: list[tuple[str, object]] = [
    ("drop-innermost-stage", {"name": "drop-innermost-stage", "drop_stages": 1}),
    # BK-SDM-Base's layer drops in the two outer stages only (down0/up3, down1/up2)
    ("bk-base-outer-stages", {"name": "bk-base-outer-stages", "drop_layers": ["down0.1", "down1.1", "up2.1", "up3.1"]}),
    # unit removal in the decoder: the last Transformer of every cross-attention up block
    ("drop-last-up-attentions", {"name": "drop-last-up-attentions", "drop_units": ["up1.2.attn", "up2.2.attn", "up3.2.attn"]}),
    ("prune-ff-half", {"name": "prune-ff-half", "prune": {"all": {"ff": 0.5}}}),
    ("prune-resnet-half", {"name": "prune-resnet-half", "prune": {"all": {"resnet": 0.5}}}),
    ("prune-heads-half", {"name": "prune-heads-half", "prune": {"all": {"heads": 0.5}}}),
    ("inner-from-base", _inner_from_base),  # A-SDM-style recombination, the inner stages and mid from the Base
]


# A second fresh list (``--fresh-b``), fixed before any of it was run and after the first check was
# read: it checks, on candidates no score was formed on, the scores that the first check left open (the
# held-out score and the rank sum of the FID proxy and MACs, formed after the fresh results were seen).
def _inner_from_base_trainable(arch):
    from hybridsd_nas.arch.candidate import recombine

    inner = (arch.down[-2].name, arch.down[-1].name, arch.up[0].name, arch.up[1].name, "mid")
    return recombine(arch, [b for b in inner if b in arch.block_names], frozen_original=False, name="inner-from-base-trainable")


def _small_prune_ff_half(arch):
    from hybridsd_nas.arch.candidate import Candidate

    small = resolve_candidate("bk-sdm-small", arch)
    return Candidate(drop_layers=small.drop_layers, drop_mid=True, prune={"all": {"ff": 0.5}}, name="small-prune-ff-half")


FRESH_B: list[tuple[str, object]] = [
    # BK-SDM-Base's layer drops in the two inner stages only (the complement of bk-base-outer-stages)
    ("bk-base-inner-stages", {"name": "bk-base-inner-stages", "drop_layers": ["down2.1", "down3.1", "up0.1", "up1.1"]}),
    ("prune-resnet-mild", {"name": "prune-resnet-mild", "prune": {"all": {"resnet": 0.75}}}),
    ("prune-mixed", {"name": "prune-mixed", "prune": {"all": {"resnet": 0.75, "heads": 0.5, "ff": 0.5}}}),
    # unit removal in the encoder: the second ResNet of every down block
    ("drop-second-down-resnets", {"name": "drop-second-down-resnets",
                                  "drop_units": ["down0.1.resnet", "down1.1.resnet", "down2.1.resnet", "down3.1.resnet"]}),
    ("drop-mid-attention", {"name": "drop-mid-attention", "drop_units": ["mid.0.attn"]}),
    # inner-from-base with nothing frozen (as A-SDM's M4-M6 are M1-M3 unfrozen); the outer stages' own
    # recombination from the Base is asdm-m2 already
    ("inner-from-base-trainable", _inner_from_base_trainable),
    ("small-prune-ff-half", _small_prune_ff_half),  # layer removal and channel pruning together
]


# A third fresh list (``--fresh-c``), fixed in results/proxy_fidelity/notes.md after the complete reading
# against the EMA reference and before any of it was run: the check that rule asks of a score before it
# becomes the default, and of the held-out MSE after 40 steps against the default FID proxy. Its first
# runs keep the EMA (``--ema-decay 0.99``), so they give the seed-0 reference too.
def _middle_from_base(arch):
    from hybridsd_nas.arch.candidate import recombine

    return recombine(arch, (arch.down[1].name, arch.down[2].name, arch.up[1].name, arch.up[2].name), frozen_original=True,
                     name="middle-from-base")


FRESH_C: list[tuple[str, object]] = [
    # unit removal in the encoder: every Transformer of the down path
    ("drop-down-attentions", {"name": "drop-down-attentions",
                              "drop_units": ["down0.0.attn", "down0.1.attn", "down1.0.attn", "down1.1.attn", "down2.0.attn", "down2.1.attn"]}),
    # BK-SDM-Base's layer drops in the two middle stages only (down1/up2, down2/up1)
    ("bk-base-middle-stages", {"name": "bk-base-middle-stages", "drop_layers": ["down1.1", "down2.1", "up1.1", "up2.1"]}),
    ("prune-ff-mild", {"name": "prune-ff-mild", "prune": {"all": {"ff": 0.75}}}),
    ("prune-heads-ff-half", {"name": "prune-heads-ff-half", "prune": {"all": {"heads": 0.5, "ff": 0.5}}}),
    # A-SDM-style recombination: the two middle stages from the Base, the rest of the original frozen
    ("middle-from-base", _middle_from_base),
]


def _pick(*names: str) -> list[tuple[str, object]]:
    every = dict(CANDIDATES + FRESH + FRESH_B + FRESH_C)
    return [(n, every[n]) for n in names]


# The list re-measured on the retrained teacher (``--retrained``, teacher v4: ``results/tiny_teacher/eval.md``),
# fixed in results/proxy_fidelity/teacher_v4/notes.md before any of it was run: twelve candidates of the
# earlier lists across layer removal, unit removal, channel pruning, recombination and a mix, the Base first.
RETRAINED = _pick("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "asdm-m1", "asdm-m2", "drop-mid", "drop-first-attentions",
                  "prune-ff-half", "prune-resnet-half", "drop-mid-attention", "prune-resnet-mild", "small-prune-ff-half")
LISTS = {"first": CANDIDATES, "fresh": FRESH, "fresh-b": FRESH_B, "fresh-c": FRESH_C, "retrained": RETRAINED}  # a run's "set": the list it came from
RAW_READ = ("first", "fresh", "fresh-b")  # the lists this script's own analysis (the raw reference) reads
UNNAMED_MACHINE = "a 2-core CPU the oldest records do not name"


def machine_of(record: dict) -> str:
    """Where a run ran, as its record names it (the oldest records do not)."""
    return record.get("machine") or UNNAMED_MACHINE


def set_of(r: dict) -> str:
    return r.get("set") or "first"


# what a long run's end is scored on (``--ema-decay`` adds the moving average), and its samples file's suffix
LONG_KINDS = {"long": "", "long_ema": "-ema"}
UNRECORDED_TRAIN_SEED = 0  # the training seed of a run that names none: every run before --train-seed trained with seed 0
EXPORTED = ("bk-sdm-base", "bk-sdm-tiny")  # the recombinations' Base; the hybrid sweep's distilled small U-Nets


def _ints(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


def run_candidate(name: str, spec, args, pipe, arch, data, heldout, sched, base_unet, out_dir: Path) -> dict:
    cand = _resolve(spec, arch)
    p = plan(arch, cand)
    uses_base = bool(p.candidate.base_blocks)
    student = build_student(p, teacher=pipe.unet, device=args.device, base_unet=base_unet if uses_base else None)
    cost = estimate_cost(args.teacher, cand, arch=arch).to_dict()
    space = "recombination" if uses_base else "channel-pruning" if cand.prune else "layer-removal"
    row: dict = {"candidate": name, "candidate_key": cand.key, "space": space, "params": cost["params"], "macs": cost["macs"],
                 "set": args.list, "train_seed": args.train_seed, "machine": machine_label(args.device)}
    t0 = time.perf_counter()
    row["zero_cost"] = zero_cost_scores(student, pipe.unet, data, sched, seed=args.seed)
    row["zero_cost_seconds"] = round(time.perf_counter() - t0, 3)

    steps = args.sampler_steps
    proxy_s = ProxySettings(samples=args.proxy_samples, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    long_s = ProxySettings(samples=args.long_samples, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    evals: dict[int, dict] = {}
    spent = {"eval": 0.0}
    t_start = time.perf_counter()

    # a replicate repeats only the long run and its evaluation; a rescore only the cheap scores of the first steps
    proxies = [] if args.replicate or args.rescore else args.checkpoints
    scores = [] if args.replicate else args.score_checkpoints
    last = max(args.score_checkpoints) if args.rescore else args.long_steps

    def on_step(n: int, st) -> None:
        if n not in proxies and n not in scores and n != last:
            return
        e0 = time.perf_counter()
        distill_s = e0 - t_start - spent["eval"]
        st.eval()
        try:
            rec = {"distill_seconds": round(distill_s, 2)}
            # the cheap score: output error against the teacher on fixed held-out noisy latents
            # (the zero-cost score's measure after n steps; its own generator, so the run is unchanged)
            h0 = time.perf_counter()
            if not args.replicate:
                rec["heldout"] = zero_cost_scores(st, pipe.unet, heldout, sched, n=args.heldout_latents, seed=args.seed + 1)
                rec["heldout"]["seconds"] = round(time.perf_counter() - h0, 3)
            if n in scores and n in args.paired_checkpoints:
                rec["paired"] = paired_sample_score(args.teacher, pipe, st, args.paired_samples, args.seed, steps, args.guidance)
            if n in proxies:
                rec["proxy"] = evaluate_student(args.teacher, pipe, st, proxy_s, steps, args.guidance, device=args.device)
            if n == args.long_steps and not args.rescore and name in EXPORTED:
                # the last weights (with --ema-decay too: the recombinations' Base stays the one the raw runs use)
                from hybridsd_nas.export import export_unet

                export_unet(st, p, out_dir / f"{name}-long", teacher_id=args.teacher, cost=cost, overwrite=True,
                            extra={"distill": cfg.as_dict(), "experiment": "proxy_fidelity"},
                            card=f"# {name}, distilled {args.long_steps} steps from `{args.teacher}`\n\nWritten by "
                                 f"experiments/research/proxy_fidelity/run.py (batch {args.batch_size}, lr {args.lr}, training seed {args.train_seed}); "
                                 "load with `hybridsd_nas.load_unet(<this directory>)`.\n")
            if n == args.long_steps and not args.rescore:
                # the last weights, and with --ema-decay their moving average (LONG_KINDS), each sampled or scored
                for kind, weights in (("long", contextlib.nullcontext), ("long_ema", averaged_weights))[:2 if args.ema_decay else 1]:
                    with weights(st):
                        if args.defer_fid:
                            rec[f"{kind}_deferred"] = save_long_samples(args, pipe, st, name, out_dir, LONG_KINDS[kind])
                        else:
                            rec[kind] = evaluate_student(args.teacher, pipe, st, long_s, steps, args.guidance, device=args.device)
        finally:
            st.train()
        evals[n] = rec
        spent["eval"] += time.perf_counter() - e0
        print(f"  {name} step {n}: " + ", ".join(f"{k} FID {v['proxy_fid']:.2f} ({v['eval_seconds']:.0f} s eval)"
                                                 for k, v in rec.items() if isinstance(v, dict) and "proxy_fid" in v)
              + (f", held-out output MSE {rec['heldout']['output_mse']:.4f}" if "heldout" in rec else "")
              + (f", paired sample MSE {rec['paired']['paired_mse']:.5f}" if "paired" in rec else "")
              + f", {distill_s:.0f} s distill",
              file=sys.stderr, flush=True)

    # log_every=1 only records every step's loss (a free score); training is the same
    # the distillation's own generator (batches, timesteps, noise): --train-seed; every evaluation keeps --seed
    cfg = DistillConfig(steps=last, batch_size=args.batch_size, lr=args.lr, seed=args.train_seed, log_every=1,
                        ema_decay=0.0 if args.rescore else args.ema_decay)
    res = distill(student, pipe.unet, p, data, sched, cfg, progress=True, on_step=on_step)
    row.update({"status": res.status, "reason": res.reason, "ema": res.ema, "trainable_params": res.trainable_params,
                "frozen_params": res.frozen_params, "evals": {str(k): v for k, v in sorted(evals.items())},
                "final_loss": res.curve[-1]["loss"] if res.curve else None,
                "curve": [{k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()} for c in res.curve]})
    return row


def save_long_samples(args, pipe, student, name: str, out_dir: Path, suffix: str = "") -> dict:
    """``--defer-fid``: the long evaluation's student samples (the same prompts and seeds as
    ``evaluate_student``'s), written to ``<out_dir>/<name>-long<suffix>-samples.safetensors`` for
    ``--score-deferred`` to score where the feature network is; returns what the record keeps."""
    from safetensors.numpy import save_file

    from hybridsd_nas.proxy import generate

    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in resolve_teacher(args.teacher).eval_prompts(args.long_samples)]
    imgs = generate(pipe, student, prompts, args.seed, args.sampler_steps, args.guidance)
    f = out_dir / f"{name}-long{suffix}-samples.safetensors"
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": imgs}, str(f))
    return {"samples_file": f.name, "samples": len(imgs), "sample_seconds": round(time.perf_counter() - t0, 2),
            "machine": machine_label(args.device)}


def score_deferred(args, pipe, export_dir: Path, store: Records, names: list[str]) -> int:
    """``--score-deferred``: the long FID (and the rest of ``evaluate_student``'s figures) of every run
    of ``store`` named in ``names`` whose long samples were saved by ``--defer-fid``, computed on this
    machine against the same cached teacher samples and reference features as every other run; the
    records are updated (``long`` beside ``long_deferred``; written loose, ``Records.write``). A rebuilt
    Base's FID is also written into the runs built on it. Returns how many were scored."""
    from safetensors.numpy import load_file

    L, n = str(args.long_steps), 0
    long_s = ProxySettings(samples=args.long_samples, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    rebuilt = export_dir / "bk-sdm-base-long" / "rebuilt_run.json"  # beside the export, no record
    base_fid = None  # the rebuilt Base's long FID, for the recombinations built on it
    for f in [rebuilt, *names]:  # the Base first
        if f == rebuilt:
            if not rebuilt.is_file():
                continue
            row = json.loads(rebuilt.read_text())
        elif store.exists(f):
            row = store.read(f)
        else:
            continue
        ev = row.get("evals", {}).get(L, {})
        changed = False
        for kind in LONG_KINDS:
            d = ev.get(f"{kind}_deferred")
            if d is None or kind in ev:
                continue
            sf = export_dir / d["samples_file"]
            if not sf.is_file():
                raise SystemExit(f"error: --score-deferred: {f if f == rebuilt else store.out / f} names samples {sf} that are missing; "
                                 "copy them back beside the run's exports or run the candidate again")
            imgs = load_file(str(sf))["images"]
            if len(imgs) != args.long_samples:
                raise SystemExit(f"error: --score-deferred: {sf} holds {len(imgs)} samples, --long-samples is {args.long_samples}")
            ev[kind] = evaluate_student(args.teacher, pipe, None, long_s, args.sampler_steps, args.guidance,
                                        device=args.device, sample=lambda prompts: imgs)
            ev[kind]["eval_seconds"] = round(ev[kind]["eval_seconds"] + d["sample_seconds"], 2)  # sampling there, scoring here
            ev[kind]["scored_on"] = machine_label(args.device)
            print(f"{row['candidate']} ({Path(f).name}): {kind} FID {ev[kind]['proxy_fid']:.2f}", file=sys.stderr, flush=True)
            changed, n = True, n + 1
        if f == rebuilt:
            base_fid = ev.get("long", {}).get("proxy_fid")
        elif base_fid is not None and row.get("base_rebuilt", {}).get("long_fid", 0) is None:
            row["base_rebuilt"]["long_fid"] = base_fid
            changed = True
        if changed:
            if f == rebuilt:
                rebuilt.write_text(json.dumps(row, indent=1))
            else:
                store.write(f, row)
    return n


def warm_caches(args, pipe) -> float:
    """Teacher samples and reference features for both evaluations, computed once before any
    candidate (a study pays for them once too); returns the seconds spent."""
    from hybridsd_nas.metrics import FeatureExtractor
    from hybridsd_nas.proxy import scorer

    t0 = time.perf_counter()
    fx = FeatureExtractor(device=args.device)
    for n in (args.proxy_samples, args.long_samples):
        scorer(args.teacher, pipe, ProxySettings(samples=n, seed=args.seed), args.sampler_steps, args.guidance, device=args.device, fx=fx)
    return time.perf_counter() - t0


def kendall_spearman(a, b, separation: float | np.ndarray | None = None) -> dict:
    """Kendall tau and Spearman rho of score ``a`` against the long FID ``b``; with ``separation`` (the
    long FID difference that the long run's own noise does not explain: one number, or one per pair
    as a matrix) also how many of the pairs the long run separates by more than that the score orders
    the same way."""
    from scipy.stats import kendalltau, spearmanr

    kt, sr = kendalltau(a, b), spearmanr(a, b)
    out = {"kendall_tau": float(kt.statistic), "kendall_p": float(kt.pvalue),
           "spearman_rho": float(sr.statistic), "spearman_p": float(sr.pvalue)}
    if separation is not None:
        sep = np.broadcast_to(np.asarray(separation, dtype=float), (len(b), len(b)))
        pairs = [(i, j) for i in range(len(b)) for j in range(i + 1, len(b)) if abs(b[i] - b[j]) > sep[i, j]]
        out["separated_pairs"] = len(pairs)
        out["separated_agree"] = sum(int(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])) for i, j in pairs)
    return out


def load_noise(path: Path, teacher: str) -> dict | None:
    """noise_floor.py's report, if there is one for this teacher: the sampling noise of one long FID
    (``fid_sd``, over seed sets) and of the difference of two candidates on the same seeds (``diff_sd``).
    The run-to-run noise of the distillation comes from the replicates (``run_to_run``), not from it."""
    from hybridsd_nas.sources import pipeline_fingerprint

    if not path.is_file():
        return None
    nf = json.loads(path.read_text())
    if nf.get("teacher_fingerprint") != pipeline_fingerprint(teacher):
        print(f"warning: {path} was measured on other teacher weights; not used", file=sys.stderr)
        return None
    if not nf.get("diff_sd"):
        return None
    for k in ("train_sd", "replicates"):  # reports of an earlier noise_floor.py carried these; run_to_run measures them
        nf.pop(k, None)
    return nf


def load_replicates(out: Path, long_steps: int) -> dict[str, list[dict]]:
    """Repeats of whole long runs (``<out>/replicates/<name>.<tag>.json``, ``--replicate``), by
    candidate: ``[{"tag", "long_fid"}]``. A repeat of another length is left out with a warning."""
    reps: dict[str, list[dict]] = {}
    store = Records(out)
    for name in store.names("replicates/*.json"):
        r, f = store.read(name), out / name
        at_end = r.get("evals", {}).get(str(long_steps), {})
        ev = at_end.get("long")
        if r.get("status") != "ok" or ev is None:
            print(f"warning: {f} holds no ok {long_steps}-step long run; not used", file=sys.stderr)
            continue
        reps.setdefault(r["candidate"], []).append({"tag": f.name[len(r["candidate"]) + 1:-len(".json")], "long_fid": ev["proxy_fid"],
                                                    "wall_seconds": r.get("wall_seconds", 0.0),
                                                    "train_seed": r.get("train_seed", UNRECORDED_TRAIN_SEED),
                                                    "machine": r.get("machine"),
                                                    "deferred": "long_deferred" in at_end,
                                                    # the moving average's decay and long FID (--ema-decay), None where
                                                    # not kept (or, for the FID, not scored yet)
                                                    "ema_decay": (r.get("ema") or {}).get("decay"),
                                                    "long_ema_fid": at_end.get("long_ema", {}).get("proxy_fid")})
    return reps


def distinct_runs(name: str, fids: list[float]) -> list[float]:
    """A candidate's long FIDs without exact repeats: two runs that agree to the last bit are one run
    made twice (the same process history gives the same float32 arithmetic), not two draws of the
    run-to-run noise; counting both would understate it."""
    out: list[float] = []
    for f in fids:
        if f in out:
            print(f"warning: {name}: a long run's FID {f!r} repeats another run's to the last bit; counted once", file=sys.stderr)
        else:
            out.append(f)
    return out


def seed_runs(rows: list[dict], replicates: dict[str, list[dict]], long_steps: int) -> dict[str, dict[int, list[float]]]:
    """Every distinct long FID of each candidate of ``rows`` by training seed: its own run's, then its
    repeats' (``load_replicates``); the seed of the candidate's own run first."""
    L = str(long_steps)
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        by_seed: dict[int, list[float]] = {r.get("train_seed", UNRECORDED_TRAIN_SEED): [float(r["evals"][L]["long"]["proxy_fid"])]}
        for x in replicates.get(r["candidate"], []):
            by_seed.setdefault(x.get("train_seed", UNRECORDED_TRAIN_SEED), []).append(x["long_fid"])
        out[r["candidate"]] = {k: distinct_runs(r["candidate"], v) for k, v in by_seed.items()}
    return out


def reference_runs(rows: list[dict], replicates: dict[str, list[dict]], long_steps: int) -> dict[str, list[float]]:
    """The independent long FIDs of each candidate of ``rows``, one per training seed: the mean of that
    seed's distinct runs (``seed_runs``); the reference is the mean of these. Runs with one training
    seed share every batch, timestep and noise draw and differ only by another machine's float32
    rounding: together they are one draw of the run-to-run noise, not several."""
    return seed_means(seed_runs(rows, replicates, long_steps))


def seed_means(by_seed: dict[str, dict[int, list[float]]]) -> dict[str, list[float]]:
    """``seed_runs`` as ``reference_runs``: each training seed's mean long FID."""
    return {n: [float(np.mean(v)) for v in d.values()] for n, d in by_seed.items()}


def same_seed_spread(by_seed: dict[str, dict[int, list[float]]]) -> dict | None:
    """The spread of runs with one training seed on different machines (float32 rounding alone), pooled
    as ``run_to_run`` pools; None when no seed was run twice."""
    return run_to_run({f"{n} seed {k}": v for n, d in by_seed.items() for k, v in d.items()})


def run_to_run(long_fids: dict[str, list[float]]) -> dict | None:
    """The run-to-run noise of one long FID (of one training seed, ``reference_runs``) from candidates
    run with more than one seed (same settings and evaluation seeds): the pooled within-candidate
    standard deviation. None when no candidate was repeated."""
    groups = [np.asarray(v, dtype=float) for v in long_fids.values() if len(v) > 1]
    if not groups:
        return None
    ss = sum(float(((g - g.mean()) ** 2).sum()) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    return {"train_sd": float(np.sqrt(ss / df)), "df": df, "candidates_repeated": len(groups)}


def pair_separation(diff_sd: float, train_sd: float, runs: np.ndarray) -> np.ndarray:
    """Per pair of candidates, two standard deviations of the difference of their reference long FIDs:
    sampling noise on the same seeds (``diff_sd``) plus the run-to-run noise of each one's mean over
    its ``runs`` long runs."""
    k = np.asarray(runs, dtype=float)
    return 2.0 * np.sqrt(diff_sd ** 2 + train_sd ** 2 * (1.0 / k[:, None] + 1.0 / k[None, :]))


def _cost_fields(cost: np.ndarray, long_cost: np.ndarray) -> dict:
    """A proxy's seconds per candidate as a fraction of the long run's (mean, max) and in seconds."""
    return {"cost_fraction_mean": float(np.mean(cost / long_cost)), "cost_fraction_max": float(np.max(cost / long_cost)),
            "proxy_seconds_mean": float(np.mean(cost))}


def repeat_tau(long_fid: np.ndarray, train_sd: float, draws: int = 2000, seed: int = 0, runs=1) -> dict:
    """How well a repeat of the whole reference (``runs`` long runs per candidate, averaged; same
    settings, same evaluation seeds) would rank the candidates against this one: its FIDs differ from
    these by the difference of two such means, normal with sd sqrt(2 / runs) * train_sd. Kendall tau
    over simulated repeats (median, 10th-90th percentile). ``predictor_*``: the same for a score
    without noise that knows each candidate's expected long FID, against this reference, which is
    off it by sd sqrt(1 / runs) * train_sd: the most any proxy can show here."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    k = np.broadcast_to(np.asarray(runs, dtype=float), long_fid.shape)
    out = {"draws": draws}
    for key, sd in (("", np.sqrt(2.0 / k) * train_sd), ("predictor_", np.sqrt(1.0 / k) * train_sd)):
        t = [kendalltau(long_fid, long_fid + rng.normal(0.0, 1.0, len(long_fid)) * sd).statistic for _ in range(draws)]
        out.update({f"{key}median": float(np.median(t)), f"{key}p10": float(np.percentile(t, 10)), f"{key}p90": float(np.percentile(t, 90))})
    return out


def ceiling_words(rt: dict) -> tuple[str, str]:
    """``repeat_tau``'s result in words: what a repeat of the reference would read, and what a
    noise-free score would."""
    return (f"Kendall tau {rt['median']:.2f} (median of {rt['draws']} simulated repeats, 10th-90th percentile "
            f"{rt['p10']:.2f}-{rt['p90']:.2f})", f"{rt['predictor_median']:.2f} ({rt['predictor_p10']:.2f}-{rt['predictor_p90']:.2f})")


def span(values) -> str:
    """The range of some counts in words: '2-3', or '2' when they are all the same."""
    lo, hi = min(values), max(values)
    return f"{lo}-{hi}" if lo != hi else f"{lo}"


def _long_cost(rows: list[dict], L: str) -> np.ndarray:
    return np.array([r["evals"][L]["distill_seconds"] + r["evals"][L]["long"]["eval_seconds"] for r in rows])


def _ext(r: dict, n) -> dict:
    """Step ``n``'s record of the cheap scores: the rescore's where the run was rescored, else the run's own."""
    e = r["evals"].get(str(n), {})
    return e.get("rescore", e)


def _rescore_speed(r: dict) -> float:
    """Seconds on the machine of the run per second of its rescore: the distillation seconds of both
    to the last step they share (the same training), so that a rescore's costs are put on the scale
    of the long run they are a fraction of, even when the rescore ran on a slower or faster machine.
    1 for a run without a rescore."""
    common = [n for n, e in r["evals"].items() if "rescore" in e and "distill_seconds" in e and n != "0"]
    if not common:
        return 1.0
    n = max(common, key=int)
    return r["evals"][n]["distill_seconds"] / max(r["evals"][n]["rescore"]["distill_seconds"], 1e-9)


def score_vectors(ok: list[dict], args) -> list[dict]:
    """Every score this experiment takes, as one value per candidate of ``ok`` (lower = better
    predicted) and its cost in seconds per candidate; a score that some candidate lacks (runs of an
    earlier version of this script) is left out. Keys: what, distill_steps, score, cost, and
    samples (FID proxies) or zero_cost (zero-cost scores)."""
    out = []

    def have(n, pred) -> bool:
        return all(pred(r, str(n)) for r in ok)

    for n in args.checkpoints:
        if not have(n, lambda r, k: "proxy" in r["evals"].get(k, {})):
            continue
        ev = [r["evals"][str(n)] for r in ok]
        out.append({"what": f"{n} steps, {args.proxy_samples} samples (FID)", "distill_steps": n, "samples": args.proxy_samples,
                    "score": np.array([e["proxy"]["proxy_fid"] for e in ev]),
                    "cost": np.array([e["distill_seconds"] + e["proxy"]["eval_seconds"] for e in ev])})
    # baselines, not proxies: the cost itself, read as a quality prediction (more compute, better)
    for key, label in (("macs", "MACs"), ("params", "parameter count")):
        out.append({"what": f"{label} alone (baseline: the cost, no training)", "distill_steps": 0, "baseline": True,
                    "score": -np.array([float(r[key]) for r in ok]), "cost": np.zeros(len(ok))})
    for zk in ("output_mse", "latent_stat_shift"):
        out.append({"what": f"zero-cost `{zk}` (no training)", "distill_steps": 0, "zero_cost": zk,
                    "score": np.array([r["zero_cost"][zk] for r in ok]), "cost": np.array([r["zero_cost_seconds"] for r in ok])})
    steps = sorted({int(n) for r in ok for n in r["evals"]})
    # cheap scores that need no sampling: the held-out output MSE against the teacher after n steps,
    # and the mean training loss of the n-th step and the 4 before it (free: the run logs it anyway)
    for n in steps:
        if not have(n, lambda r, k: "heldout" in r["evals"].get(k, {})) or n == args.long_steps:
            continue
        ev = [r["evals"][str(n)] for r in ok]
        out.append({"what": f"held-out output MSE after {n} steps (no sampling)", "distill_steps": n,
                    "score": np.array([e["heldout"]["output_mse"] for e in ev]),
                    "cost": np.array([e["distill_seconds"] + e["heldout"]["seconds"] for e in ev])})
        if all(r.get("curve") for r in ok):
            out.append({"what": f"training loss of steps {max(n - 4, 1)}..{n} (free)", "distill_steps": n,
                        "score": np.array([np.mean([c["loss"] for c in r["curve"] if n - 5 <= c["step"] < n]) for r in ok]),
                        "cost": np.array([e["distill_seconds"] for e in ev])})
    # where the error is made (rescored runs, or runs of this version): the noisiest third of the
    # timesteps, the implied clean latents, and the student's own samples against the teacher's
    speed = np.array([_rescore_speed(r) for r in ok])
    for n in steps:
        if n == args.long_steps:
            continue
        if have(n, lambda r, k: "output_mse_high" in _ext(r, k).get("heldout", {})):
            ev = [_ext(r, n) for r in ok]
            cost = speed * np.array([e["distill_seconds"] + e["heldout"]["seconds"] for e in ev])
            for key, label in (("output_mse_high", "held-out output MSE, noisiest third of timesteps"),
                               ("x0_mse", "held-out clean-latent (x0) MSE")):
                out.append({"what": f"{label}, after {n} steps (no sampling)", "distill_steps": n,
                            "score": np.array([e["heldout"][key] for e in ev]), "cost": cost})
        if have(n, lambda r, k: "paired" in _ext(r, k)):
            ev = [_ext(r, n) for r in ok]
            k = ev[0]["paired"]["samples"]
            out.append({"what": f"paired sample MSE ({k} samples, no feature network), after {n} steps", "distill_steps": n,
                        "score": np.array([e["paired"]["paired_mse"] for e in ev]),
                        "cost": speed * np.array([e["distill_seconds"] + e["paired"]["seconds"] for e in ev])})
    return out


def partial_tau(x, y, z) -> float:
    """Kendall's partial tau of ``x`` and ``y`` given ``z``: how well ``x`` ranks ``y`` beyond what
    ``z`` already ranks. With z = the cost, what a quality score tells a search that the cost does
    not. NaN where z ranks x or y perfectly."""
    from scipy.stats import kendalltau

    txy, txz, tyz = (float(kendalltau(a, b).statistic) for a, b in ((x, y), (x, z), (y, z)))
    if max(abs(txz), abs(tyz)) > 1 - 1e-9:  # float rounding leaves 1 - tau^2 at ~1e-16, not 0
        return float("nan")
    return float((txy - txz * tyz) / np.sqrt((1 - txz ** 2) * (1 - tyz ** 2)))


def choose(settings: list[dict], max_cost: float = 0.10) -> dict | None:
    """The rule that picks a proxy from the first candidates' table, fixed before the fresh
    candidates were run: the highest Kendall tau among the scores costing at most ``max_cost`` of a
    long run on average; a tie goes to the cheaper. A score constant over the candidates (no tau) is
    not a candidate for the choice."""
    within = [s for s in settings if s["cost_fraction_mean"] <= max_cost and np.isfinite(s["kendall_tau"]) and not s.get("baseline")]
    return max(within, key=lambda s: (round(s["kendall_tau"], 9), -s["cost_fraction_mean"])) if within else None


def fresh_check(first: list[dict], fresh: list[dict], ref: dict[str, float], sep: dict | None, args, whats: list,
                post_hoc: bool = True) -> list[dict]:
    """The scores named in ``whats`` on the fresh candidates, against the reference long FID ``ref``
    (by candidate): Kendall tau over the first candidates alone, the fresh ones alone and all, and how
    many of the pairs that hold a fresh candidate each orders as the reference does (all of them, and
    those the reference separates beyond its noise: ``sep`` = {"diff_sd", "train_sd", "runs": by
    candidate}; then also the separated pairs among all candidates). An entry of ``whats`` that is a
    pair of names is the sum of the two scores' ranks over all candidates; ``post_hoc``: that combination
    was formed after these fresh results were seen, so its fresh figure is no blind check (False: it was
    fixed before they were run)."""
    from scipy.stats import rankdata

    both = first + fresh
    vec = {s["what"]: s for s in score_vectors(both, args)}
    for w in whats:
        if isinstance(w, tuple) and all(x in vec for x in w):
            when = "formed after the fresh results were seen" if post_hoc else "fixed before these candidates were run"
            vec[w] = {"what": " + ".join(x.split(" (")[0] for x in w) + f" (rank sum; {when})", "post_hoc": post_hoc,
                      "score": sum(rankdata(vec[x]["score"]) for x in w), "cost": sum(vec[x]["cost"] for x in w)}
    y = np.array([ref[r["candidate"]] for r in both])
    nf = len(first)
    pairs = [(i, j) for i in range(len(both)) for j in range(i + 1, len(both)) if j >= nf]
    if sep:
        m = pair_separation(sep["diff_sd"], sep["train_sd"], np.array([sep["runs"][r["candidate"]] for r in both]))
    macs = -np.array([float(r["macs"]) for r in both])
    out = []
    for w in whats:
        if w not in vec:
            continue
        x = vec[w]["score"]
        agree = [int(np.sign(x[i] - x[j]) == np.sign(y[i] - y[j])) for i, j in pairs]
        d = {"what": vec[w]["what"], "post_hoc": bool(vec[w].get("post_hoc")), "baseline": bool(vec[w].get("baseline")),
             "first": nf, "fresh": len(fresh), "all": len(both),
             "kendall_tau_first": kendall_spearman(x[:nf], y[:nf])["kendall_tau"],
             "kendall_tau_fresh": kendall_spearman(x[nf:], y[nf:])["kendall_tau"],
             "kendall_tau_all": kendall_spearman(x, y)["kendall_tau"],
             "partial_tau_given_macs_all": partial_tau(x, y, macs),
             "pairs_with_fresh": len(pairs), "pairs_with_fresh_agree": sum(agree),
             "cost_fraction_mean_fresh": float(np.mean(vec[w]["cost"][nf:] / _long_cost(fresh, str(args.long_steps))))}
        if sep:
            sp = [(p, a) for p, a in zip(pairs, agree) if abs(y[p[0]] - y[p[1]]) > m[p]]
            every = kendall_spearman(x, y, m)
            d.update({"separated_pairs_with_fresh": len(sp), "separated_pairs_with_fresh_agree": sum(a for _, a in sp),
                      "separated_pairs_all": every["separated_pairs"], "separated_agree_all": every["separated_agree"]})
        out.append(d)
    return out


def analyse(rows: list[dict], args, meta: dict, results: Path, noise: dict | None = None,
            replicates: dict[str, list[dict]] | None = None) -> None:
    """Tabulate every score against the reference long FID: the long run's, or, where candidates were
    repeated (``replicates``, from ``load_replicates``), the mean over all of a candidate's long runs.
    Costs are against one long run: the repeats only measure the reference more steadily.

    The tables are over the first candidates; the fresh ones (``--fresh``, run after the rule that
    picks a proxy from those tables was fixed) only check the picked proxy and the default; the second
    fresh list (``--fresh-b``, fixed after that check was read) checks the same scores again, the
    rank sum of the FID proxy and MACs among them as a score fixed before its candidates were run. The
    first check's scores and taus are over the first and fresh candidates only, whatever else has run;
    the noise figures (run-to-run sd, and with it the separated pairs and the ceilings) pool the
    repeats of every candidate."""
    results.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok" and set_of(r) == "first"]
    fresh = [r for r in rows if r["status"] == "ok" and set_of(r) == "fresh"]
    second = [r for r in rows if r["status"] == "ok" and set_of(r) == "fresh-b"]
    L = str(args.long_steps)
    first_fid = {r["candidate"]: float(r["evals"][L]["long"]["proxy_fid"]) for r in ok + fresh + second}
    long_first = np.array([first_fid[r["candidate"]] for r in ok])
    replicates = {k: v for k, v in (replicates or {}).items() if k in first_fid}
    by_seed = seed_runs(ok + fresh + second, replicates, args.long_steps)
    runs_fid = seed_means(by_seed)  # one long FID per training seed
    runs = np.array([len(runs_fid[r["candidate"]]) for r in ok])
    long_fid = np.array([np.mean(runs_fid[r["candidate"]]) for r in ok])  # the reference
    rr = run_to_run(runs_fid)
    run_count = {n: sum(len(v) for v in d.values()) for n, d in by_seed.items()}  # distinct long runs, all seeds
    averaged = max(run_count.values(), default=0) > 1  # some candidate has more than one long run
    if noise:
        noise = {**noise, **(rr or {})}
        train_sd = noise.get("train_sd") or 0.0
        sep = pair_separation(noise["diff_sd"], train_sd, runs)
        typical = int(np.median(runs))  # the separation quoted in the text: two candidates of the typical run count
        noise["separation"] = float(pair_separation(noise["diff_sd"], train_sd, np.array([typical, typical]))[0, 1])
        noise["comparison_sd"] = noise["separation"] / 2
        noise["separation_runs"] = typical
    else:
        sep = None

    macs = np.array([float(r["macs"]) for r in ok])

    def ks(score: np.ndarray) -> dict:
        d = kendall_spearman(score, long_fid, sep)
        d["partial_tau_given_macs"] = partial_tau(score, long_fid, -macs)
        if averaged:
            d["kendall_tau_first_run"] = kendall_spearman(score, long_first)["kendall_tau"]
        return d

    long_cost = _long_cost(ok, L)
    settings = [{k: v for k, v in sc.items() if k not in ("score", "cost")} | ks(sc["score"]) | _cost_fields(sc["cost"], long_cost)
                for sc in score_vectors(ok, args)]
    chosen = choose(settings)
    check, second_check = [], []
    if chosen:
        default_what = next(x["what"] for x in settings if x.get("samples") and x["distill_steps"] == args.default_steps)
        # the picked score, the default, the proxy's held-out score at the default length (heldout_mse in
        # every proxy result), the cost baselines, and the rank sum of the default and MACs
        whats = (list(dict.fromkeys([chosen["what"], default_what, f"held-out output MSE after {args.default_steps} steps (no sampling)"]
                                    + [x["what"] for x in settings if x.get("baseline")]))
                 + [(default_what, next(x["what"] for x in settings if x.get("baseline") and x["what"].startswith("MACs")))])
        ref = {k: float(np.mean(v)) for k, v in runs_fid.items()}
        sepd = {"diff_sd": noise["diff_sd"], "train_sd": noise.get("train_sd") or 0.0,
                "runs": {k: len(v) for k, v in runs_fid.items()}} if noise else None
        if len(fresh) >= 3:
            check = fresh_check(ok, fresh, ref, sepd, args, whats)
        if len(second) >= 3:
            second_check = fresh_check(ok + fresh, second, ref, sepd, args, whats, post_hoc=False)
    # what else was tried on the same runs: the proxy within each space, and extrapolating the
    # proxy's FID curve (linear in log steps) from two lengths to the long run's length
    extra = []
    for sp in sorted({r["space"] for r in ok}):
        idx = [i for i, r in enumerate(ok) if r["space"] == sp]
        if len(idx) < 3:
            continue
        for n in args.checkpoints:
            fid = np.array([ok[i]["evals"][str(n)]["proxy"]["proxy_fid"] for i in idx])
            extra.append({"what": f"{n} steps, within the {sp} space ({len(idx)} candidates)",
                          **kendall_spearman(fid, long_fid[idx])})
    cps = args.checkpoints
    for a, b in [(cps[i], cps[j]) for i in range(len(cps)) for j in range(i + 1, len(cps))]:
        fa = np.array([r["evals"][str(a)]["proxy"]["proxy_fid"] for r in ok])
        fb = np.array([r["evals"][str(b)]["proxy"]["proxy_fid"] for r in ok])
        pred = fb + (fb - fa) / np.log(b / a) * np.log(args.long_steps / b)
        cost = np.array([r["evals"][str(b)]["distill_seconds"] + r["evals"][str(a)]["proxy"]["eval_seconds"]
                         + r["evals"][str(b)]["proxy"]["eval_seconds"] for r in ok])
        extra.append({"what": f"FID at {a} and {b} steps extrapolated (linear in log steps) to {args.long_steps}",
                      **kendall_spearman(pred, long_fid), "cost_fraction_mean": float(np.mean(cost / long_cost))})
    if rr:
        rr["repeat_tau"] = repeat_tau(long_fid, rr["train_sd"], runs=runs)
        # measured rather than simulated: the first runs against the repeat set that covers most candidates
        tags = [x["tag"] for v in replicates.values() for x in v]
        tag = max(sorted(set(tags)), key=tags.count)
        pairs = [(first_fid[n], x["long_fid"]) for n, v in replicates.items() for x in v if x["tag"] == tag]
        if len(pairs) >= 3:
            rr["run_vs_repeat"] = {"tag": tag, "candidates": len(pairs),
                                   **kendall_spearman(np.array([b for _, b in pairs]), np.array([a for a, _ in pairs]))}
        if fresh:  # the same ceiling over every candidate, fresh ones included (some with fewer runs)
            allc = ok + fresh
            rr["repeat_tau_all"] = repeat_tau(np.array([np.mean(runs_fid[r["candidate"]]) for r in allc]), rr["train_sd"],
                                              runs=np.array([len(runs_fid[r["candidate"]]) for r in allc]))
        if second:
            allc = ok + fresh + second
            rr["repeat_tau_second"] = repeat_tau(np.array([np.mean(runs_fid[r["candidate"]]) for r in allc]), rr["train_sd"],
                                                 runs=np.array([len(runs_fid[r["candidate"]]) for r in allc]))
        rr["long_fid_runs"] = runs_fid
        rr["long_fid_by_seed"] = by_seed
        rr["same_seed"] = same_seed_spread(by_seed)
        rr["replicates"] = replicates
    default = args.default_steps
    fields = ["candidate", "candidate_key", "space", "set", "params", "macs", "trainable_params", "frozen_params",
              "output_mse", "latent_stat_shift", "proxy_steps", "proxy_samples", "proxy_fid", "proxy_kid", "proxy_fid_real",
              "proxy_adherence", "proxy_distill_seconds", "proxy_eval_seconds", "proxy_seconds",
              "long_steps", "long_samples", "long_fid", "long_runs", "long_seeds", "long_fid_mean", "long_kid", "long_fid_real", "long_adherence",
              "long_distill_seconds", "long_eval_seconds", "long_seconds", "machine", "status"]
    out_rows = []
    for r in rows:
        d = {k: r.get(k) for k in fields}
        d.update({"output_mse": r["zero_cost"]["output_mse"], "latent_stat_shift": r["zero_cost"]["latent_stat_shift"]})
        if r["status"] == "ok":
            pe, le = r["evals"][str(default)], r["evals"][L]
            d.update({"proxy_steps": default, "proxy_samples": args.proxy_samples, "proxy_fid": pe["proxy"]["proxy_fid"],
                      "proxy_kid": pe["proxy"]["kid"], "proxy_fid_real": pe["proxy"]["fid_real"], "proxy_adherence": pe["proxy"]["adherence"],
                      "proxy_distill_seconds": pe["distill_seconds"], "proxy_eval_seconds": pe["proxy"]["eval_seconds"],
                      "proxy_seconds": round(pe["distill_seconds"] + pe["proxy"]["eval_seconds"], 2),
                      "long_steps": args.long_steps, "long_samples": args.long_samples, "long_fid": le["long"]["proxy_fid"],
                      "long_runs": run_count[r["candidate"]], "long_seeds": len(runs_fid[r["candidate"]]),
                      "long_fid_mean": float(np.mean(runs_fid[r["candidate"]])),
                      "long_kid": le["long"]["kid"], "long_fid_real": le["long"]["fid_real"], "long_adherence": le["long"]["adherence"],
                      "long_distill_seconds": le["distill_seconds"], "long_eval_seconds": le["long"]["eval_seconds"],
                      "long_seconds": round(le["distill_seconds"] + le["long"]["eval_seconds"], 2)})
        out_rows.append(d)
    with (results / "proxy_fidelity.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for d in out_rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()})
    (results / "proxy_fidelity.json").write_text(json.dumps({"meta": meta, "settings": settings, "chosen": chosen, "fresh_check": check,
                                                             "second_check": second_check, "also_tried": extra,
                                                             "noise_floor": noise, "run_to_run": rr, "candidates": rows}, indent=1))
    _plot(ok, long_fid, runs, args, results / "proxy_fidelity.png", meta, noise)
    _markdown(out_rows, settings, extra, args, meta, results / "proxy_fidelity.md", noise, rr, chosen, check, second_check)


def _plot(ok, long_fid, runs, args, path: Path, meta: dict, noise: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.checkpoints), figsize=(4 * len(args.checkpoints), 4), squeeze=False)
    for ax, n in zip(axes[0], args.checkpoints):
        fid = [r["evals"][str(n)]["proxy"]["proxy_fid"] for r in ok]
        if noise:  # one sd of the reference: sampling noise, and run-to-run noise of a mean of that many runs
            yerr = np.sqrt(noise["fid_sd"] ** 2 + (noise.get("train_sd") or 0.0) ** 2 / np.asarray(runs, dtype=float))
            ax.errorbar(fid, long_fid, yerr=yerr, fmt="o", ms=4, capsize=2)
        else:
            ax.scatter(fid, long_fid)
        for r, x, y in zip(ok, fid, long_fid):
            ax.annotate(r["candidate"], (x, y), fontsize=7)
        ax.set_xlabel(f"proxy FID ({n} steps, {args.proxy_samples} samples)")
        ax.set_ylabel(f"long FID ({args.long_steps} steps, {args.long_samples} samples"
                      + (f",\nmean of {min(runs)}-{max(runs)} runs)" if max(runs) > 1 else ")"))
    bars = ("; bars: one sd of the reference (sampling over seed sets"
            + (", run-to-run over repeats" if noise and noise.get("train_sd") else "") + ")") if noise else ""
    # where the runs plotted ran (not where this report was made): their records name it, the oldest do not
    where = Counter(machine_of(r) for r in ok)
    fig.suptitle(f"proxy vs long distillation, teacher {args.teacher}; float32, evaluation seed {args.seed}; first runs on "
                 + ", ".join(f"{m} ({k})" for m, k in where.most_common()) + f"\n{bars.lstrip('; ')}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)


def _markdown(rows, settings, extra, args, meta, path: Path, noise: dict | None = None, rr: dict | None = None,
              chosen: dict | None = None, check: list[dict] | None = None, second_check: list[dict] | None = None) -> None:
    d = args.default_steps
    all_ok = [r for r in rows if r["status"] == "ok"]
    ok_rows = [r for r in all_ok if set_of(r) == "first"]
    fresh_rows = [r for r in all_ok if set_of(r) == "fresh"]
    second_rows = [r for r in all_ok if set_of(r) == "fresh-b"]
    averaged = any(r["long_runs"] > 1 for r in ok_rows)
    repeats = ""
    if averaged:
        seeds = sorted({x.get("train_seed", UNRECORDED_TRAIN_SEED) for v in (rr or {}).get("replicates", {}).values() for x in v} - {args.seed})
        repeats = (f" The long run was then repeated with the same settings and evaluation seeds (`--replicate`: the long run and its "
                   "evaluation only" + (f"; some with another training seed, {', '.join(map(str, seeds))}, `--train-seed`" if seeds else "")
                   + f"), {span([r['long_runs'] for r in ok_rows])} distinct long runs per candidate with "
                   f"{span([r['long_seeds'] for r in ok_rows])} training seeds, each set with its own Base for the recombinations; "
                   "the **reference** is the mean over a candidate's training seeds of each seed's mean long FID (runs of one seed "
                   "share every batch and noise draw and count as one), and costs are against one long run. The repeats took "
                   f"{sum(x.get('wall_seconds', 0.0) for v in (rr or {}).get('replicates', {}).values() for x in v) / 60:.0f} min.")
    # where the runs ran: records name their machine since --device; the earlier ones name none
    named: dict[str, int] = {}
    for m in [r.get("machine") for r in all_ok] + [x.get("machine") for v in (rr or {}).get("replicates", {}).values() for x in v]:
        named[m or ""] = named.get(m or "", 0) + 1
    machines = "; ".join(f"{m} ({n} runs)" for m, n in named.items() if m)
    if named.get(""):
        machines = (machines + "; " if machines else "") + (f"{named['']} runs recorded before records named their machine, "
                                                             "on the 2-core x86_64 CPUs of earlier sessions")
    lines = [
        "# Rank fidelity of the quality proxy",
        "",
        f"Teacher `{args.teacher}` (the embedded tiny SD pipeline). {len(ok_rows)} candidates from the "
        f"layer-removal and recombination spaces ({', '.join(r['candidate'] for r in rows if set_of(r) == 'first')}), each "
        f"distilled once for {args.long_steps} steps (batch {args.batch_size}, lr {args.lr}, seed {args.seed}; task + output KD + "
        "feature KD, weights 1/1/1). The loop's learning rate is constant and its randomness comes from one seeded generator, so "
        "the student at step n of that run is exactly the student of an n-step proxy (checked by a test); it was evaluated at "
        f"steps {', '.join(map(str, args.checkpoints))} with the proxy evaluation ({args.proxy_samples} prompts, fixed seeds) and at "
        f"step {args.long_steps} with the long evaluation ({args.long_samples} prompts). FID is against the teacher's samples on the "
        f"same prompts and seeds ({meta['sampler']}, {args.sampler_steps} steps, guidance {args.guidance}, 32x32 px), Inception-2015-12-05 "
        "pool features. Recombinations take their Base blocks from this run's long-distilled BK-SDM-Base." + repeats,
        "",
        f"Runs in float32 on {machines}; this report made on {meta['machine']}, torch {meta['torch']}; wall seconds (distillation seconds exclude the "
        "evaluations done on the way). Teacher samples and reference features were computed once before the candidates "
        "(as a study computes them once) and are in no candidate's cost. Total wall time over the candidates: "
        f"{meta.get('wall_seconds', 0) / 60:.0f} min.",
        "",
        "## Each proxy setting against the long run" + (" (reference: mean over the long runs)" if averaged else ""),
        "",
        "| proxy | Kendall tau (p) | Spearman rho (p) |" + (" Kendall tau vs the first long run alone |" if averaged else "")
        + " partial tau given MACs | proxy cost / long cost (mean, max) | proxy seconds (mean) |"
        + (" pairs the long run separates: same order |" if noise else ""),
        "|---|---|---|" + ("---|" if averaged else "") + "---|---|---|" + ("---|" if noise else ""),
    ]
    for s in settings:
        what = s["what"] + (" **(default)**" if s.get("samples") and s["distill_steps"] == d else "")
        lines.append(f"| {what} | {s['kendall_tau']:.3f} ({s['kendall_p']:.3g}) | {s['spearman_rho']:.3f} ({s['spearman_p']:.3g}) | "
                     + (f"{s['kendall_tau_first_run']:.3f} | " if averaged else "")
                     + (f"{s['partial_tau_given_macs']:.3f} | " if np.isfinite(s["partial_tau_given_macs"]) else "- | ")
                     + f"{100 * s['cost_fraction_mean']:.1f}%, {100 * s['cost_fraction_max']:.1f}% | {s['proxy_seconds_mean']:.0f} |"
                     + (f" {s['separated_agree']} of {s['separated_pairs']} |" if noise else ""))
    n_ok = len(ok_rows)
    if rr:
        reps = [(r["candidate"], rr["long_fid_by_seed"][r["candidate"]]) for r in ok_rows if r["long_runs"] > 1]
        same = rr.get("same_seed")
        lines += ["", "Repeats of whole long runs with the same settings and evaluation seeds (by training seed: the first run, "
                  "then the distinct repeats): "
                  + "; ".join(f"{c} " + ", ".join(f"seed {k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in d.items()) for c, d in reps)
                  + ". A run repeats itself to the last bit on one machine with one training seed; on another machine (float32 "
                  f"rounding) or with another training seed it differs, and the difference grows over the {args.long_steps} "
                  f"steps: the run-to-run sd of one training seed's long FID (pooled over {rr['candidates_repeated']} candidates, "
                  f"{rr['df']} degrees of freedom) is {rr['train_sd']:.2f}"
                  + (f"; runs of one seed on other machines differ by sd {same['train_sd']:.2f} ({same['df']} degrees of freedom)"
                     if same else "") + "."]
        elsewhere: dict[tuple, list[str]] = {}  # repeats recorded on another machine than this report's (records name it since --device)
        for c, v in rr.get("replicates", {}).items():
            for x in v:
                if x.get("machine") and x["machine"] != meta["machine"]:
                    elsewhere.setdefault((x["machine"], x.get("deferred", False)), []).append(f"{c} seed {x['train_seed']}")
        for (m, deferred), runs in elsewhere.items():
            lines[-1] += (f" Trained and sampled on {m}, float32" + ("; the long FID scored on this report's machine against the "
                          "same teacher samples and reference features (`--defer-fid`)" if deferred else "; evaluated there")
                          + f": {', '.join(runs)}.")
    if noise:
        studs = ", ".join(f"{k} {v['mean']:.2f} ± {v['sd']:.2f}" for k, v in noise["students"].items())
        lines += ["", f"Noise of the long FID (experiments/research/proxy_fidelity/noise_floor.py): the exported long students re-evaluated "
                  f"on {len(noise['seeds'])} seed sets of {noise['samples']} samples ({noise['seeds']}; mean ± sd: {studs}). One long "
                  f"FID varies by sd {noise['fid_sd']:.2f}; the difference between two students on the same seeds by sd "
                  f"{noise['diff_sd']:.2f}."
                  + (f" With the run-to-run noise, the reference FIDs of two candidates of {noise['separation_runs']} "
                     f"long run{'s' if noise['separation_runs'] > 1 else ''} each differ by sd {noise['comparison_sd']:.2f}"
                     if noise.get("train_sd") else f" A difference between two candidates thus has sd {noise['comparison_sd']:.2f}")
                  + f". Pairs whose reference FIDs differ by less than {noise['separation']:.2f} (two of those"
                  + ("; per pair, by the training seeds each has" if rr else "") + ") are "
                  f"not ordered by the long run beyond its own noise; the last column counts the {settings[0]['separated_pairs']} of "
                  f"{n_ok * (n_ok - 1) // 2} pairs it does separate and how many of them each score orders the same way."]
    if rr:
        repeat, perfect = ceiling_words(rr["repeat_tau"])
        lines += ["", f"The ceiling this noise sets: a repeat of the whole reference (the same number of training seeds, averaged) "
                  f"would rank these {n_ok} candidates against this one with {repeat}, run-to-run sd {rr['train_sd']:.2f} per long FID; "
                  f"a score that knew each candidate's expected long FID without noise would reach {perfect} against it: the most "
                  "any proxy can show here."
                  + (f" Measured: over the {rr['run_vs_repeat']['candidates']} candidates of the repeat set "
                     f"`{rr['run_vs_repeat']['tag']}`, the first long runs and the repeats agree with Kendall tau {rr['run_vs_repeat']['kendall_tau']:.3f} (Spearman "
                     f"{rr['run_vs_repeat']['spearman_rho']:.3f})." if rr.get("run_vs_repeat") else "")]
    lines += ["", "## Also tried on the same runs", "", "| proxy | Kendall tau (p) | Spearman rho (p) | cost / long cost (mean) |",
              "|---|---|---|---|"]
    for e in extra:
        cf = f"{100 * e['cost_fraction_mean']:.1f}%" if "cost_fraction_mean" in e else "as above"
        lines.append(f"| {e['what']} | {e['kendall_tau']:.3f} ({e['kendall_p']:.3g}) | {e['spearman_rho']:.3f} ({e['spearman_p']:.3g}) | {cf} |")
    lines += ["", f"## Per candidate (default proxy: {d} steps, {args.proxy_samples} samples)", "",
              "| candidate | space | params (M) | proxy FID | long FID |" + (" long FID, mean (runs, seeds) |" if averaged else "")
              + " long FID vs real | long adherence | proxy s | long s |",
              "|---|---|---|---|---|" + ("---|" if averaged else "") + "---|---|---|---|"]
    for r in sorted(all_ok, key=lambda r: r["long_fid_mean"]):
        lines.append(f"| {r['candidate']}{f' ({set_of(r)})' if set_of(r) != 'first' else ''} | {r['space']} | {r['params'] / 1e6:.2f} | {r['proxy_fid']:.2f} | {r['long_fid']:.2f} | "
                     + (f"{r['long_fid_mean']:.2f} ({r['long_runs']}, {r['long_seeds']}) | " if averaged else "")
                     + f"{r['long_fid_real']:.1f} | {100 * r['long_adherence']:.0f}% | {r['proxy_seconds']:.0f} | {r['long_seconds']:.0f} |")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"\n{r['candidate']}: {r['status']}")
    trained = [s for s in settings if not s.get("zero_cost") and not s.get("baseline")]
    best = max(trained, key=lambda s: s["kendall_tau"])
    target = [s for s in trained if s["kendall_tau"] >= 0.8 and s["cost_fraction_mean"] <= 0.10]
    name = lambda s: s["what"]  # noqa: E731
    if chosen:
        lines += ["", "## Chosen on these candidates, checked on fresh ones", "",
                  f"The rule, fixed before the fresh candidates were run: of the scores above that cost at most 10% of a long run, "
                  f"the one with the highest Kendall tau (a tie goes to the cheaper). It picks **{chosen['what']}** (tau "
                  f"{chosen['kendall_tau']:.3f} at {100 * chosen['cost_fraction_mean']:.1f}%); on these same candidates that "
                  "figure is optimistic: it is the best of the scores tried."]
        if check:
            named = ", ".join(f"{r['candidate']} ({r['space']})" for r in fresh_rows)
            lines += ["", f"Fresh candidates ({named}), one "
                      f"{args.long_steps}-step run each unless repeated, run after the rule was fixed:", ""]
            lines += _check_table(check, noise, "first", "fresh")
            if rr and rr.get("repeat_tau_all"):
                repeat, perfect = ceiling_words(rr["repeat_tau_all"])
                fr = [r["long_seeds"] for r in fresh_rows]
                lines += ["", f"The ceiling over all {len(ok_rows) + len(fresh_rows)} candidates (the fresh ones with {span(fr)} "
                          f"training seed{'s' if max(fr) > 1 else ''} each): a repeat of the whole reference would rank them against "
                          f"this one with {repeat}; a score that knew each candidate's expected long FID without noise would "
                          f"reach {perfect}."]
        elif fresh_rows:
            lines += ["", f"{len(fresh_rows)} fresh candidates ran; at least 3 are needed for the check."]
        if second_check:
            named = ", ".join(f"{r['candidate']} ({r['space']})" for r in second_rows)
            lines += ["", "## A second check, on candidates fixed after the first check was read", "",
                      f"Second fresh list ({named}), fixed before any of it was run, with the scores of the first check; the "
                      "rank sum of the FID proxy and MACs, formed after the first fresh results were seen, is here a score fixed "
                      f"before its candidates were run. Against the {len(ok_rows) + len(fresh_rows)} candidates before them:", ""]
            lines += _check_table(second_check, noise, "earlier", "fresh-b")
            if rr and rr.get("repeat_tau_second"):
                repeat, perfect = ceiling_words(rr["repeat_tau_second"])
                fr = [r["long_seeds"] for r in second_rows]
                lines += ["", f"The ceiling over all {len(all_ok)} candidates (the second fresh list with {span(fr)} training "
                          f"seed{'s' if max(fr) > 1 else ''} each): a repeat of the whole reference would rank them against this "
                          f"one with {repeat}; a noise-free score would reach {perfect}."]
        elif second_rows:
            lines += ["", f"{len(second_rows)} candidates of the second fresh list ran; at least 3 are needed for its check."]
    first_words = (f"met by {'; '.join(name(s) for s in target)}" if target else
                   f"**not met** by any setting measured; the best was {name(best)} (tau {best['kendall_tau']:.2f} at "
                   f"{100 * best['cost_fraction_mean']:.1f}% of the cost)")
    lines += ["", "## Reading", "",
              f"Target (Kendall tau >= 0.8 at <= 10% of the long run's cost), on the {len(ok_rows)} first candidates alone, where "
              f"every score was tried{' (the best of many there: optimistic)' if len(trained) > 1 else ''}: {first_words}."]
    last = second_check or check  # the scores fixed beforehand, over every candidate run so far
    if last:
        n_all = last[0]["all"]
        fixed = [c for c in last if not c["post_hoc"]]
        scores = [c for c in fixed if not c["baseline"]]  # the cost baselines are no proxy: they cannot meet the target
        top = max(scores, key=lambda c: c["kendall_tau_all"]) if scores else None
        lines += ["", f"Over all {n_all} candidates, the scores fixed before the last fresh list was run: "
                  + "; ".join(f"{c['what']} {c['kendall_tau_all']:.3f}" for c in fixed) + ". "
                  + ("**The target is not met over all candidates.**" if not top or top["kendall_tau_all"] < 0.8 else
                     f"{top['what']} reaches tau >= 0.8 over all of them (its cost: the tables above).")]
    lines += ["", "![proxy against long FID](proxy_fidelity.png)", "",
              "With this many candidates the p-values are wide; the table reports what was measured, not a general law.", ""]
    if args.notes:
        lines += [Path(args.notes).read_text().strip(), ""]
    path.write_text("\n".join(lines))


def _check_table(check: list[dict], noise: dict | None, before: str, new: str) -> list[str]:
    """The rows of a fresh check (``fresh_check``): ``before`` names the candidates it is checked
    against, ``new`` the fresh ones."""
    lines = [f"| score | Kendall tau, {before} alone | Kendall tau, {new} alone | pairs with a {new} candidate: same order |"
             + (" of those the reference separates |" if noise else "")
             + " Kendall tau, all candidates |" + (" pairs the reference separates, all candidates: same order |" if noise else "")
             + f" partial tau given MACs, all | cost / long cost ({new}, mean) |",
             "|---|---|---|---|" + ("---|---|" if noise else "") + "---|---|---|"]
    for c in check:
        lines.append(f"| {c['what']} | {c['kendall_tau_first']:.3f} ({c['first']}) | {c['kendall_tau_fresh']:.3f} ({c['fresh']}) | "
                     f"{c['pairs_with_fresh_agree']} of {c['pairs_with_fresh']} | "
                     + (f"{c['separated_pairs_with_fresh_agree']} of {c['separated_pairs_with_fresh']} | " if noise else "")
                     + f"{c['kendall_tau_all']:.3f} ({c['all']}) | "
                     + (f"{c['separated_agree_all']} of {c['separated_pairs_all']} | " if noise else "")
                     + (f"{c['partial_tau_given_macs_all']:.3f} | " if np.isfinite(c["partial_tau_given_macs_all"]) else "- | ")
                     + f"{100 * c['cost_fraction_mean_fresh']:.1f}% |")
    return lines


def _resolve(spec, arch):
    """A candidate list entry as a Candidate: a preset name or dict, or a function of the architecture."""
    return spec(arch) if callable(spec) else resolve_candidate(spec, arch)


def _base_for(name, spec, arch, args, export_dir: Path, base_unet, context=()):
    """The Base U-Net a recombination takes its blocks from (loaded once); ``base_unet`` unchanged
    for a candidate that needs none. With ``--rebuild-base`` a missing export (it is not kept in the
    repository) is distilled again; ``context`` is ``(pipe, arch, data, heldout, sched)`` for that."""
    cand = _resolve(spec, arch)
    if not cand.base_blocks or base_unet is not None:
        return base_unet
    bf = Path(args.base) if args.base else export_dir / "bk-sdm-base-long"
    if not (bf / "hybridsd_nas.json").is_file():
        if args.base or not args.rebuild_base:
            raise SystemExit(f"error: {bf} is missing; run bk-sdm-base first (the recombinations' Base), give --base, "
                             "or --rebuild-base to distill it again from its recorded run's settings")
        rebuild_base(args, export_dir, bf, *context)
    from hybridsd_nas import load_unet

    args.base_used = bf
    return load_unet(bf, device=args.device)


def machine_label(device: str) -> str:
    """Where a run ran: the CPU's name, architecture and threads, or the accelerator's name."""
    from hybridsd_nas.cost.latency import device_label

    d = torch.device(device)
    if d.type == "cpu":
        return f"{device_label(d)} ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{device_label(d)} ({d.type}, torch {torch.__version__})"


def record_name(name: str, replicate: str | None) -> str:
    """The record of a candidate's run (``Records``): ``runs/<name>.json``, or a replicate set's
    ``replicates/<name>.<TAG>.json``."""
    return f"replicates/{name}.{replicate}.json" if replicate else f"runs/{name}.json"


def rebuild_base(args, export_dir: Path, bf: Path, pipe, arch, data, heldout, sched) -> dict:
    """Distill BK-SDM-Base again, as the run recorded in ``<run dir>/bk-sdm-base[.<TAG>].json`` was,
    and export it to ``bf``: the recombinations of a set run over several sessions need their set's
    Base. The record of the set is left as it is (it is what the analysis reads); this run's own goes
    to ``<bf>/rebuilt_run.json``, with its long FID beside the recorded one (on another machine the two
    differ by float32 rounding only, the same training seed giving the same batches and noise)."""
    store = Records(args.out)
    rec_name = record_name("bk-sdm-base", args.replicate)
    rec_file = store.out / rec_name
    if not store.exists(rec_name):
        raise SystemExit(f"error: --rebuild-base: {rec_file} is missing; run bk-sdm-base first (the recombinations' Base)")
    recorded = store.read(rec_name)
    seed = recorded.get("train_seed", UNRECORDED_TRAIN_SEED)
    if seed != args.train_seed:
        raise SystemExit(f"error: --rebuild-base: {rec_file} trained with seed {seed}, this invocation with --train-seed "
                         f"{args.train_seed}; give --train-seed {seed}")
    if str(args.long_steps) not in recorded.get("evals", {}):
        raise SystemExit(f"error: --rebuild-base: {rec_file} holds no {args.long_steps}-step run; give --long-steps as it was run")
    print(f"bk-sdm-base: {bf} is missing; distilling it again ({args.long_steps} steps, training seed {seed})",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # no moving average: the export, all the recombinations take, is the last weights either way
    sub = argparse.Namespace(**{**vars(args), "rescore": False, "list": "first", "ema_decay": 0.0})
    row = run_candidate("bk-sdm-base", "bk-sdm-base", sub, pipe, arch, data, heldout, sched, None, export_dir)
    if row["status"] != "ok":
        raise SystemExit(f"error: --rebuild-base: the Base's distillation ended {row['status']}: {row['reason']}")
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    L = str(args.long_steps)
    row["recorded"] = {"file": str(rec_file), "long_fid": recorded["evals"][L]["long"]["proxy_fid"],
                       "final_loss": recorded.get("final_loss")}
    mine = row["evals"][L].get("long", {}).get("proxy_fid")  # None with --defer-fid until --score-deferred
    (bf / "rebuilt_run.json").write_text(json.dumps(row, indent=1))
    # what the recombinations built on it record (their runs are kept; this export is not)
    args.base_rebuilt = {"long_fid": mine, "recorded_long_fid": row["recorded"]["long_fid"],
                         "final_loss": row["final_loss"], "recorded_final_loss": row["recorded"]["final_loss"],
                         "wall_seconds": row["wall_seconds"]}
    print(f"bk-sdm-base rebuilt: long FID {'deferred' if mine is None else f'{mine:.3f}'} (recorded {row['recorded']['long_fid']:.3f}), "
          f"final loss {row['final_loss']:.6f} (recorded {recorded.get('final_loss')})", file=sys.stderr, flush=True)
    return row


def setup(args):
    """What every candidate run shares: the teacher pipeline, its architecture, the training latents,
    the held-out latents of the cheap score and the training noise schedule; fills in the sampler
    settings of ``args`` from the teacher's where not given."""
    from diffusers import DDPMScheduler

    if torch.device(args.device).type == "cuda" and not args.tf32:
        # plain float32, as on a CPU: cuDNN's convolutions otherwise default to TF32 (10-bit mantissa)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    pipe = load_pipeline(args.teacher, device=args.device)
    args.sampler_steps, args.guidance = resolve_teacher(args.teacher).sampling_settings(args.sampler_steps, args.guidance)
    data = fashion_mnist_data(pipe, n=ProxySettings.data_images, seed=args.seed)
    heldout = fashion_mnist_data(pipe, n=args.heldout_latents, seed=args.seed, split="test")
    return pipe, describe(args.teacher), data, heldout, DDPMScheduler.from_config(pipe.scheduler.config)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--long-steps", type=int, default=500)
    ap.add_argument("--checkpoints", type=_ints, default=_ints("10,25,50"), help="proxy lengths evaluated, steps")
    ap.add_argument("--score-checkpoints", type=_ints, default=_ints("5,10,20,40,60,80"),
                    help="steps at which the cheap held-out output-MSE score is taken (no sampling)")
    ap.add_argument("--heldout-latents", type=int, default=64, help="held-out noisy latents of that score")
    ap.add_argument("--default-steps", type=int, default=None, help="the proxy length reported as the default (default: the largest checkpoint)")
    ap.add_argument("--batch-size", type=int, default=ProxySettings.batch_size)
    ap.add_argument("--lr", type=float, default=ProxySettings.lr)
    ap.add_argument("--proxy-samples", type=int, default=ProxySettings.samples)
    ap.add_argument("--long-samples", type=int, default=256)
    ap.add_argument("--sampler-steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--device", default="cpu", help="where the runs train and sample (cpu, cuda, ...); recorded with each run")
    ap.add_argument("--tf32", action="store_true", help="on CUDA, let convolutions and matmuls use TF32 (default: plain float32)")
    ap.add_argument("--defer-fid", action="store_true",
                    help="with --replicate: save each long run's samples instead of scoring them (for a machine without the "
                         "FID feature network, e.g. an accelerator the network's weights cannot travel to); score with --score-deferred")
    ap.add_argument("--ema-decay", type=float, default=0.0,
                    help="keep an EMA of the trained weights (diffusers' EMAModel) and give it the long evaluation too "
                         "(long_ema, beside the last weights' long; the proxies are the raw weights' either way); 0 = off")
    ap.add_argument("--score-deferred", action="store_true",
                    help="with --replicate: score the samples that --defer-fid saved, on this machine, and update the records")
    ap.add_argument("--seed", type=int, default=0, help="seed of every evaluation (prompts' noise, held-out latents) and the data")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seed of the distillation alone (batch order, timesteps, noise; default: --seed). Only with "
                         "--replicate: a repeat with another training seed is an independent draw of the run-to-run noise, "
                         "where a repeat with the same seed on the same machine repeats the run to the last bit")
    ap.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--analyse-only", action="store_true", help="only tabulate the candidates already run")
    ap.add_argument("--out", default="results/proxy_fidelity", help="work directory (per-candidate runs)")
    ap.add_argument("--results", default="results", help="where proxy_fidelity.csv/.md/.json/.png go")
    ap.add_argument("--notes", default=None, help="a markdown file of reading notes appended to proxy_fidelity.md")
    ap.add_argument("--noise", default=None, help="noise_floor.py's report (default: <out>/noise_floor.json when present)")
    ap.add_argument("--replicate", default=None, metavar="TAG",
                    help="repeat the long runs only (same settings and seeds, no proxy evaluations) into "
                         "<out>/replicates/<name>.<TAG>.json; recombinations take the Base of the same replicate "
                         "(<out>/replicates/<TAG>/bk-sdm-base-long). The analysis averages the long FID over all runs of a candidate")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--fresh", action="store_true",
                       help="run the fresh candidates (FRESH), which check on new candidates a score chosen on the first ones")
    which.add_argument("--fresh-b", action="store_true",
                       help="run the second fresh list (FRESH_B), fixed before it was run, which checks the scores the first check left open")
    which.add_argument("--fresh-c", action="store_true",
                       help="run the third fresh list (FRESH_C), fixed before it was run, read by ema_reference.py (with --ema-decay)")
    which.add_argument("--retrained", action="store_true",
                       help="run the list fixed for the retrained teacher (RETRAINED), read by retrained.py (with --ema-decay)")
    ap.add_argument("--rescore", action="store_true",
                    help="for candidates already run: repeat only the first max(--score-checkpoints) steps and add the "
                         "cheap scores (held-out profile, paired samples) to their record, under evals[n]['rescore']")
    ap.add_argument("--base", default=None,
                    help="the exported long-distilled BK-SDM-Base the recombinations take their blocks from "
                         "(default: <out>/bk-sdm-base-long, or the replicate's own)")
    ap.add_argument("--rebuild-base", action="store_true",
                    help="when that Base's export is missing (exports are not kept in the repository), distill it again "
                         "from its recorded run's settings before the first recombination; the record stays as it was")
    ap.add_argument("--paired-samples", type=int, default=8, help="samples of the paired sample score (no feature network)")
    ap.add_argument("--paired-checkpoints", type=_ints, default=_ints("10,20,30,40"),
                    help="steps (among --score-checkpoints) at which the paired sample score is taken")
    args = ap.parse_args(argv)
    args.list = "fresh" if args.fresh else "fresh-b" if args.fresh_b else "fresh-c" if args.fresh_c else "retrained" if args.retrained else "first"
    args.base_used = None
    args.base_rebuilt = None
    if args.train_seed is None:
        args.train_seed = args.seed
    elif args.train_seed != args.seed and not args.replicate:
        ap.error(f"--train-seed {args.train_seed} needs --replicate TAG: the first runs (with the proxy evaluations) train with --seed {args.seed}")
    if (args.defer_fid or args.score_deferred) and not args.replicate:
        ap.error("--defer-fid and --score-deferred need --replicate TAG: the first runs score their proxies as they train")
    if args.ema_decay and not 0.0 < args.ema_decay < 1.0:
        ap.error(f"--ema-decay {args.ema_decay} is not a decay: use a value in (0, 1), e.g. 0.99, or 0 for none")
    # a crash inside a native kernel (seen once per long series on this CPU, not reproduced by rerunning
    # the candidate) then leaves the Python stack of where it happened in the log
    faulthandler.enable()
    if max(args.checkpoints) * 10 > args.long_steps:
        ap.error(f"--long-steps {args.long_steps} must be at least 10x the longest proxy ({max(args.checkpoints)} steps)")
    args.default_steps = args.default_steps or max(args.checkpoints)
    if args.default_steps not in args.checkpoints:
        ap.error(f"--default-steps {args.default_steps} is not one of --checkpoints {args.checkpoints}")
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    if args.replicate and not args.replicate.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--replicate {args.replicate!r}: use letters, digits, '-' and '_' only")
    # where this invocation writes: the runs, or one replicate set of them (records: Records, loose until packed)
    store = Records(out)
    run_dir = out / "replicates" if args.replicate else out / "runs"
    export_dir = out / "replicates" / args.replicate if args.replicate else out
    t_all = time.perf_counter()
    pipe, arch, data, heldout, sched = setup(args)
    meta = {"machine": machine_label(args.device),
            "torch": torch.__version__, "sampler": type(pipe.scheduler).__name__, "args": {k: v for k, v in vars(args).items()}}
    if args.score_deferred:
        n = score_deferred(args, pipe, export_dir, store, [record_name(name, args.replicate) for name, _ in LISTS[args.list]])
        print(f"replicate {args.replicate}: {n} deferred long runs scored; tabulate with --analyse-only", file=sys.stderr)
        return 0
    if not args.analyse_only and not args.defer_fid:  # deferred runs sample only: no teacher references needed
        meta["cache_warmup_seconds"] = round(warm_caches(args, pipe), 1)
        print(f"teacher samples and reference features cached ({meta['cache_warmup_seconds']:.0f} s)", file=sys.stderr, flush=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    base_unet = None
    for name, spec in LISTS[args.list]:
        if only and name not in only:
            continue
        f = record_name(name, args.replicate)
        if args.rescore:
            if not store.exists(f):
                print(f"{name}: no run to rescore, skipped", file=sys.stderr)
                continue
            row = store.read(f)
            if not row.get("rescore") and row["status"] == "ok":
                base_unet = _base_for(name, spec, arch, args, export_dir, base_unet, (pipe, arch, data, heldout, sched))
                print(f"{name}: rescoring the first {max(args.score_checkpoints)} steps", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                new = run_candidate(name, spec, args, pipe, arch, data, heldout, sched, base_unet, export_dir)
                for n, rec in new["evals"].items():
                    row["evals"].setdefault(n, {})["rescore"] = rec
                    old = row["evals"][n].get("heldout", {}).get("output_mse")
                    if old is not None:  # the same student as the first run's (up to float32 nondeterminism)?
                        print(f"  {name} step {n}: held-out output MSE {rec['heldout']['output_mse']:.5f} (first run {old:.5f})",
                              file=sys.stderr)
                row["rescore"] = {"steps": max(args.score_checkpoints), "status": new["status"], "reason": new["reason"],
                                  "base": str(args.base_used) if new["space"] == "recombination" else None,
                                  "wall_seconds": round(time.perf_counter() - t0, 1)}
                store.write(f, row)
            rows.append(row)
            continue
        if args.replicate and not store.exists(record_name(name, None)):
            print(f"{name}: no first run to repeat, skipped", file=sys.stderr)
            continue
        if store.exists(f):
            rows.append(store.read(f))
            print(f"{name}: done before, kept", file=sys.stderr)
        elif args.analyse_only:
            continue
        else:
            base_unet = _base_for(name, spec, arch, args, export_dir, base_unet, (pipe, arch, data, heldout, sched))
            print(f"{name}: distilling {args.long_steps} steps", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                row = run_candidate(name, spec, args, pipe, arch, data, heldout, sched, base_unet, export_dir)
            except InvalidCandidateError as e:  # a candidate list mistake costs that candidate, not the run
                print(f"{name}: invalid candidate, skipped: {e}", file=sys.stderr, flush=True)
                continue
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            if row["space"] == "recombination" and args.base_rebuilt:
                row["base_rebuilt"] = args.base_rebuilt
            store.write(f, row)
            rows.append(row)
    meta["wall_seconds"] = sum(r.get("wall_seconds", 0) for r in rows)
    meta["this_invocation_seconds"] = round(time.perf_counter() - t_all, 1)
    if args.replicate:
        print(f"replicate {args.replicate}: {len(rows)} runs in {run_dir}; tabulate with --analyse-only", file=sys.stderr)
    else:
        # the analysis reads every candidate run so far, of every list it tabulates, whichever this invocation
        # ran; the third fresh list is read against the EMA reference (ema_reference.py) alone
        names = [n for k, lst in LISTS.items() if k in RAW_READ for n, _ in lst]
        rows = [store.read(f) for f in (record_name(n, None) for n in names) if store.exists(f)]
        if len([r for r in rows if r["status"] == "ok" and set_of(r) == "first"]) < 3:
            return 0
        analyse(rows, args, meta, Path(args.results), load_noise(Path(args.noise) if args.noise else out / "noise_floor.json", args.teacher),
                load_replicates(out, args.long_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
