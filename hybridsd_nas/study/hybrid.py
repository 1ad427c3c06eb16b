"""Hybrid schedules as points of a study: architecture and schedule searched jointly.

A point of a ``hybrid-schedule`` space is a small U-Net (a candidate of the teacher) plus a
schedule: the teacher (the large, cloud model) runs ``k`` of the ``N`` denoising steps and the
small one (the edge model) the rest, large first (Hybrid SD) or small first (A-SDM S1).

Cost figures (weight-free, on the meta device) come from the same accounting as
``hybridsd-nas hybrid``: ``cloud_share`` is the cloud's share of the MACs of running everything on
the cloud (U-Net steps with classifier-free guidance, the text encoder on the cloud, the VAE
decoder on the edge), ``edge_macs`` what the edge runs per image. Quality: the small U-Net is
distilled once per worker with the study's proxy settings (then reused by every schedule that
uses it), the hybrid run samples the proxy's fixed prompts and seeds, and the figures are the
proxy's (FID/KID against the teacher's samples, FID against real images, adherence).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybridsd_nas.arch import describe
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost.pipeline import Baseline, Component, Payload, Segment, TextEncoders, account, decoder_macs
from hybridsd_nas.hybrid import HybridPipeline, generate
from hybridsd_nas.proxy import Stage, evaluate_student, run_proxy
from hybridsd_nas.sources import Teacher, resolve_teacher, vae_scale_factor


def point_key(pt) -> str:
    """Key of a schedule point: the runs that happen (a model with no steps is not part of the
    run, whatever the order says) and the small U-Net when it runs."""
    s = pt.extra["schedule"]
    runs = [[m, k] for m, k in zip(s["models"], s["steps"]) if k > 0]
    small = pt.candidate.key if any(m == "small" for m, _ in runs) else None
    return "h-" + hashlib.sha1(json.dumps([runs, small]).encode()).hexdigest()[:12]


class ScheduleCost:
    """Cloud/edge accounting of schedules on one teacher pipeline (weight-free)."""

    def __init__(self, teacher: Teacher | str, resolution: int | None = None):
        self.teacher = resolve_teacher(teacher)
        root = Path(self.teacher.path)
        self.arch = describe(self.teacher.path)
        text = TextEncoders.of(root)  # SDXL: both encoders, and the pooled embedding and size conditions sent along
        vae_cfg = json.loads((root / "vae" / "config.json").read_text())
        self.vae_scale = vae_scale_factor(self.teacher)
        self.resolution = resolution or int(self.arch.config.get("sample_size") or 64) * self.vae_scale
        h = self.resolution // self.vae_scale
        self.latent_shape = (int(self.arch.config.get("in_channels", 4)), h, h)
        self.text_shape = text.text_shape()
        self.text_added = text.added
        self.te = Component("text encoder", "cloud", 2 * text.macs())
        self.dec = Component("VAE decoder", "edge", decoder_macs({k: v for k, v in vae_cfg.items() if not k.startswith("_")}, (h, h)))

    def __call__(self, schedule: dict[str, Any], small_macs: int, large_macs: int) -> dict[str, Any]:
        macs = {"large": large_macs, "small": small_macs}
        where = {"large": "cloud", "small": "edge"}
        segs = [Segment(m, where[m], k, macs[m]) for m, k in zip(schedule["models"], schedule["steps"])]
        c = account(segs, Baseline(large_macs),
                    Payload(self.latent_shape, self.text_shape, (self.resolution, self.resolution, 3), dtype_bytes=4,
                            text_added=self.text_added),
                    text_encoder=self.te, decoder=self.dec)
        edge = c["per_location"]["edge"]
        return {"cloud_share": float(c["cloud_share"]["all_macs"]), "edge_macs": int(edge["unet_macs"] + edge["component_macs"]),
                "accounting": {"cloud_share_steps": c["cloud_share"]["steps"], "cloud_share_unet_macs": c["cloud_share"]["unet_macs"],
                               "bytes_sent": c["bytes_sent"], "resolution": self.resolution, "method": c["method"],
                               "components": "text encoder on the cloud, VAE decoder on the edge, classifier-free guidance"}}


class HybridProxy:
    """The proxy for schedule points; distilled small U-Nets are kept per candidate for this worker."""

    def __init__(self, teacher: Teacher | str, settings, device: str = "cpu", base: str | None = None):
        self.teacher, self.settings, self.device, self.base = teacher, settings, device, base
        self._students: dict[str, tuple[Any, dict[str, Any]]] = {}

    def _student(self, cand, pipe, zero_cost_only: bool, prefilter) -> tuple[Any, dict[str, Any]]:
        if cand.key in self._students:
            student, info = self._students[cand.key]
            return student, {**info, "distill_seconds": 0.0, "distilled_before": True}
        # a schedule is scored on its samples; the small U-Net's own held-out score is not used
        result = run_proxy(self.teacher, cand, self.settings, base=self.base, device=self.device, prefilter=prefilter,
                           until=Stage.ZERO_COST if zero_cost_only else Stage.DISTILL)
        student, res = result.student, result.to_dict()
        if res["status"] == "ok" and not zero_cost_only:
            self._students[cand.key] = (student, {k: res.get(k) for k in ("zero_cost", "zero_cost_seconds", "distill_final_loss")})
        return student, res

    def __call__(self, pt, prefilter, quality: bool) -> dict[str, Any]:
        teacher = resolve_teacher(self.teacher)
        pipe = teacher.pipeline(device=self.device)
        student, out = self._student(pt.candidate, pipe, not quality, prefilter)
        out = dict(out)
        if out.get("status", "ok") != "ok" or not quality:
            out.setdefault("status", "ok")
            return out
        s = self.settings
        steps, guidance = teacher.sampling_settings(s.sampler_steps, s.guidance)
        sched = pt.extra["schedule"]
        if sum(sched["steps"]) != steps:
            raise HybridSDError(f"the space's schedules have {sum(sched['steps'])} steps but the proxy samples with {steps}; "
                                f"set proxy.sampler_steps: {sum(sched['steps'])} (or the space's options.steps: {steps})")
        unets = [pipe.unet if m == "large" else student for m in sched["models"]]
        hp = HybridPipeline.from_pipeline(pipe, unets, sched["steps"], locations=["cloud" if m == "large" else "edge" for m in sched["models"]],
                                          names=list(sched["models"]))

        def sample(prompts: list[str]) -> np.ndarray:  # the sweep's sampling, channels first as the proxy's
            return np.ascontiguousarray(generate(hp, prompts, s.seed, steps, guidance, batch=32).transpose(0, 3, 1, 2))

        t0 = time.perf_counter()
        out.update(evaluate_student(teacher, pipe, student, s, steps, guidance, device=self.device,
                                    return_images=True, sample=sample))
        out["eval_seconds"] = round(time.perf_counter() - t0, 2)
        out["status"] = "ok"
        return out
