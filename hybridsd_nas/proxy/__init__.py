"""The quality proxy: a short distillation from the teacher, then the student's output MSE against the
teacher on fixed held-out noisy latents (``heldout_mse``, the ranking score: no sampling), then proxy
FID against the teacher's own samples (same prompts, same seeds), FID against real held-out images,
KID and prompt adherence.

Zero-cost pre-filters are computed first, before any training, from the student as inherited:
the output error against the teacher on fixed noisy latents, and the latent-statistics score of
Hybrid SD / LD-Pruner (shift of the output's mean and standard deviation). Studies may use them
to skip hopeless candidates. Teacher samples, their features and the real reference statistics
are cached by content so a study pays for them once. How well the ranking score ranks:
``docs/decisions/0001-proxy-ranking-score.md``.
"""

from hybridsd_nas.metrics.sampling import generate, plain_float32, teacher_samples
from hybridsd_nas.proxy.run import (
    ProxyResult,
    ProxyRun,
    Stage,
    distill_student,
    prepare,
    run_proxy,
    score_heldout,
    score_samples,
    score_zero_cost,
)
from hybridsd_nas.proxy.sampling import eval_set_for, evaluate_student, paired_sample_score, scorer
from hybridsd_nas.proxy.scores import heldout_score, paired_mse, zero_cost_scores
from hybridsd_nas.proxy.settings import ProxySettings

__all__ = [
    "ProxyResult",
    "ProxyRun",
    "ProxySettings",
    "Stage",
    "distill_student",
    "evaluate_student",
    "generate",
    "heldout_score",
    "paired_mse",
    "paired_sample_score",
    "plain_float32",
    "prepare",
    "eval_set_for",
    "scorer",
    "run_proxy",
    "score_heldout",
    "score_samples",
    "score_zero_cost",
    "teacher_samples",
    "zero_cost_scores",
]
