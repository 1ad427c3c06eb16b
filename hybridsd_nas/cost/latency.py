"""Latency: measured on a device, and the per-unit tracing a lookup table is built from.

Measurement needs no real weights: the U-Net is built on the meta device, materialised on the
target device with random weights (latency does not depend on their values), and timed with
warm-up, repeats and device synchronisation; the median, the minimum and the spread (10th-90th
percentile) are reported with the device, dtype, resolution and batch.

A U-Net's *units* (conv_in, the time embedding, each ResNet, Transformer, down/upsampler, mid
unit, the output head) are what a lookup table times one by one (:mod:`hybridsd_nas.cost.lut`):
:func:`trace_units` records each unit's call on the meta device, keyed by the unit's structure and
input shapes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.runtime import quiet

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HybridSDError(f"unknown dtype {name!r}; known: float32, float16, bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_device(device: str) -> torch.device:
    d = torch.device(device) if device else torch.device("cpu")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise HybridSDError(f"device {device!r} is not available here (no CUDA); available: cpu")
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise HybridSDError(f"device {device!r} is not available here (no MPS); available: cpu")
    if d.type not in ("cpu", "cuda", "mps"):
        raise HybridSDError(f"unknown device {device!r}; known: cpu, cuda, cuda:N, mps")
    return d


def device_label(device: torch.device) -> str:
    """A human- and file-friendly name of the hardware behind a device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    if device.type == "mps":
        return "apple-mps"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{torch.get_num_threads()}t-" + "".join(c if c.isalnum() else "-" for c in cpu).strip("-")[:40]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    device: str
    dtype: str
    min_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10, dtype: str = "",
            inner: int = 1) -> LatencyStats:
    """Median, minimum and 10th/90th percentile wall time of ``fn`` in ms, synchronising the device.

    With ``inner`` > 1 each sample is ``inner`` back-to-back calls between two synchronisations,
    divided by ``inner``: the time a call takes when queued behind others, as a unit inside a
    U-Net runs on an asynchronous device (no synchronisation latency per call)."""
    with torch.inference_mode():
        t_end = time.perf_counter() + (0.5 if device.type != "cpu" else 0.0)
        n = 0
        while n < warmup or time.perf_counter() < t_end:  # GPUs: also long enough to reach boost clocks
            fn()
            n += 1
            if device.type != "cpu":
                synchronize(device)
        synchronize(device)
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return LatencyStats(statistics.median(times), q[0], q[-1], repeats, warmup, device_label(device), dtype, times[0])


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Give a meta-device module real (random) weights on ``device``."""
    torch.manual_seed(seed)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if hasattr(m, "reset_parameters") and isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
    if dtype != torch.float32:
        with quiet():
            model = model.to(dtype=dtype)
    return model.eval()


def _to_device_inputs(inputs: Any, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> Any:
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point():
            return torch.randn(inputs.shape, generator=g).to(device=device, dtype=dtype)
        return torch.full(inputs.shape, 500, dtype=inputs.dtype, device=device)
    if isinstance(inputs, dict):
        return {k: _to_device_inputs(v, device, dtype, g) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device_inputs(v, device, dtype, g) for v in inputs)
    return inputs


def measure_latency(
    model: nn.Module,
    inputs: dict[str, Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
) -> LatencyStats:
    """Latency of one U-Net forward. ``model`` and ``inputs`` may be on the meta device."""
    dev = check_device(str(device))
    if any(p.is_meta for p in model.parameters()):
        model = materialize(copy.deepcopy(model), dev, dtype, seed)
    else:
        with quiet():
            model = model.to(device=dev, dtype=dtype).eval()
    x = _to_device_inputs(inputs, dev, dtype, torch.Generator().manual_seed(seed))
    return time_fn(lambda: model(**x, return_dict=False), dev, warmup, repeats, dtype_name(dtype))


# --- per-unit lookup table ------------------------------------------------------------------------

_UNIT_PATHS = ("conv_in", "time_embedding", "add_embedding", "conv_norm_out", "conv_out")
_UNIT_LISTS = ("resnets", "attentions", "downsamplers", "upsamplers")


def unit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units a latency table times, in forward order of registration."""
    out: list[tuple[str, nn.Module]] = []
    for name in _UNIT_PATHS[:3]:
        m = getattr(model, name, None)
        if m is not None:
            out.append((name, m))
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    if model.mid_block is not None:
        blocks.append(("mid_block", model.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    for bpath, blk in blocks:
        for lst in _UNIT_LISTS:
            for j, m in enumerate(getattr(blk, lst, None) or []):
                if m is not None and any(True for _ in m.parameters()):
                    out.append((f"{bpath}.{lst}.{j}", m))
    for name in _UNIT_PATHS[3:]:
        m = getattr(model, name, None)
        if m is not None:
            out.append((name, m))
    return out


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"t": list(x.shape), "float": x.is_floating_point(), "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {k: _spec(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_spec(v) for v in x]
    if isinstance(x, (int, float, bool, str)) or x is None:
        return x
    return repr(type(x))


def _from_spec(s: Any, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> Any:
    if isinstance(s, dict) and "t" in s:
        if s["float"]:
            return torch.randn(s["t"], generator=g).to(device=device, dtype=dtype)
        return torch.zeros(s["t"], dtype=getattr(torch, s["dtype"].replace("torch.", "")), device=device)
    if isinstance(s, dict):
        return {k: _from_spec(v, device, dtype, g) for k, v in s.items()}
    if isinstance(s, list):
        return [_from_spec(v, device, dtype, g) for v in s]
    return s


def _structure(m: nn.Module) -> str:
    heads = [getattr(x, "heads", None) for x in m.modules() if hasattr(x, "heads")]
    return f"{type(m).__name__}|{[(n, tuple(p.shape)) for n, p in m.named_parameters()]}|heads={heads}"


@dataclass
class UnitCall:
    path: str
    module: nn.Module
    args: Any
    kwargs: Any
    key: str
    desc: str


def _out_spec(x: Any) -> Any:
    """The shapes of a unit's output, enough to make it again on the meta device (None: not a tensor or a tuple of them)."""
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), x.dtype)
    if isinstance(x, tuple) and all(isinstance(v, torch.Tensor) for v in x):
        return ("tuple", tuple(_out_spec(v) for v in x))
    return None


def _meta_out(spec: Any) -> Any:
    if spec[0] == "t":
        return torch.empty(spec[1], dtype=spec[2], device="meta")
    return tuple(_meta_out(v) for v in spec[1])


def trace_units(model: nn.Module, inputs: dict[str, Any], memo: dict[str, Any] | None = None) -> list[UnitCall]:
    """Run ``model`` (meta) once and record each unit's call: its module, input shapes and key.

    ``memo`` (unit key -> output shapes), shared across calls, makes tracing many candidates of one
    space cheap: a unit whose key was met before is not run again; its output is made on the meta
    device from the recorded shapes (the key fixes the structure and input shapes, hence the output's)."""
    calls: list[UnitCall] = []
    patched = []
    for path, m in unit_modules(model):
        struct = _structure(m)

        def forward(*args, _m=m, _orig=m.forward, _path=path, _struct=struct, **kwargs):
            a, k = _spec(args), _spec(kwargs)
            blob = json.dumps([_struct, a, k], sort_keys=True, default=str)
            key = hashlib.sha1(blob.encode()).hexdigest()[:16]
            shape = next((v["t"] for v in (a if isinstance(a, list) else []) if isinstance(v, dict) and "t" in v), None)
            calls.append(UnitCall(_path, _m, a, k, key, f"{type(_m).__name__} in={shape}"))
            if memo is not None and memo.get(key) is not None:
                return _meta_out(memo[key])
            out = _orig(*args, **kwargs)
            if memo is not None:
                memo[key] = _out_spec(out)
            return out

        patched.append((m, m.__dict__.get("forward")))
        m.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        with torch.inference_mode():
            model(**inputs, return_dict=False)
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own
    return calls
