"""Hybrid inference: several U-Nets over one denoising run (Hybrid SD, A-SDM multi-U-Net), with
cloud/edge cost accounting and a schedule sweep."""

from ._pipeline import (
    LOCATIONS,
    HybridModel,
    HybridModelError,
    HybridPipeline,
    HybridScheduleError,
    parse_steps,
    resolve_unet,
    resolve_vae,
    step_groups,
    tiny_random_vae,
)

__all__ = [
    "LOCATIONS",
    "HybridModel",
    "HybridModelError",
    "HybridPipeline",
    "HybridScheduleError",
    "parse_steps",
    "resolve_unet",
    "resolve_vae",
    "step_groups",
    "tiny_random_vae",
]

from ._cost import (  # noqa: E402
    SD15_TEXT_CONFIG,
    SD15_VAE_CONFIG,
    Component,
    Link,
    Segment,
    account,
    cloud_share_table,
    decoder_macs,
    decoder_scale,
    pipeline_cost,
    text_encoder_macs,
    unet_macs,
)

__all__ += [
    "SD15_TEXT_CONFIG",
    "SD15_VAE_CONFIG",
    "Component",
    "Link",
    "Segment",
    "account",
    "cloud_share_table",
    "decoder_macs",
    "decoder_scale",
    "pipeline_cost",
    "text_encoder_macs",
    "unet_macs",
]

from ._sweep import SweepSettings, plot, run_sweep, switch_points, write_csv  # noqa: E402

__all__ += ["SweepSettings", "plot", "run_sweep", "switch_points", "write_csv"]
