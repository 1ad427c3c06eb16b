"""Dummy U-Net inputs of the right shapes for a config, on any device (meta included)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hybridsd_nas.core.errors import ConfigError, HybridSDError


def latent_size(resolution: int, vae_scale: int = 8) -> int:
    if resolution <= 0 or resolution % vae_scale:
        raise HybridSDError(f"resolution {resolution} must be a positive multiple of the VAE scale factor {vae_scale}")
    return resolution // vae_scale


def unet_inputs(
    config: Mapping[str, Any],
    resolution: int = 512,
    batch: int = 1,
    text_len: int = 77,
    vae_scale: int = 8,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Keyword arguments for ``UNet2DConditionModel.forward``: a latent of ``resolution/vae_scale``,
    a timestep, ``text_len`` text tokens of ``cross_attention_dim``, and SDXL's added conditions."""
    if batch < 1:
        raise HybridSDError(f"batch must be at least 1, got {batch}")
    h = latent_size(resolution, vae_scale)
    cad = config.get("cross_attention_dim", 1280)
    if isinstance(cad, (list, tuple)):
        cad = cad[0]
    if config.get("encoder_hid_dim") is not None:
        cad = config["encoder_hid_dim"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        if str(device) == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    kw: dict[str, Any] = {
        "sample": rand(batch, config.get("in_channels", 4), h, h),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=device),
        "encoder_hidden_states": rand(batch, text_len, cad),
    }
    aet = config.get("addition_embed_type")
    if aet == "text_time":
        tdim = config.get("addition_time_embed_dim") or 256
        pcd = config.get("projection_class_embeddings_input_dim") or 2816
        kw["added_cond_kwargs"] = {"text_embeds": rand(batch, pcd - 6 * tdim), "time_ids": rand(batch, 6)}
    elif aet is not None:
        raise ConfigError(f"addition_embed_type {aet!r} is not supported by the cost engine; supported: null, 'text_time'")
    if config.get("class_embed_type") is not None:
        raise ConfigError("class_embed_type is not supported by the cost engine; supported: null")
    return kw
