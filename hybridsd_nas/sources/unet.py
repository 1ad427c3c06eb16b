"""Reading U-Net configs and weights from wherever users keep them.

A *U-Net spec* is any of: a preset name (``sd-v1``), a name of the embedded model zoo (``tiny``),
a config dict, a ``config.json`` path, a U-Net directory (``config.json`` inside), a pipeline
directory (``unet/config.json`` inside), or a Hugging Face hub id (``org/name``, with
``unet/config.json`` or ``config.json`` in the repository). Hub access is real code through
``huggingface_hub``; without a network it fails with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, snapshot_download

from hybridsd_nas import zoo
from hybridsd_nas.core.errors import ConfigError, UnknownNameError
from hybridsd_nas.sources.presets import UNET_PRESETS, unet_preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# What a pipeline needs from a hub repository: configs, tokenizer files and the components' safetensors
# (not the single-file checkpoints at the root, pickles, ONNX or half-precision duplicates).
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.bin", "*.ckpt", "*.msgpack", "*.onnx*", "*.pt"]


def hub_snapshot(repo_id: str) -> Path:
    """The local directory of a hub pipeline: its snapshot in the Hugging Face cache when there is one
    (no network needed), else downloaded there (safetensors and JSON only). A one-line
    :class:`ConfigError` when neither works."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and its relatives): try the network below
        pass
    cache = hub_constants.HF_HUB_CACHE
    if hub_constants.HF_HUB_OFFLINE:
        raise ConfigError(f"hub id {repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                          f"run `hf download {repo_id}` where there is a network, or give a local pipeline directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))
    except Exception as e:  # no network, unknown or gated repository
        raise ConfigError(f"hub id {repo_id!r} is not in the local Hugging Face cache ({cache}) and cannot be downloaded "
                          f"({type(e).__name__}); give a local pipeline directory") from None


def zoo_path(name: str) -> Path | None:
    """The directory of an embedded model, or None where ``name`` names none."""
    return zoo.model_path(name) if zoo.is_zoo_name(name) else None


def known_names() -> list[str]:
    """Every name a U-Net spec may take without a path: config presets and embedded models."""
    return list(UNET_PRESETS.names()) + zoo.list_models()


def resolve_unet_dir(spec: str | Path) -> tuple[Path, str | None]:
    """(directory, subfolder) holding a U-Net's ``config.json`` for a local spec."""
    p = Path(spec)
    if p.is_file():
        return p.parent, None
    if (p / "unet" / "config.json").is_file():
        return p, "unet"
    if (p / "config.json").is_file():
        return p, None
    raise ConfigError(
        f"{str(spec)!r} holds no U-Net config: expected {p / 'config.json'} or {p / 'unet' / 'config.json'}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a U-Net config must be a JSON object, got {type(data).__name__}")
    return data


def _hub_config(repo_id: str) -> dict[str, Any]:
    last: Exception | None = None
    for filename in ("unet/config.json", "config.json"):
        try:
            return _read_json(Path(hf_hub_download(repo_id, filename)))
        except ConfigError:
            raise
        except Exception as e:  # network, missing file, gated repo: try the next layout
            last = e
    raise ConfigError(
        f"cannot fetch a U-Net config for hub id {repo_id!r} ({type(last).__name__}); "
        f"give a local directory, a config.json, or one of: {', '.join(known_names())}"
    )


def load_unet_config(spec: "str | Path | Mapping[str, Any]") -> tuple[dict[str, Any], str]:
    """The diffusers config of a U-Net spec, and a short id naming where it came from."""
    if isinstance(spec, Mapping):
        return validate_config(dict(spec), "<dict>"), "<dict>"
    s = str(spec)
    if s in UNET_PRESETS:
        return unet_preset(s), s
    zoo_dir = zoo_path(s)
    if zoo_dir is not None:
        d, sub = resolve_unet_dir(zoo_dir)
        return validate_config(_read_json(d / (sub or "") / "config.json"), s), s
    p = Path(s)
    if p.exists():
        if p.is_file():
            return validate_config(_read_json(p), s), str(p)
        d, sub = resolve_unet_dir(p)
        return validate_config(_read_json(d / (sub or "") / "config.json"), s), str(p)
    if HUB_ID.match(s) and not s.endswith(".json"):
        return validate_config(_hub_config(s), s), s
    raise UnknownNameError("U-Net (preset, zoo name, path or hub id)", s, known_names())


_SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
_SUPPORTED_MID = {"UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None}


def validate_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the fields the architecture model relies on; raise a one-line ConfigError."""
    cls = cfg.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ConfigError(f"{source}: _class_name is {cls!r}; only UNet2DConditionModel configs are supported")
    down = cfg.get("down_block_types", UNET_PRESETS["sd-v1"]["down_block_types"])
    up = cfg.get("up_block_types", UNET_PRESETS["sd-v1"]["up_block_types"])
    boc = cfg.get("block_out_channels", UNET_PRESETS["sd-v1"]["block_out_channels"])
    for key, val in (("down_block_types", down), ("up_block_types", up), ("block_out_channels", boc)):
        if not isinstance(val, (list, tuple)) or not val:
            raise ConfigError(f"{source}: {key} must be a non-empty list, got {val!r}")
    if not (len(down) == len(up) == len(boc)):
        raise ConfigError(
            f"{source}: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
            f"block_out_channels ({len(boc)}) must have the same length"
        )
    for key, types, ok in (("down_block_types", down, _SUPPORTED_DOWN), ("up_block_types", up, _SUPPORTED_UP)):
        for t in types:
            if t not in ok:
                raise ConfigError(f"{source}: {key} has {t!r}; supported: {', '.join(sorted(ok))}")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _SUPPORTED_MID:
        raise ConfigError(
            f"{source}: mid_block_type {mid!r} is not supported; supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null"
        )
    if not all(isinstance(c, int) and c > 0 for c in boc):
        raise ConfigError(f"{source}: block_out_channels must be positive integers, got {boc!r}")
    return cfg


def load_pretrained_unet(spec: "str | Path", device: str = "cpu", dtype=None):
    """Load a U-Net with its weights (safetensors) from a local directory, zoo name or hub id."""
    s = str(spec)
    zoo_dir = zoo_path(s)
    target: str | Path = zoo_dir if zoo_dir is not None else s
    if Path(target).exists():
        d, sub = resolve_unet_dir(target)
        kwargs: dict[str, Any] = {"subfolder": sub} if sub else {}
        try:
            model = UNet2DConditionModel.from_pretrained(d, use_safetensors=True, **kwargs)
        except (OSError, EnvironmentError) as e:
            raise ConfigError(f"{d}: cannot load U-Net weights ({str(e).splitlines()[0]})") from None
    elif s in UNET_PRESETS:
        raise ConfigError(f"{s!r} is a config preset with no weights; give a model directory, zoo name or hub id")
    elif HUB_ID.match(s):
        try:
            model = UNet2DConditionModel.from_pretrained(s, subfolder="unet", use_safetensors=True)
        except Exception as e:
            raise ConfigError(
                f"cannot load U-Net weights for hub id {s!r} ({type(e).__name__}); give a local model directory"
            ) from None
    else:
        raise UnknownNameError("model (zoo name, directory or hub id)", s, known_names())
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
