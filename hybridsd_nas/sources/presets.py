"""Named U-Net configs: a registry of diffusers ``UNet2DConditionModel`` configs.

``sd-v1`` is the SD-1.4/1.5 U-Net; the three ``bk-sdm-*`` presets are BK-SDM's published U-Net
configs (``src/unet_config/bk_*/config.json`` of Nota-NetsPresso/BK-SDM); ``sd-v2`` and ``sdxl``
are the SD-2.x (768-v) and SDXL-base U-Nets, kept so that every rule of the architecture model is
exercised on per-block head counts, linear projections and deep transformers, not only on SD-1.x.
The BK-SDM configs are also candidates of ``sd-v1`` (see :mod:`hybridsd_nas.arch.candidate`):
the registry of candidate presets names the same three points.
"""

from __future__ import annotations

import copy
from typing import Any

from hybridsd_nas.core.registry import Registry

_SD_V1: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "use_linear_projection": False,
    "upcast_attention": False,
}

_BK_BASE = {**_SD_V1, "layers_per_block": 1}
_BK_SMALL = {**_BK_BASE, "mid_block_type": None}
_BK_TINY = {
    **_BK_SMALL,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
}

_SD_V2 = {
    **_SD_V1,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}

_SDXL = {
    **_SD_V1,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

UNET_PRESETS: Registry[dict[str, Any]] = Registry("U-Net preset")
UNET_PRESETS.register("sd-v1", _SD_V1, help="SD-1.4/1.5 U-Net (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5)")
UNET_PRESETS.register("bk-sdm-base", _BK_BASE, help="BK-SDM-Base: one layer per down block, two per up block, mid block kept")
UNET_PRESETS.register("bk-sdm-small", _BK_SMALL, help="BK-SDM-Small: BK-SDM-Base without the mid block")
UNET_PRESETS.register("bk-sdm-tiny", _BK_TINY, help="BK-SDM-Tiny: BK-SDM-Small without the innermost stage")
UNET_PRESETS.register("sd-v2", _SD_V2, help="SD-2.x U-Net (768-v): linear projections, per-block head counts")
UNET_PRESETS.register("sdxl", _SDXL, help="SDXL-base U-Net: per-block transformer depth 1/2/10, text_time embedding")


def list_unet_presets() -> list[str]:
    return list(UNET_PRESETS.names())


def unet_preset(name: str) -> dict[str, Any]:
    """A deep copy of the named preset's diffusers config."""
    return copy.deepcopy(UNET_PRESETS.get(name))
