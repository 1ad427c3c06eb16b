"""Text prompts built from class names with a few templates."""

from __future__ import annotations

import numpy as np

from hybridsd_nas.data.fashion_mnist import CLASS_NAMES

# "{}" is the class name; "{a}" its indefinite article.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {}",
    "{a} {}",
    "a black and white photo of {a} {}",
    "a picture of {a} {}",
    "a product photo of {a} {}",
)


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def class_prompt(name: str, template: int = 0) -> str:
    """The prompt for one class name with template number ``template``."""
    t = PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)]
    return t.replace("{a}", _article(name)).format(name)


def prompt_for_label(label: int, rng: np.random.Generator | None = None, template: int | None = None) -> str:
    """A prompt for a Fashion-MNIST label: a random template from ``rng``, or template number ``template``."""
    if template is None:
        template = int(rng.integers(len(PROMPT_TEMPLATES))) if rng is not None else 0
    return class_prompt(CLASS_NAMES[int(label)], template)


def eval_prompts(per_class: int = 2) -> list[dict]:
    """Evaluation prompts: ``per_class`` templates for every class, as ``{"prompt", "class_index"}``."""
    return [
        {"prompt": class_prompt(name, t), "class_index": i}
        for i, name in enumerate(CLASS_NAMES)
        for t in range(per_class)
    ]
