"""Params and MACs of a U-Net without weights and without a real forward.

The model is built on the meta device and run once under ``torch.utils.flop_counter.FlopCounterMode``
(which counts matrix products, convolutions and attention from shapes alone) with forward hooks on
the convolution, linear and normalisation modules. Two conventions are reported:

- ``macs``: every multiply-accumulate of a matrix product: convolutions, linear layers, and the
  attention matrix products QK^T and AV (FLOPs / 2, biases and element-wise ops not counted).
- ``macs_conv_linear``: the convention of thop and of BK-SDM's published tables: convolutions and
  linear layers only (thop's per-output-element rule, no bias), plus what thop adds for affine
  ``nn.LayerNorm`` (4 per element; on SD-v1 at 512 px that is 0.14 G of 338.7 G). It equals the
  integer ``thop.profile`` returns for a diffusers U-Net.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_THOP_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d)


@dataclass
class MacCount:
    params: int
    macs: int
    macs_conv_linear: int
    conv: int
    linear: int
    attention_matmul: int
    norm_thop: int
    by_block: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "macs_conv_linear": self.macs_conv_linear,
            "breakdown": {
                "conv": self.conv,
                "linear": self.linear,
                "attention_matmul": self.attention_matmul,
                "layernorm_thop": self.norm_thop,
            },
        }


def _group(path: str, names: dict[str, str]) -> str:
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        p = f"{parts[0]}.{parts[1]}"
        return names.get(p, p)
    if parts[0] == "mid_block":
        return "mid"
    if parts[0] in ("conv_in",):
        return "conv_in"
    if parts[0] in ("conv_norm_out", "conv_act", "conv_out"):
        return "out"
    return "embed" if parts[0] else "other"


def count_macs(model: nn.Module, inputs: dict[str, Any], block_names: dict[str, str] | None = None) -> MacCount:
    """Count params and MACs of ``model`` on ``inputs`` (both best on the meta device)."""
    names = block_names or {}
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    hooks = []

    def conv_hook(name: str):
        def h(m: nn.Module, args, out) -> None:
            k = int(torch.tensor(m.weight.shape[2:]).prod().item()) if m.weight.dim() > 2 else 1
            per[_group(name, names)]["conv"] += out.numel() * (m.in_channels // m.groups) * k

        return h

    def linear_hook(name: str):
        def h(m: nn.Module, args, out) -> None:
            per[_group(name, names)]["linear"] += out.numel() * m.in_features

        return h

    def norm_hook(name: str):
        def h(m: nn.Module, args, out) -> None:
            affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
            per[_group(name, names)]["norm_thop"] += 2 * args[0].numel() * (2 if affine else 1)

        return h

    for name, m in model.named_modules():
        if type(m) in _CONV:  # thop matches the exact class; so do we
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif type(m) is nn.Linear:
            hooks.append(m.register_forward_hook(linear_hook(name)))
        elif type(m) in _THOP_NORMS:
            hooks.append(m.register_forward_hook(norm_hook(name)))
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, depth=None) as fc:
            model(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    counts = fc.get_flop_counts()
    root = next(k for k in counts if k != "Global" and "." not in k) if len(counts) > 1 else None
    for key, ops in counts.items():
        if key == "Global" or key == root or root is None:
            continue
        path = key[len(root) + 1 :]
        if path.count(".") > (1 if path.startswith(("down_blocks", "up_blocks")) else 0):
            continue  # only the block-level entries; they include their children
        if path.startswith(("down_blocks", "up_blocks", "mid_block")) or "." not in path:
            per[_group(path, names)]["flops"] += sum(ops.values())
    total = fc.get_total_flops() // 2
    for g in per.values():
        g["macs"] = g.pop("flops", 0) // 2
        g["attention_matmul"] = g["macs"] - g["conv"] - g["linear"]
        g["macs_conv_linear"] = g["conv"] + g["linear"] + g["norm_thop"]
    conv = sum(g["conv"] for g in per.values())
    linear = sum(g["linear"] for g in per.values())
    norm = sum(g["norm_thop"] for g in per.values())
    params_by: dict[str, int] = defaultdict(int)
    for pname, p in model.named_parameters():
        params_by[_group(pname.rsplit(".", 1)[0], names)] += p.numel()
    by_block = {}
    for g in sorted(set(per) | set(params_by), key=_block_order):
        d = dict(per.get(g, {}))
        d["params"] = params_by.get(g, 0)
        by_block[g] = {k: int(d.get(k, 0)) for k in ("params", "macs", "macs_conv_linear", "attention_matmul")}
    return MacCount(
        params=sum(p.numel() for p in model.parameters()),
        macs=int(total),
        macs_conv_linear=int(conv + linear + norm),
        conv=int(conv),
        linear=int(linear),
        attention_matmul=int(total - conv - linear),
        norm_thop=int(norm),
        by_block=by_block,
    )


def _block_order(name: str) -> tuple:
    order = {"embed": 0, "conv_in": 1, "down": 2, "mid": 3, "up": 4, "out": 5}
    for k, v in order.items():
        if name.startswith(k):
            digits = "".join(c for c in name if c.isdigit())
            return (v, int(digits) if digits else 0)
    return (9, 0)
