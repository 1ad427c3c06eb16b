"""Real image sets that install offline, and the prompts built from their class names."""

from hybridsd_nas.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DIR,
    ENV_DIR,
    DatasetMissingError,
    FashionMNIST,
    load_fashion_mnist,
    to_rgb_uint8,
)
from hybridsd_nas.data.prompts import PROMPT_TEMPLATES, class_prompt, eval_prompts, prompt_for_label

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DIR",
    "ENV_DIR",
    "DatasetMissingError",
    "FashionMNIST",
    "PROMPT_TEMPLATES",
    "class_prompt",
    "eval_prompts",
    "load_fashion_mnist",
    "prompt_for_label",
    "to_rgb_uint8",
]
