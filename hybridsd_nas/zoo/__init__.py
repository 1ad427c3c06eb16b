"""The embedded model zoo: small, complete pipelines shipped inside the package.

``tiny`` is a StableDiffusionPipeline trained on Fashion-MNIST (see ``tiny/README.md``) with the
SD-1.x U-Net topology; it loads with stock ``StableDiffusionPipeline.from_pretrained`` and needs
no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridsd_nas.core.errors import UnknownNameError

_ROOT = Path(__file__).resolve().parent

# name -> (directory inside this package, one-line description)
_MODELS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny", "SD-1.x topology, 32x32 px (16x16 latent), trained on Fashion-MNIST; runs on a CPU"),
}


def list_models() -> list[str]:
    """Names of the embedded pipelines, sorted."""
    return sorted(_MODELS)


def is_zoo_name(name: object) -> bool:
    """Whether ``name`` names an embedded pipeline."""
    return isinstance(name, str) and name in _MODELS


def model_path(name: str) -> Path:
    """The pipeline directory of an embedded model (loadable with ``StableDiffusionPipeline.from_pretrained``)."""
    if not is_zoo_name(name):
        raise UnknownNameError("model", str(name), list_models())
    return _ROOT / _MODELS[name][0]


def model_info(name: str) -> dict[str, Any]:
    """Name, path, description, whether the weights are present, and the default sampling settings."""
    p = model_path(name)
    info: dict[str, Any] = {"name": name, "path": str(p), "description": _MODELS[name][1],
                            "installed": (p / "model_index.json").is_file()}
    card = p / "sampling.json"
    if card.is_file():
        info["sampling"] = json.loads(card.read_text())
    return info


def eval_prompts(name: str) -> list[dict[str, Any]]:
    """The evaluation prompts shipped with an embedded model: ``[{"prompt": str, "class_index": int}, ...]``."""
    p = model_path(name) / "eval_prompts.json"
    if not p.is_file():
        raise UnknownNameError("model with eval prompts", name, [m for m in list_models() if (model_path(m) / "eval_prompts.json").is_file()])
    return json.loads(p.read_text())


__all__ = ["eval_prompts", "is_zoo_name", "list_models", "model_info", "model_path"]
