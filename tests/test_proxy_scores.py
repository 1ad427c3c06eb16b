"""The cheap scores beside the proxy FID: where the output error is made, and paired samples."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.proxy import paired_mse, zero_cost_scores


class _Data:
    def __len__(self):
        return 8

    def batch(self, idx):
        return torch.zeros(len(idx), 4, 4, 4), torch.zeros(len(idx), 3, 8)


class _Const(torch.nn.Module):
    """A 'U-Net' that predicts ``value`` everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, emb, return_dict=False):
        return (torch.full_like(x, self.value),)


def test_output_error_profile_splits_the_error_by_timestep_and_weights_the_clean_latents_by_noise():
    sched = DDPMScheduler(num_train_timesteps=1000)
    out = zero_cost_scores(_Const(0.5), _Const(0.0), _Data(), sched, n=12)
    assert out["output_mse"] == pytest.approx(0.25)
    assert out["output_mse_low"] == pytest.approx(0.25) and out["output_mse_high"] == pytest.approx(0.25)
    t = torch.linspace(50, 950, 12).long()
    ab = sched.alphas_cumprod[t].double()
    assert out["x0_mse"] == pytest.approx(0.25 * float(((1 - ab) / ab).mean()))
    assert out["x0_mse"] > out["output_mse"]  # the noisy timesteps dominate it

    class _LateError(_Const):  # wrong only at the noisiest timesteps
        def forward(self, x, t, emb, return_dict=False):
            return ((t >= 667).float().view(-1, 1, 1, 1).expand_as(x).clone(),)

    late = zero_cost_scores(_LateError(0.0), _Const(0.0), _Data(), sched, n=12)
    assert late["output_mse_low"] == 0.0 and late["output_mse_high"] == pytest.approx(1.0)
    # too few latents for a third: that band is left out rather than reported as NaN
    one = zero_cost_scores(_Const(0.5), _Const(0.0), _Data(), sched, n=1)  # t = 50 only
    assert "output_mse_high" not in one and one["output_mse_low"] == pytest.approx(0.25)


def test_paired_mse_compares_images_of_the_same_prompt_and_seed():
    a = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    b = np.full((2, 3, 4, 4), 255, dtype=np.uint8)
    assert paired_mse(a, a) == 0.0 and paired_mse(a, b) == pytest.approx(1.0)
    with pytest.raises(HybridSDError, match="differ in shape"):
        paired_mse(a, b[:1])
