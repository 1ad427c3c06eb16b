"""The U-Net architecture model: configs, typed description, candidates, plans and builds."""

from .build import SkippedResnet, SkippedTransformer, apply_frozen, apply_surgery, build_student, build_unet, load_base_blocks
from .candidate import (
    CANDIDATE_PRESETS,
    IDENTITY,
    Candidate,
    candidate_preset,
    list_candidate_presets,
    recombine,
    resolve_candidate,
)
from .config import load_pretrained_unet, load_unet_config
from .model import BlockDesc, LayerDesc, UNetArch, UnitDesc, describe, describe_module, instantiate
from .plan import BlockPlan, Plan, plan
from .presets import UNET_PRESETS, list_unet_presets, unet_preset

__all__ = [
    "BlockDesc",
    "BlockPlan",
    "CANDIDATE_PRESETS",
    "Candidate",
    "IDENTITY",
    "LayerDesc",
    "Plan",
    "SkippedResnet",
    "SkippedTransformer",
    "UNET_PRESETS",
    "UNetArch",
    "UnitDesc",
    "apply_frozen",
    "apply_surgery",
    "load_base_blocks",
    "recombine",
    "build_student",
    "build_unet",
    "candidate_preset",
    "describe",
    "describe_module",
    "instantiate",
    "list_candidate_presets",
    "list_unet_presets",
    "load_pretrained_unet",
    "load_unet_config",
    "plan",
    "resolve_candidate",
    "unet_preset",
]
