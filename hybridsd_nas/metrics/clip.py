"""CLIP score and CMMD from a local CLIP model directory (``transformers`` ``CLIPModel`` + tokenizer).

- CLIP score (Hessel et al. 2021): ``100 * max(cos(image, prompt), 0)`` averaged over images.
- CMMD (Jayasumana et al. 2024): the squared maximum mean discrepancy between the CLIP image embeddings
  of two image sets, Gaussian RBF kernel with sigma 10 on L2-normalised embeddings, times 1000 (the
  paper's reference implementation). Unlike FID it is unbiased in the sample count and assumes no
  normal distribution.

Nothing is downloaded: the directory is what ``CLIPModel.save_pretrained`` writes (or a hub snapshot).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.runtime import quiet

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def _projected(features) -> torch.Tensor:
    """The projected embeddings, whether ``get_*_features`` returns them (transformers 4) or an output
    whose ``pooler_output`` holds them (transformers 5)."""
    return (features if torch.is_tensor(features) else features.pooler_output).float()


class ClipModel:
    """A local CLIP model that embeds uint8 images (N, 3, H, W) and prompts."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 64):
        p = Path(path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"CLIP model {str(path)!r} is not a model directory (no config.json); "
                              "give a folder written by CLIPModel.save_pretrained")
        try:
            with quiet():
                self.model = CLIPModel.from_pretrained(p).to(device).eval()
                self.tokenizer = CLIPTokenizer.from_pretrained(p)
        except Exception as e:  # wrong model type, missing tokenizer files
            raise ConfigError(f"{p}: cannot load a CLIP model and tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        pre = p / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(cfg.get("image_mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", OPENAI_STD)).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.device, self.batch_size, self.path = device, batch_size, str(p)

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + self.batch_size])).float().div(255.0)
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(F.normalize(_projected(self.model.get_image_features(pixel_values=x)), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(prompts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(F.normalize(_projected(self.model.get_text_features(**ids)), dim=-1).cpu())
        return torch.cat(out)

    def clip_score(self, images: np.ndarray, prompts: list[str]) -> float:
        """Mean of ``100 * max(cos(image_i, prompt_i), 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return float((100 * cos.clamp(min=0)).mean())


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """Squared MMD with a Gaussian RBF kernel (means over all pairs, diagonals included, as CMMD's reference code)."""
    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma**2)
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    dx, dy = xx.diagonal(), yy.diagonal()
    k_xx = torch.exp(-gamma * (dx[:, None] + dx[None, :] - 2 * xx)).mean()
    k_yy = torch.exp(-gamma * (dy[:, None] + dy[None, :] - 2 * yy)).mean()
    k_xy = torch.exp(-gamma * (dx[:, None] + dy[None, :] - 2 * xy)).mean()
    return float(scale * (k_xx + k_yy - 2 * k_xy))


def cmmd(clip: ClipModel, images: np.ndarray, reference: np.ndarray | torch.Tensor) -> float:
    """CMMD between ``images`` and ``reference`` (uint8 images, or their CLIP image embeddings)."""
    ref = reference if torch.is_tensor(reference) else clip.image_embeddings(reference)
    return mmd(clip.image_embeddings(images), ref)
