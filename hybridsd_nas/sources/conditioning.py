"""How a teacher pipeline conditions its U-Net, for every pipeline class the workbench handles.

- SD-1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, its last hidden state
  (``prompt_embeds``); SD-2.x's OpenCLIP encoder is a ``CLIPTextModel`` too.
- SDXL (``StableDiffusionXLPipeline``): the penultimate hidden states of ``text_encoder`` and
  ``text_encoder_2`` concatenated (``prompt_embeds``), the pooled, projected embedding of
  ``text_encoder_2`` (``text_embeds``) and the size conditions (``time_ids``: original size, crop
  top-left (0, 0), target size, all at the sampling resolution), as diffusers'
  ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` make them.

Captions become named tensors once (:func:`encode_prompts`; the data cache stores them as they are),
and any batch of them becomes the U-Net's keyword arguments through one function
(:func:`unet_kwargs`, or :func:`predict` for one forward): ``prompt_embeds`` is
``encoder_hidden_states``, ``text_embeds`` and ``time_ids`` go to ``added_cond_kwargs``. The
unconditional row is the empty prompt's encoding, or zeros where the pipeline zeroes the negative
prompt (SDXL's ``force_zeros_for_empty_prompt``): :func:`zeroed_in_unconditional`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

PROMPT = "prompt_embeds"  # the U-Net's encoder_hidden_states
ADDED = ("text_embeds", "time_ids")  # the U-Net's added_cond_kwargs (SDXL's text_time embedding)
ZEROED = ("prompt_embeds", "text_embeds")  # what a zeroed negative prompt sets to zero (the size conditions stay)


def has_two_encoders(pipe: Any) -> bool:
    """Whether ``pipe`` conditions as SDXL does (a second, projecting text encoder)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def sample_resolution(pipe: Any) -> int:
    """The resolution a pipeline samples at by default: its U-Net's ``sample_size`` times the VAE's scale."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def time_ids(resolution: int, n: int = 1) -> torch.Tensor:
    """SDXL's size conditions of ``n`` images at ``resolution``: (original size, crop top-left (0, 0),
    target size), as ``StableDiffusionXLPipeline._get_add_time_ids`` makes them; (n, 6) float32."""
    r = float(resolution)
    return torch.tensor([[r, r, 0.0, 0.0, r, r]]).repeat(n, 1)


@torch.no_grad()
def encode_prompts(pipe: Any, captions: list[str], resolution: int | None = None) -> dict[str, torch.Tensor]:
    """The named text tensors of ``captions`` as the pipeline itself conditions on them: SD-1.x/2.x
    ``{"prompt_embeds"}`` (the tokenizer padded to ``model_max_length``, ``text_encoder(ids)[0]``);
    SDXL also ``text_embeds`` and ``time_ids`` (``resolution``, default the pipeline's)."""
    if not has_two_encoders(pipe):
        tok, enc = pipe.tokenizer, pipe.text_encoder
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return {PROMPT: enc(ids.to(enc.device))[0]}
    dev = pipe.text_encoder_2.device
    embeds, _, pooled, _ = pipe.encode_prompt(list(captions), device=dev, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {PROMPT: embeds, "text_embeds": pooled,
            "time_ids": time_ids(resolution or sample_resolution(pipe), len(captions)).to(dev, embeds.dtype)}


def zeroed_in_unconditional(pipe: Any) -> tuple[str, ...]:
    """The named arrays that are zeros in the unconditional row: those of :data:`ZEROED` where the
    pipeline's config sets ``force_zeros_for_empty_prompt`` (SDXL's default), else none (the empty
    prompt is encoded like any caption)."""
    cfg = getattr(pipe, "config", {}) or {}
    return ZEROED if cfg.get("force_zeros_for_empty_prompt", False) else ()


def unet_kwargs(text: Mapping[str, Any]) -> dict[str, Any]:
    """A batch's named text arrays as the U-Net's keyword arguments: ``encoder_hidden_states``
    (``prompt_embeds``) and, where the arrays hold SDXL's added conditions, ``added_cond_kwargs``."""
    kw: dict[str, Any] = {"encoder_hidden_states": text[PROMPT]}
    added = {k: text[k] for k in ADDED if k in text}
    if added:
        kw["added_cond_kwargs"] = added
    return kw


def to_device(text: Mapping[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """Every named text tensor on ``device``."""
    return {k: v.to(device) for k, v in text.items()}


def predict(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, text: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One U-Net forward conditioned on a batch's named text arrays (see :func:`unet_kwargs`)."""
    kw = unet_kwargs(text)
    return unet(sample, timestep, kw.pop("encoder_hidden_states"), return_dict=False, **kw)[0]
