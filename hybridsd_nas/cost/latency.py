"""Latency: measured on a device, and predicted from a per-unit lookup table.

Measurement needs no real weights: the U-Net is built on the meta device, materialised on the
target device with random weights (latency does not depend on their values), and timed with
warm-up, repeats and device synchronisation; the median and the spread (10th-90th percentile)
are reported with the device, dtype, resolution and batch.

The lookup table (:class:`LatencyTable`) times every *unit* of a U-Net once (conv_in, the time
embedding, each ResNet, Transformer, down/upsampler, mid unit, the output head), standalone, on the
shapes it sees inside the model, keyed by the unit's structure and input shapes. A candidate's
predicted latency is the sum of its units plus a fixed overhead (skip concatenations, block glue,
Python dispatch) measured once on the base U-Net as full-model latency minus the sum of its
units. The table is a JSON file under the cache directory, one per device, dtype, resolution
and batch, and grows as new unit shapes are met.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.paths import cache_dir
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10, dtype: str = "",
            inner: int = 1) -> LatencyStats:
    """Median and 10th/90th percentile wall time of ``fn`` in ms, synchronising the device.

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
    return LatencyStats(statistics.median(times), q[0], q[-1], repeats, warmup, device_label(device), dtype)


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


def trace_units(model: nn.Module, inputs: dict[str, Any]) -> list[UnitCall]:
    """Run ``model`` (meta) once and record each unit's call: its module, input shapes and key."""
    calls: list[UnitCall] = []
    hooks = []
    for path, m in unit_modules(model):
        def hook(mod, args, kwargs, path=path):
            a, k = _spec(args), _spec(kwargs)
            blob = json.dumps([_structure(mod), a, k], sort_keys=True, default=str)
            key = hashlib.sha1(blob.encode()).hexdigest()[:16]
            shape = next((v["t"] for v in (a if isinstance(a, list) else []) if isinstance(v, dict) and "t" in v), None)
            calls.append(UnitCall(path, mod, a, k, key, f"{type(mod).__name__} in={shape}"))
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return calls


class LatencyTable:
    """Per-unit latency lookup table for one device, dtype, resolution and batch."""

    VERSION = 1

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, resolution: int = 512,
                 batch: int = 1, path: str | Path | None = None, warmup: int = 2, repeats: int = 5):
        self.device = check_device(device)
        self.dtype = dtype
        self.resolution, self.batch = resolution, batch
        self.warmup, self.repeats = warmup, repeats
        label = device_label(self.device)
        self.path = Path(path) if path else cache_dir() / "lut" / f"{label}-{dtype_name(dtype)}-{resolution}px-b{batch}.json"
        self.meta = {"version": self.VERSION, "device": label, "dtype": dtype_name(dtype), "resolution": resolution,
                     "batch": batch, "torch": torch.__version__, "warmup": warmup, "repeats": repeats}
        self.units: dict[str, dict[str, Any]] = {}
        self.overhead: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise HybridSDError(f"latency table {self.path} is unreadable ({e}); delete it to rebuild") from None
        if data.get("meta", {}).get("version") != self.VERSION:
            return  # an older format: rebuilt as units are met
        self.units = data.get("units", {})
        self.overhead = data.get("overhead", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "units": self.units, "overhead": self.overhead}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def _time_unit(self, call: UnitCall) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        mod = materialize(copy.deepcopy(call.module), self.device, self.dtype)
        args = _from_spec(call.args, self.device, self.dtype, g)
        kwargs = _from_spec(call.kwargs, self.device, self.dtype, g)
        inner = 1 if self.device.type == "cpu" else 5  # queued like inside the model on async devices
        st = time_fn(lambda: mod(*args, **kwargs), self.device, self.warmup, self.repeats, dtype_name(self.dtype), inner)
        return {"ms": st.median_ms, "p10": st.p10_ms, "p90": st.p90_ms, "desc": call.desc}

    def unit_latencies(self, model: nn.Module, inputs: dict[str, Any], progress: bool = False) -> list[tuple[UnitCall, float]]:
        calls = trace_units(model, inputs)
        missing = {c.key: c for c in calls if c.key not in self.units}
        if missing:
            for key, c in tqdm(missing.items(), desc="timing units", disable=not progress, leave=False):
                self.units[key] = self._time_unit(c)
            self.save()
        return [(c, self.units[c.key]["ms"]) for c in calls]

    def calibrate(self, base_key: str, model: nn.Module, inputs: dict[str, Any], repeats: int | None = None) -> float:
        """Measure the base U-Net and store its overhead (full latency - sum of units)."""
        units = sum(ms for _, ms in self.unit_latencies(model, inputs))
        st = measure_latency(model, inputs, self.device, self.dtype, self.warmup, repeats or self.repeats)
        self.overhead[base_key] = {"ms": st.median_ms - units, "measured_ms": st.median_ms, "units_ms": units}
        self.save()
        return self.overhead[base_key]["ms"]

    def predict(self, model: nn.Module, inputs: dict[str, Any], base_key: str, base_model: Callable[[], nn.Module] | None = None,
                progress: bool = False) -> dict[str, Any]:
        """Predicted latency of ``model`` (meta) in ms: sum of its units + the base's overhead."""
        if base_key not in self.overhead:
            if base_model is None:
                raise HybridSDError(f"latency table {self.path} has no overhead for base {base_key}; calibrate it first")
            self.calibrate(base_key, base_model(), inputs)
        units = self.unit_latencies(model, inputs, progress=progress)
        total_units = sum(ms for _, ms in units)
        over = self.overhead[base_key]["ms"]
        return {"latency_ms": total_units + over, "units_ms": total_units, "overhead_ms": over, "n_units": len(units),
                "table": str(self.path), **{k: self.meta[k] for k in ("device", "dtype", "resolution", "batch")}}
