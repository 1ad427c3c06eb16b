"""Hybrid inference: several U-Nets over one denoising run (Hybrid SD, A-SDM multi-U-Net) and a
sweep of the switch step. The cost side (cloud/edge accounting) is :mod:`hybridsd_nas.cost.pipeline`."""

from hybridsd_nas.hybrid.pipeline import (
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
from hybridsd_nas.hybrid.sweep import SweepSettings, generate, plot, run_sweep, switch_points, write_csv

__all__ = [
    "LOCATIONS",
    "HybridModel",
    "HybridModelError",
    "HybridPipeline",
    "HybridScheduleError",
    "SweepSettings",
    "generate",
    "parse_steps",
    "plot",
    "resolve_unet",
    "resolve_vae",
    "run_sweep",
    "step_groups",
    "switch_points",
    "tiny_random_vae",
    "write_csv",
]
