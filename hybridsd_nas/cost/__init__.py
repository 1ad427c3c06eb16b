"""The cost engine: params, MACs (two conventions) and latency of any candidate, weight-free."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..arch import Candidate, UNetArch, build_student, describe, plan, resolve_candidate
from .inputs import latent_size, unet_inputs
from .latency import LatencyStats, LatencyTable, check_device, measure_latency, parse_dtype
from .macs import MacCount, count_macs

__all__ = [
    "LatencyStats",
    "LatencyTable",
    "MacCount",
    "count_macs",
    "estimate_cost",
    "measure_latency",
    "unet_inputs",
    "vae_scale_of",
]

LATENCY_MODES = ("off", "measure", "lut")


def vae_scale_of(spec: Any, default: int = 8) -> int:
    """The VAE's spatial scale factor of a pipeline directory or zoo model (8 for SD), else ``default``."""
    if not isinstance(spec, (str, Path)):
        return default
    from ..arch.config import _zoo_path

    path = _zoo_path(str(spec)) or Path(str(spec))
    vae_cfg = path / "vae" / "config.json"
    if vae_cfg.is_file():
        boc = json.loads(vae_cfg.read_text()).get("block_out_channels", [0, 0, 0, 0])
        return 2 ** (len(boc) - 1)
    return default


def estimate_cost(
    unet: Any,
    candidate: Any = None,
    resolution: int | None = None,
    batch: int = 1,
    text_len: int = 77,
    vae_scale: int | None = None,
    latency: str = "off",
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    by_block: bool = False,
    lut: LatencyTable | str | Path | None = None,
    repeats: int = 10,
    arch: UNetArch | None = None,
) -> dict[str, Any]:
    """Cost of ``candidate`` on base ``unet``: params, MACs, and latency when asked.

    ``resolution`` is in pixels (default: the config's ``sample_size`` x VAE scale); MACs are for
    one forward of ``batch`` latents with ``text_len`` text tokens.
    """
    if latency not in LATENCY_MODES:
        from ..errors import HybridSDError

        raise HybridSDError(f"unknown latency mode {latency!r}; known: {', '.join(LATENCY_MODES)}")
    t0 = time.perf_counter()
    arch = arch or describe(unet)
    cand = resolve_candidate(candidate, arch)
    p = plan(arch, cand)
    vs = vae_scale or vae_scale_of(unet)
    res = resolution or int(arch.config.get("sample_size") or 64) * vs
    latent_size(res, vs)
    model = build_student(p)  # meta device
    inputs = unet_inputs(model.config if p.expressible else arch.config, res, batch, text_len, vs)
    names = {bp.student_path: bp.name for bp in p.down + p.up}
    mc = count_macs(model, inputs, names)
    out: dict[str, Any] = {
        "unet": arch.source,
        "candidate": cand.to_dict(),
        "candidate_key": cand.key,
        "build": "diffusers-config" if p.expressible else "surgery",
        "params": mc.params,
        "macs": mc.macs,
        "macs_conv_linear": mc.macs_conv_linear,
        **mc.as_dict(),
        "measured": {"resolution": res, "latent": res // vs, "batch": batch, "text_tokens": text_len,
                     "method": "FlopCounterMode + module hooks on the meta device (no weights)"},
    }
    if not p.expressible:
        out["surgery_reason"] = p.config_reason
    if by_block:
        out["by_block"] = mc.by_block
    out["count_seconds"] = round(time.perf_counter() - t0, 4)
    if latency != "off":
        dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        dev = check_device(device)
        dt = dt or (torch.float16 if dev.type == "cuda" else torch.float32)
        if latency == "measure":
            st = measure_latency(model, inputs, dev, dt, repeats=repeats)
            out["latency_ms"] = st.median_ms
            out["latency"] = {**st.as_dict(), "method": "measured", "resolution": res, "batch": batch}
        else:
            table = lut if isinstance(lut, LatencyTable) else LatencyTable(str(dev), dt, res, batch, path=lut)
            blob = json.dumps({k: v for k, v in arch.config.items() if not k.startswith("_")}, sort_keys=True, default=str)
            base_key = f"{arch.source}:{hashlib.sha1(blob.encode()).hexdigest()[:12]}"
            pred = table.predict(model, inputs, base_key, base_model=lambda: build_student(plan(arch, Candidate())))
            out["latency_ms"] = pred["latency_ms"]
            out["latency"] = {**pred, "method": "lookup table"}
    return out
