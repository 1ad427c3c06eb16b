"""Exporting students and loading them back exactly, with no pickle anywhere.

Formats (``hybridsd_nas.json`` in the directory says which):

- ``diffusers``: a candidate a stock config expresses (layer/stage/mid removal, depth, recombination)
  is saved by ``save_pretrained`` as config.json + safetensors; ``UNet2DConditionModel.from_pretrained``
  loads it with no hybridsd_nas import.
- ``hybridsd``: surgery-built or channel-pruned students: config.json (the structure before
  surgery/pruning), safetensors weights, ``prune_record.json`` (the replayable pruning record, when
  pruned) and the candidate; :func:`load_unet` rebuilds the module and loads the weights strictly.

Every export carries its candidate, teacher id, cost figures and the package version. Writes are
atomic: the directory is assembled under a hidden temporary name and renamed into place, so an
interrupted export leaves nothing at the destination that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from hybridsd_nas.arch import Candidate, Plan, describe, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.core.runtime import __version__
from hybridsd_nas.cost import estimate_cost, unet_inputs
from hybridsd_nas.prune import PruneRecord, replay
from hybridsd_nas.sources import load_pretrained_unet, vae_scale_factor

METADATA = "hybridsd_nas.json"
PRUNE_RECORD = "prune_record.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _atomic_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise HybridSDError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1e3)}"
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_unet(
    model: nn.Module,
    p: Plan,
    out: str | Path,
    teacher_id: str,
    cost: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    card: str | None = None,
) -> Path:
    """Save a student built from plan ``p`` to directory ``out`` (atomically); ``card`` is written
    as the directory's README.md (a model card)."""
    out = Path(out)
    record = getattr(model, "hybridsd_prune_record", None)
    fmt = "diffusers" if p.expressible and record is None else "hybridsd"
    tmp = _atomic_dir(out, overwrite)
    try:
        if fmt == "diffusers":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            structure = p.structure_config or p.arch.config
            cfg = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in structure.items() if not k.startswith("_")}}
            cfg["_hybridsd_nas_format"] = "hybridsd: load with hybridsd_nas.load_unet (module surgery or channel pruning)"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
            sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
            if record is not None:
                (tmp / PRUNE_RECORD).write_text(json.dumps(record.to_dict(), indent=1))
        meta = {
            "format": fmt,
            "hybridsd_nas_version": __version__,
            "teacher": teacher_id,
            "candidate": p.candidate.to_dict(),
            "candidate_key": p.candidate.key,
            "base_config": {k: v for k, v in p.arch.config.items() if not k.startswith("_")},
            "build": "diffusers-config" if p.expressible else f"surgery: {p.config_reason}",
            "frozen": list(p.candidate.frozen),
            "params": sum(t.numel() for t in model.parameters()),
            "cost": cost or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=1, default=str))
        if card:
            (tmp / "README.md").write_text(card)
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    f = p / METADATA
    if not p.is_dir():
        raise ConfigError(f"{p} is not a directory holding an exported U-Net")
    if not f.is_file():
        raise ConfigError(f"{p} has no {METADATA}: not a hybridsd_nas export (a plain diffusers U-Net loads with from_pretrained)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON ({e.msg})") from None


def load_unet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load an exported student; its output equals the model that was exported."""
    p = Path(path)
    meta = read_metadata(p)
    cand = Candidate.from_dict(meta["candidate"], source=str(p / METADATA))
    if meta["format"] == "diffusers":
        model = UNet2DConditionModel.from_pretrained(p, use_safetensors=True)
    elif meta["format"] == "hybridsd":
        pl = plan(describe(meta["base_config"]), cand)
        model = build_student(pl, device="meta", prune=False)
        model = model.to_empty(device="cpu")
        rec_file = p / PRUNE_RECORD
        if rec_file.is_file():
            record = PruneRecord.from_dict(json.loads(rec_file.read_text()))
            replay(model, record)
            model.hybridsd_prune_record = record
        weights = p / WEIGHTS
        if not weights.is_file():
            raise ConfigError(f"{p} has no {WEIGHTS}")
        sd = load_file(str(weights))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{weights}: weights do not fit the rebuilt U-Net (missing {missing[:2]}, unexpected {unexpected[:2]})")
    else:
        raise ConfigError(f"{p / METADATA}: unknown format {meta['format']!r}; known: diffusers, hybridsd")
    model.hybridsd_candidate = cand
    model.hybridsd_metadata = meta
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def export_candidate(
    teacher: str,
    candidate: Any,
    out: str | Path,
    base: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    card: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build ``candidate`` with the teacher's weights (layer removal, recombination, channel
    pruning), check its size against the cost engine, and export it. Returns (path, cost).
    ``card`` turns the cost dict into a model card (README.md)."""

    arch = describe(teacher)
    cand = resolve_candidate(candidate, arch)
    p = plan(arch, cand)  # rejects impossible candidates before any weight is read
    t = load_pretrained_unet(teacher, device=device)
    b = load_pretrained_unet(base, device=device) if base else None
    vs = vae_scale_factor(teacher)
    res = int(arch.config.get("sample_size") or 64) * vs
    prune_kwargs = None
    if cand.prune:
        prune_kwargs = {"teacher": t, "example_inputs": unet_inputs(arch.config, res, 2, 77, vs, device=device), "seed": seed}
    student = build_student(p, teacher=t, device=device, base_unet=b, prune_kwargs=prune_kwargs)
    cost = estimate_cost(teacher, cand, arch=arch, resolution=res).to_dict()
    real = sum(x.numel() for x in student.parameters())
    if real != cost["params"]:
        raise HybridSDError(f"built student has {real} params but the cost engine predicted {cost['params']}; please report this candidate")
    extra = dict(extra or {})
    if base:
        extra["base_unet"] = base
    record = getattr(student, "hybridsd_prune_record", None)
    if record is not None and hasattr(record, "summary"):
        extra["pruning"] = record.summary()
    path = export_unet(student, p, out, teacher_id=str(teacher), cost=cost, extra=extra, overwrite=overwrite,
                       card=card(cost) if card else None)
    cost["format"] = "diffusers" if p.expressible and record is None else "hybridsd"
    return path, cost
