"""Prompt adherence: the share of generated images that a classifier trained on real images assigns
to the class their prompt named (the stand-in for CLIP score on a labelled data set).

The classifier is a small CNN trained on the real Fashion-MNIST training images, seen as the
tiny teacher sees them (32x32, padded); its weights are stored as safetensors with a JSON config
(``eval_classifier/`` inside the ``tiny`` zoo directory), never as a pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.zoo import model_path

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class SmallCNN(nn.Module):
    """Three conv stages and a linear head over grey 32x32 images in [0, 1]."""

    def __init__(self, num_classes: int = 10, width: int = 32, resolution: int = 32):
        super().__init__()
        self.num_classes, self.width, self.resolution = num_classes, width, resolution

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(1, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * (resolution // 8) ** 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "width": self.width, "resolution": self.resolution}


def to_classifier_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """RGB or grey uint8 (N, C, H, W) -> grey float (N, 1, H, W) in [0, 1] (channel mean)."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise HybridSDError(f"images must be (N, 1 or 3, H, W) uint8, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise HybridSDError(f"images must be uint8 in [0, 255], got {x.dtype}")
    return x.float().mean(1, keepdim=True) / 255.0


@dataclass
class ClassifierReport:
    test_accuracy: float
    train_seconds: float
    epochs: int
    device: str
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    width: int = 32,
) -> tuple[SmallCNN, ClassifierReport]:
    """Train the classifier on uint8 RGB (N, 3, 32, 32) images; report its accuracy on the test images."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes=int(train_labels.max()) + 1, width=width, resolution=train_images.shape[-1]).to(device)
    x = to_classifier_input(train_images).to(device)
    y = torch.as_tensor(train_labels, dtype=torch.long).to(device)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = x[idx]
            # light augmentation: horizontal flips and shifts of up to 2 px (images are centred in a 32x32 frame)
            flip = torch.rand(len(xb), device=device) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.time() - t0
    model.eval()
    acc = accuracy(model, test_images, test_labels, device=device)
    return model.cpu(), ClassifierReport(acc, train_s, epochs, str(device), seed)


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor | np.ndarray, device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Predicted labels for uint8 (N, C, H, W) images."""
    model = model.to(device).eval()
    x = to_classifier_input(images)
    if x.shape[-1] != model.resolution or x.shape[-2] != model.resolution:
        x = nn.functional.interpolate(x, size=(model.resolution, model.resolution), mode="bilinear", antialias=True)
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(model: SmallCNN, images, labels, device: str = "cpu") -> float:
    """Share of ``images`` whose predicted label equals ``labels``."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise HybridSDError("no images to classify; give at least one image")
    return float((predict(model, images, device=device) == labels).mean())


def prompt_adherence(model: SmallCNN, images, class_indices, device: str = "cpu") -> float:
    """Share of generated ``images`` classified as the class their prompt named."""
    return accuracy(model, images, class_indices, device=device)


def save_classifier(model: SmallCNN, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps({"architecture": "SmallCNN", **model.config(), **(extra or {})}, indent=1))
    return out


def load_classifier(path: str | Path | None = None) -> SmallCNN:
    """Load a classifier directory (safetensors + JSON); by default the one shipped with the ``tiny`` teacher."""

    if path is None:
        path = model_path("tiny") / "eval_classifier"
    p = Path(path)
    if not (p / WEIGHTS_NAME).is_file() or not (p / CONFIG_NAME).is_file():
        raise HybridSDError(f"no classifier in {p}; a classifier directory holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    cfg = json.loads((p / CONFIG_NAME).read_text())
    model = SmallCNN(num_classes=cfg["num_classes"], width=cfg["width"], resolution=cfg["resolution"])
    model.load_state_dict(load_file(str(p / WEIGHTS_NAME)))
    return model.eval()
