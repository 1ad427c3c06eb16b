"""The proxy's settings. Why the defaults are what they are: ``docs/decisions/0001-proxy-ranking-score.md``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hybridsd_nas.distill import LossWeights


@dataclass
class ProxySettings:
    distill_steps: int = 40
    batch_size: int = 16
    lr: float = 5e-4
    lr_schedule: str = "constant"  # one of hybridsd_nas.distill.LR_SCHEDULES; multi-fidelity rungs need a length-free one
    lr_warmup_steps: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    data: str | None = None  # training data spec (hybridsd_nas.data); default: the teacher's own (Fashion-MNIST for tiny)
    data_images: int = 4096  # Fashion-MNIST images encoded for the distillation (cached); other sources: ?limit=
    samples: int = 32
    sampler_steps: int | None = None  # default: the teacher's sampling.json, else 20
    guidance: float | None = None  # default: the teacher's sampling.json, else 5.0
    seed: int = 0
    kid_subset: int = 50
    reference_images: int = 1000  # the first N real reference images, where the evaluation set names them
    eval_prompts: str | None = None  # a prompt file (.txt, .jsonl, .json); default: the teacher's own evaluation set
    classifier: str | None = None  # an adherence classifier directory for eval_prompts' labels
    clip_model: str | None = None  # a local CLIP model directory: CLIP score and CMMD
    heldout_latents: int = 64  # fixed held-out noisy latents of ``heldout_mse`` (test-split images, no sampling)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = self.weights.as_dict()
        return d
