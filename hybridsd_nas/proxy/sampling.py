"""Scores that sample: the student's images on the evaluation set's fixed prompts and seeds, against
the teacher's own samples on the same ones (cached by content), and the extras the set allows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hybridsd_nas.data.evalset import EvalSet, resolve_eval_set
from hybridsd_nas.metrics import FeatureExtractor
from hybridsd_nas.metrics.evaluation import SampleScorer
from hybridsd_nas.metrics.sampling import generate, teacher_samples
from hybridsd_nas.proxy.scores import paired_mse
from hybridsd_nas.proxy.settings import ProxySettings
from hybridsd_nas.sources import Teacher, resolve_teacher


def eval_set_for(teacher: Teacher | str, s: ProxySettings) -> EvalSet:
    """The evaluation set of a proxy run: ``s.eval_prompts`` (with ``s.classifier``), else the teacher's own."""
    return resolve_eval_set(resolve_teacher(teacher), s.eval_prompts, s.classifier)


def paired_sample_score(teacher: Teacher | str, pipe, student, samples: int, seed: int, steps: int,
                        guidance: float, eval_set: EvalSet | None = None) -> dict[str, float]:
    """The student's samples on the first ``samples`` fixed evaluation prompts and seeds against the
    teacher's (cached) on the same ones: mean squared pixel difference, no feature network. A cheap
    score of how far sampling with the student drifts from the teacher's samples, which is what the
    FID against the teacher's samples measures as a distribution."""
    t = resolve_teacher(teacher)
    es = eval_set or resolve_eval_set(t)
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in es.rows(samples)]
    t_imgs = teacher_samples(t, pipe, prompts, seed, steps, guidance)
    s_imgs = generate(pipe, student, prompts, seed, steps, guidance)
    return {"paired_mse": paired_mse(s_imgs, t_imgs), "samples": samples, "seconds": round(time.perf_counter() - t0, 3)}


def scorer(teacher: Teacher | str, pipe, s: ProxySettings, steps: int, guidance: float, device: str = "cpu",
           fx: FeatureExtractor | None = None, eval_set: EvalSet | None = None) -> SampleScorer:
    """What every evaluation with settings ``s`` compares against, cached by content: the teacher's
    samples on the ``s.samples`` fixed prompts and seeds and their features, the real reference's
    features where the evaluation set names one, the classifier and CLIP model where given."""
    t = resolve_teacher(teacher)
    es = eval_set or eval_set_for(t, s)
    rows = es.rows(s.samples)
    t_imgs = teacher_samples(t, pipe, [r["prompt"] for r in rows], s.seed, steps, guidance)
    return SampleScorer(es, rows, t_imgs, device=device, kid_subset=s.kid_subset, seed=s.seed, clip_model=s.clip_model,
                        real_images=s.reference_images, extractor=fx)


def evaluate_student(teacher: Teacher | str, pipe, student, s: ProxySettings, steps: int, guidance: float,
                     device: str = "cpu", return_images: bool = False,
                     sample: Callable[[list[str]], np.ndarray] | None = None,
                     eval_set: EvalSet | None = None) -> dict[str, Any]:
    """The proxy's evaluation of a (distilled) student: samples on ``s.samples`` fixed prompts and
    seeds; FID/KID against the teacher's samples (``proxy_fid``, ``kid``), and where the evaluation
    set allows against real images, adherence, CLIP score and CMMD (``skipped`` says which were not
    measured and why). ``sample(prompts)`` replaces the student's own sampling (e.g. a hybrid run);
    it returns uint8 images (N, 3, H, W), image i seeded ``s.seed + i``."""
    t0 = time.perf_counter()
    sc = scorer(teacher, pipe, s, steps, guidance, device=device, eval_set=eval_set)
    s_imgs = sample(sc.prompts) if sample is not None else generate(pipe, student, sc.prompts, s.seed, steps, guidance)
    figs = sc(s_imgs)
    out: dict[str, Any] = {"proxy_fid": figs.pop("fid"), **figs, "paired_mse": paired_mse(s_imgs, sc.teacher_images),
                           "eval_seconds": round(time.perf_counter() - t0, 2), "samples": len(s_imgs)}
    if sc.skipped:
        out["skipped"] = dict(sc.skipped)
    if return_images:
        out["images"] = s_imgs
    return out
