"""Distillation of a candidate from its teacher (BK-SDM losses, A-SDM mid supervision and progressive
incubation), used short by the quality proxy and long as the final training."""

from .data import DistillData, encode_images, encode_prompts, fashion_mnist_data, folder_data, teacher_sample_data
from .losses import FeaturePair, LossWeights, attach_taps, feature_pairs, perceptual_term
from .trainer import LR_SCHEDULES, DistillConfig, DistillResult, averaged_weights, distill

__all__ = [
    "LR_SCHEDULES",
    "perceptual_term",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "FeaturePair",
    "LossWeights",
    "attach_taps",
    "averaged_weights",
    "distill",
    "encode_images",
    "encode_prompts",
    "fashion_mnist_data",
    "feature_pairs",
    "folder_data",
    "teacher_sample_data",
]
