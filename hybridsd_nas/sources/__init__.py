"""Where models come from: U-Net config presets, embedded-model names, local directories and hub ids,
resolved once. :func:`resolve_teacher` gives the :class:`Teacher` every later stage receives."""

from hybridsd_nas.sources.presets import UNET_PRESETS, list_unet_presets, unet_preset
from hybridsd_nas.sources.teacher import (
    Teacher,
    check_pipeline,
    load_pipeline,
    pipeline_fingerprint,
    pipeline_path,
    resolve_teacher,
    vae_scale_factor,
)
from hybridsd_nas.sources.unet import (
    HUB_ID,
    hub_snapshot,
    known_names,
    load_pretrained_unet,
    load_unet_config,
    resolve_unet_dir,
    validate_config,
    zoo_path,
)

__all__ = [
    "HUB_ID",
    "Teacher",
    "UNET_PRESETS",
    "check_pipeline",
    "hub_snapshot",
    "known_names",
    "list_unet_presets",
    "load_pipeline",
    "load_pretrained_unet",
    "load_unet_config",
    "pipeline_fingerprint",
    "pipeline_path",
    "resolve_teacher",
    "resolve_unet_dir",
    "unet_preset",
    "vae_scale_factor",
    "validate_config",
    "zoo_path",
]
