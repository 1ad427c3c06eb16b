"""Distillation of a candidate from its teacher (BK-SDM losses, A-SDM mid supervision and progressive
incubation), used short by the quality proxy and long as the final training."""

from hybridsd_nas.data import encode_images
from hybridsd_nas.distill.data import DistillData, fashion_mnist_data, folder_data, teacher_sample_data
from hybridsd_nas.distill.final import (
    DATA_SOURCES,
    FinalTraining,
    checked_data_spec,
    data_spec,
    distill_candidate,
    distill_data,
    teacher_resolution,
    training_card,
    training_device,
    validator,
)
from hybridsd_nas.distill.losses import FeaturePair, LossWeights, attach_taps, feature_pairs, perceptual_term
from hybridsd_nas.distill.trainer import (
    CHECKPOINTS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    TRACKERS,
    DistillConfig,
    DistillResult,
    averaged_weights,
    check_precision,
    check_resume,
    checkpoints,
    distill,
    micro_batch,
)

__all__ = [
    "CHECKPOINTS",
    "DATA_SOURCES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "TRACKERS",
    "check_precision",
    "check_resume",
    "checkpoints",
    "micro_batch",
    "training_card",
    "training_device",
    "validator",
    "FinalTraining",
    "LR_SCHEDULES",
    "checked_data_spec",
    "data_spec",
    "distill_candidate",
    "distill_data",
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
    "fashion_mnist_data",
    "feature_pairs",
    "folder_data",
    "teacher_resolution",
    "teacher_sample_data",
]
