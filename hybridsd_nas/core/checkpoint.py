"""Training checkpoints as safetensors + JSON, written atomically: no pickles, and a kill mid-write
leaves the previous checkpoint whole.

A checkpoint is a directory: one ``NAME.safetensors`` per group of tensors (a model's state dict, a
moving average, random-generator states), ``optimizer.safetensors`` for the optimizer's tensors, and
``state.json`` with everything else (step, curves, the optimizer's non-tensor state and param
groups). :func:`save_state` writes it; :func:`load_state` reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybridsd_nas.core.errors import ConfigError

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    osd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        state_meta[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                state_meta[str(pid)][k] = v
    return tensors, {"param_groups": osd["param_groups"], "state_meta": state_meta}


def save_state(ckpt: str | Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
               optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write checkpoint directory ``ckpt``: ``tensors[name]`` to ``name.safetensors``, the optimizer's
    state, and ``meta`` (JSON-serialisable) to ``state.json``. Replaces an existing ``ckpt`` atomically."""
    ckpt = Path(ckpt)
    tmp = ckpt.parent / f".{ckpt.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, group in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_parts(optimizer)
        if opt_tensors:
            save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        meta.update(opt_meta)
    (tmp / STATE_FILE).write_text(json.dumps(meta))
    old = ckpt.parent / f".{ckpt.name}.old-{os.getpid()}"
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_state(ckpt: str | Path, names: list[str], optimizer: torch.optim.Optimizer | None = None,
               optional: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read checkpoint ``ckpt``: the tensor groups ``names`` (those in ``optional`` may be absent) and
    ``state.json``; restores ``optimizer`` in place. Returns ``(tensors, meta)``."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        raise ConfigError(f"{ckpt} is not a checkpoint: it has no {STATE_FILE}")
    meta = json.loads((ckpt / STATE_FILE).read_text())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        f = ckpt / f"{name}.safetensors"
        if f.is_file():
            tensors[name] = load_file(str(f))
        elif name not in optional:
            raise ConfigError(f"checkpoint {ckpt} has no {f.name}")
    if optimizer is not None:
        opt_tensors = load_file(str(ckpt / OPTIMIZER_FILE)) if (ckpt / OPTIMIZER_FILE).is_file() else {}
        state: dict[int, dict[str, Any]] = {int(pid): dict(m) for pid, m in meta.get("state_meta", {}).items()}
        for key, v in opt_tensors.items():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return tensors, meta


def generator_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The states of named random generators, as tensors a checkpoint can hold."""
    return {name: g.get_state() for name, g in generators.items()}


def restore_generators(generators: dict[str, torch.Generator], states: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        g.set_state(states[name])
