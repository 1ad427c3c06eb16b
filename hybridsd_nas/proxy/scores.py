"""Scores that need no sampling: the zero-cost pre-filters on the student as inherited, and the
held-out output MSE of a distilled student (the ranking score)."""

from __future__ import annotations

import time

import numpy as np
import torch

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.data.latents import gather_text
from hybridsd_nas.distill.losses import x0_error
from hybridsd_nas.proxy.settings import ProxySettings
from hybridsd_nas.sources.conditioning import predict, to_device


@torch.no_grad()
def zero_cost_scores(student, teacher, data, scheduler, n: int = 16, seed: int = 0) -> dict[str, float]:
    """Before any training: output MSE against the teacher on fixed noisy latents, and the
    latent-statistics score |d mean| + |d std| of the predicted noise (LD-Pruner's criterion).

    The same comparison also gives the error where it is made: ``output_mse_low`` and
    ``output_mse_high`` over the least and the most noisy third of the timesteps, and ``x0_mse``, the
    error of the clean latents the two predictions imply (the noise error scaled by
    sqrt((1 - alpha_bar) / alpha_bar), or sqrt(1 - alpha_bar) for a v-prediction model, so dominated by
    the noisiest timesteps, where the layout of a sample is decided). The U-Nets see each example's
    text conditioning as the pipeline would (SDXL's added conditions too)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (n,), generator=g)
    lat, text = gather_text(data, idx)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.linspace(50, scheduler.config.num_train_timesteps - 50, n).long()
    noisy = scheduler.add_noise(lat, noise, t)
    # the draws stay on the CPU (the same latents, noise and timesteps on every device); the forwards
    # run where the student is
    dev = next((p_.device for p_ in student.parameters()), lat.device)
    x, tt, text = noisy.to(dev), t.to(dev), to_device(text, dev)
    es = predict(student, x, tt, text).float().cpu()
    et = predict(teacher, x, tt, text).float().cpu()
    err = ((es - et) ** 2).flatten(1).mean(1)  # per latent
    T = scheduler.config.num_train_timesteps
    ab = scheduler.alphas_cumprod[t].double()
    out = {"output_mse": float(err.mean()),
           "latent_stat_shift": float((es.mean() - et.mean()).abs() + (es.std() - et.std()).abs()),
           "x0_mse": float(x0_error(scheduler.config.get("prediction_type", "epsilon"), err.double(), ab).mean())}
    for k, band in (("output_mse_low", t < T / 3), ("output_mse_high", t >= 2 * T / 3)):
        if band.any():  # with fewer than 3 latents a third may hold none
            out[k] = float(err[band].mean())
    return out


def heldout_score(student, pipe, scheduler, s: ProxySettings, held) -> dict[str, float]:
    """The distilled student's output MSE against the teacher on ``s.heldout_latents`` fixed noisy
    latents of held-out images ``held`` (never trained on), timesteps spread over the schedule: no
    sampling, about a second on a CPU. ``heldout_mse`` is the mean, ``heldout_mse_high`` over the
    noisiest third of the timesteps."""
    t0 = time.perf_counter()
    was = student.training
    student.eval()
    try:
        sc = zero_cost_scores(student, pipe.unet, held, scheduler, n=s.heldout_latents, seed=s.seed + 1)
    finally:
        student.train(was)
    out = {"heldout_mse": sc["output_mse"], "heldout_seconds": round(time.perf_counter() - t0, 3)}
    if "output_mse_high" in sc:
        out["heldout_mse_high"] = sc["output_mse_high"]
    return out


def paired_mse(images, reference) -> float:
    """Mean squared difference of paired uint8 images (same prompt, same seed), in [0, 1] units."""
    a, b = np.asarray(images, dtype=np.float64) / 255.0, np.asarray(reference, dtype=np.float64) / 255.0
    if a.shape != b.shape:
        raise HybridSDError(f"paired images differ in shape: {a.shape} vs {b.shape}")
    return float(((a - b) ** 2).mean())
