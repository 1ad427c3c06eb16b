"""Per-unit latency lookup tables: built once on the target device, used anywhere.

A table times every *unit* a U-Net's candidates need (conv_in, the time embedding, each ResNet,
Transformer, down/upsampler, mid unit, the output head), standalone on the device, on the shapes it
sees inside the model, keyed by the unit's structure and input shapes (:func:`trace_units`). A
candidate's predicted latency is the sum of its units plus a fixed overhead (skip concatenations,
block glue, Python dispatch) measured once on the teacher as its whole forward minus the sum of its
units.

A table is a JSON file that records what it was measured on and how (device, torch and diffusers
versions, dtype, resolution, batch, timing mode, repeats, statistic, build date and id). Predicting
from it needs neither the device nor the timing code: a table built on a GPU is read on a laptop.

Building is safe with many workers: it happens under a file lock, and a worker that finds the lock
taken waits, then reads what the other one wrote; units are timed with the minimum over repeats
(re-measured while their spread is wide), and the teacher's units are checked against its measured
whole forward before anything is written.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import filelock
import torch
from torch import nn
from tqdm.auto import tqdm

from hybridsd_nas.arch import Candidate, UNetArch, describe, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import ConfigError, UnreliableMeasurementError
from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.core.runtime import __version__
from hybridsd_nas.cost.inputs import latent_size, unet_inputs
from hybridsd_nas.cost.latency import (
    UnitCall,
    _from_spec,
    _to_device_inputs,
    check_device,
    device_label,
    dtype_name,
    materialize,
    parse_dtype,
    time_fn,
    trace_units,
)
from hybridsd_nas.sources import vae_scale_factor

log = logging.getLogger(__name__)

# The statistic a table keeps per unit and for the whole forward: the minimum over repeats. Another
# process on the machine (a worker loading a model, a training job) only ever adds time to a sample,
# so the fastest sample is the one least touched by load; a median or a trimmed mean still moves
# with load that lasts through the repeats (a teacher timed at 164 ms under load against 19 ms alone).
STATISTIC = "min"
WARMUP = 3
REPEATS = 20  # cheap: a unit takes milliseconds; more samples, more chances of a quiet one
# A unit whose 90th percentile exceeds its 10th by this factor was timed while the machine was busy:
# it is measured again, at most MAX_REMEASURE more times; its figure is the minimum over every try.
SPREAD_LIMIT = 1.5
MAX_REMEASURE = 2
# The teacher's units summed and its whole forward measured must agree within this factor (whole
# over units, or units over whole). They agree within about 10%: SD-1.x in results/lut (whole over
# units 1.05 on a CPU, 0.92 on an H100), the tiny U-Net at 32 px with the minimum on a 2-core CPU
# shared with a training job. Further apart than 2x, one of the two was timed under other load (a
# teacher timed at 164 ms under load against 19 ms alone): the table is rebuilt once, then refused.
SANITY_RATIO = 2.0
LOCK_TIMEOUT = 4 * 3600.0  # seconds a worker waits for another one's build; a dead builder's lock is freed by the OS
TIMING_MODE = "eager"  # a plain forward per call (no torch.compile, no CUDA graphs): what tables without ``timing`` used
# How a unit (and a whole forward) is run while timed: the way the model will run on the device.
TIMING_MODES = {
    "eager": "a plain forward per call",
    "compile": "torch.compile'd (inductor, static shapes); compilation happens during the warm-up, outside the timing",
    "cuda-graph": "captured once in a CUDA graph and replayed (CUDA only): no per-kernel launch cost, as a graphed "
                  "deployment runs",
}


def default_timing(device: torch.device) -> str:
    """CUDA graphs on CUDA (batch-1 forwards there are bound by kernel launches, which a graph removes); eager elsewhere."""
    return "cuda-graph" if device.type == "cuda" else "eager"


def check_timing(timing: str, device: torch.device) -> str:
    if timing not in TIMING_MODES:
        raise ConfigError(f"unknown timing mode {timing!r}; valid: {', '.join(TIMING_MODES)}")
    if timing == "cuda-graph" and device.type != "cuda":
        raise ConfigError(f"timing mode cuda-graph needs a CUDA device, not {device}; use eager or compile")
    return timing


def runner(module: Callable[..., Any], args: Any, kwargs: dict[str, Any], timing: str) -> Callable[[], Any]:
    """A call of ``module(*args, **kwargs)`` without arguments, run the way ``timing`` says (:data:`TIMING_MODES`)."""
    if timing == "eager":
        return lambda: module(*args, **kwargs)
    if timing == "compile":
        compiled = torch.compile(module, dynamic=False)
        return lambda: compiled(*args, **kwargs)
    # CUDA graph: warm up on a side stream (allocations settle), capture one call on these static inputs, replay it
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                module(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(*args, **kwargs)

    def replay() -> Any:
        graph.replay()
        return static_out  # the graph writes its output where the capture allocated it

    return replay
_WARNED: set[str] = set()


class MissingUnitsError(ConfigError):
    """A table that lacks unit shapes a candidate needs; ``keys`` names them."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def base_key(arch: UNetArch) -> str:
    """The key of a teacher's overhead in a table: its source and a hash of its config."""
    blob = json.dumps({k: v for k, v in arch.config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return f"{arch.source}:{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def default_resolution(unet: Any, arch: UNetArch | None = None) -> int:
    """The resolution in pixels a U-Net is costed at by default: its config's ``sample_size`` x VAE scale."""
    arch = arch or describe(unet)
    return int(arch.config.get("sample_size") or 64) * vae_scale_factor(unet)


def table_path(device: torch.device, dtype: torch.dtype, resolution: int, batch: int, timing: str = TIMING_MODE) -> Path:
    """Where this machine keeps its table for ``device`` by default (the cache)."""
    mode = "" if timing == TIMING_MODE else f"-{timing}"
    return cache_dir("lut") / f"{device_label(device)}-{dtype_name(dtype)}-{resolution}px-b{batch}{mode}.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class BaseForward:
    """The teacher of a table: its overhead key, its meta-device model and inputs, and its unit calls."""

    key: str
    model: nn.Module
    inputs: dict[str, Any]
    calls: list[UnitCall]


class LatencyTable:
    """Per-unit latency lookup table for one device, dtype, resolution and batch.

    ``LatencyTable(device, ...)`` is a table measured here, on ``device`` (which must be present):
    unit shapes it lacks are timed and added (under the file lock). :meth:`open` reads a table built
    elsewhere as it is, with no device: a unit shape it lacks is a :class:`MissingUnitsError`.
    """

    VERSION = 2

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, resolution: int = 512,
                 batch: int = 1, path: str | Path | None = None, warmup: int = WARMUP, repeats: int = REPEATS,
                 load: bool = True, timing: str | None = None):
        self.device: torch.device | None = check_device(device)
        self.portable = False
        self.dtype = dtype
        self.resolution, self.batch = resolution, batch
        self.warmup, self.repeats = warmup, repeats
        self.timing = check_timing(timing or default_timing(self.device), self.device)
        self.inner = 1 if self.device.type == "cpu" else 5  # queued like inside the model on async devices
        self.path = Path(path) if path else table_path(self.device, dtype, resolution, batch, self.timing)
        self.meta = self._fresh_meta(device_label(self.device))
        self.units: dict[str, dict[str, Any]] = {}
        self.overhead: dict[str, dict[str, Any]] = {}
        self.components: dict[str, dict[str, Any]] = {}  # optional: the pipeline's text encoder and decoder (add_components)
        self.calibration: dict[str, dict[str, Any]] = {}  # optional: per teacher, the fitted correction (cost/calibrate.py)
        self.space_hint: str | None = None  # the space whose candidates are costed, named in a missing-units message
        if load and self.path.is_file():  # not ``load``: the file is replaced (``ensure(rebuild=True)``)
            self._merge(self._read(), explicit=path is not None)

    @classmethod
    def open(cls, path: str | Path) -> LatencyTable:
        """A table file as it is, for prediction on any machine: no device needed, nothing timed or written."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"no latency table at {p}; build one on the target device: hybridsd-nas lut build --teacher TEACHER "
                              f"--device DEVICE --out {p}")
        self = cls.__new__(cls)
        self.path, self.portable, self.device, self.space_hint = p, True, None, None
        data = self._read()
        meta = data.get("meta", {})
        if meta.get("version") not in (1, cls.VERSION):
            raise ConfigError(f"latency table {p} has format version {meta.get('version')}, not 1 or {cls.VERSION}; rebuild it on "
                              f"{meta.get('device', 'its device')} with hybridsd-nas lut build")
        if meta["version"] == 1:  # the same keys and figures; it recorded medians and no diffusers version
            meta = {"statistic": "median", "timing": TIMING_MODE, **meta}
        self.meta = meta
        self.timing = meta.get("timing", TIMING_MODE)
        self.dtype = parse_dtype(meta["dtype"])
        self.resolution, self.batch = int(meta["resolution"]), int(meta["batch"])
        self.warmup, self.repeats, self.inner = meta.get("warmup"), meta.get("repeats"), meta.get("inner")
        self.units, self.overhead = data.get("units", {}), data.get("overhead", {})
        self.components = data.get("components", {})
        self.calibration = data.get("calibration", {})
        self._warn_versions()
        return self

    # -- file ------------------------------------------------------------------------------
    def _fresh_meta(self, label: str) -> dict[str, Any]:
        return {"version": self.VERSION, "device": label, "device_type": self.device.type if self.device else None,
                "dtype": dtype_name(self.dtype), "resolution": self.resolution, "batch": self.batch,
                "torch": torch.__version__, "diffusers": diffusers.__version__, "hybridsd_nas": __version__,
                "timing": getattr(self, "timing", TIMING_MODE), "statistic": STATISTIC, "warmup": self.warmup, "repeats": self.repeats,
                "inner": self.inner, "spread_limit": SPREAD_LIMIT, "max_remeasure": MAX_REMEASURE,
                "sanity_ratio": SANITY_RATIO, "teacher": None, "covers": {}, "built": None, "build_id": None}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise ConfigError(f"latency table {self.path} is unreadable ({type(e).__name__}: {e}); delete it to rebuild") from None
        if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
            raise ConfigError(f"latency table {self.path} is not a table (no 'meta'); delete it or give another path")
        return data

    def _merge(self, data: dict[str, Any], explicit: bool) -> None:
        """Take in a table file measured for this device and these settings (what another worker wrote)."""
        meta = data["meta"]
        if meta.get("version") != self.VERSION:
            return  # an older format: its units are timed again
        mine = (self.meta["device"], self.meta["dtype"], self.resolution, self.batch)
        theirs = (meta.get("device"), meta.get("dtype"), meta.get("resolution"), meta.get("batch"))
        if theirs != mine or meta.get("timing", TIMING_MODE) != self.timing:
            if not explicit:  # a cache file is named by these settings; a foreign one there is timed anew
                return
            if theirs != mine:
                raise ConfigError(f"latency table {self.path} is for {_settings(*theirs)}, not {_settings(*mine)}; give another path")
            raise ConfigError(f"latency table {self.path} was timed {meta.get('timing', TIMING_MODE)}, not {self.timing}; give "
                              f"another path or --timing {meta.get('timing', TIMING_MODE)}")
        self.meta = {**meta, "covers": dict(meta.get("covers") or {})}
        self.units.update(data.get("units", {}))
        self.overhead.update(data.get("overhead", {}))
        self.components.update(data.get("components", {}))
        self.calibration.update(data.get("calibration", {}))
        self._warn_versions()

    def _warn_versions(self) -> None:
        built = (self.meta.get("torch"), self.meta.get("diffusers"))
        if built != (torch.__version__, diffusers.__version__) and str(self.path) not in _WARNED:
            _WARNED.add(str(self.path))
            log.warning(f"latency table {self.path} was measured with torch {built[0] or '(not recorded)'} and diffusers "
                        f"{built[1] or '(not recorded)'}; this process runs torch {torch.__version__} and diffusers "
                        f"{diffusers.__version__}: its figures may be off")

    def save(self) -> None:
        """Write the table atomically (a reader sees the old file or the new one, never half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        data = {"meta": self.meta, "units": self.units, "overhead": self.overhead}
        if self.components:  # optional: a table without them is written as before
            data["components"] = self.components
        if self.calibration:  # optional, likewise
            data["calibration"] = self.calibration
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def _lock(self) -> filelock.FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.path.with_name(self.path.name + ".lock")), timeout=LOCK_TIMEOUT)

    # -- checks ----------------------------------------------------------------------------
    def check(self, resolution: int | None = None, dtype: torch.dtype | str | None = None, batch: int | None = None) -> None:
        """One line naming the difference when the table was measured for another resolution, dtype or batch."""
        want_dt = dtype_name(parse_dtype(dtype) if isinstance(dtype, str) else dtype) if dtype is not None else None
        wrong = [f"{what} {want}" for what, want, have in (("resolution", resolution, self.resolution),
                                                          ("dtype", want_dt, dtype_name(self.dtype)),
                                                          ("batch", batch, self.batch))
                 if want is not None and want != have]
        if wrong:
            raise ConfigError(f"latency table {self.path} is for {self.describe()}, not {', '.join(wrong)}; use a table built "
                              f"for those (hybridsd-nas lut build ... --resolution R --dtype D --batch-size B) or cost at the table's")

    def describe(self) -> str:
        return _settings(self.meta.get("device"), dtype_name(self.dtype), self.resolution, self.batch)

    def build_command(self, space: str | None = None, teacher: str | None = None) -> str:
        """The command that rebuilds this table with the units of ``space`` added (for ``teacher``)."""
        m = self.meta
        dev = m.get("device_type") or "DEVICE"
        return (f"hybridsd-nas lut build --teacher {teacher or m.get('teacher') or 'TEACHER'} "
                f"--space {space or self.space_hint or 'SPACE'} "
                f"--device {dev} --dtype {m.get('dtype')} --resolution {self.resolution} --batch-size {self.batch} --out {self.path}")

    # -- timing ----------------------------------------------------------------------------
    def _time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """``fn`` timed with :data:`STATISTIC`, measured again (at most :data:`MAX_REMEASURE` times) while its
        10th-90th percentile spread exceeds :data:`SPREAD_LIMIT`."""
        best, tries = None, []
        for _ in range(1 + MAX_REMEASURE):
            st = time_fn(fn, self.device, self.warmup, self.repeats, dtype_name(self.dtype), self.inner)
            spread = st.p90_ms / st.p10_ms if st.p10_ms > 0 else math.inf
            tries.append(st.min_ms)
            if best is None or spread < best[1]:
                best = (st, spread)
            if spread <= SPREAD_LIMIT:
                break
        st, spread = best
        return {"ms": min(tries), "median": st.median_ms, "p10": st.p10_ms, "p90": st.p90_ms, "spread": round(spread, 3),
                "remeasured": len(tries) - 1}

    def _time_unit(self, call: UnitCall) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        mod = materialize(copy.deepcopy(call.module), self.device, self.dtype)
        args = _from_spec(call.args, self.device, self.dtype, g)
        kwargs = _from_spec(call.kwargs, self.device, self.dtype, g)
        return {**self._time(runner(mod, args, kwargs, self.timing)), "desc": call.desc}

    def _time_whole(self, base: BaseForward) -> dict[str, Any]:
        model = materialize(copy.deepcopy(base.model), self.device, self.dtype)
        x = _to_device_inputs(base.inputs, self.device, self.dtype, torch.Generator().manual_seed(0))
        return self._time(runner(model, (), {**x, "return_dict": False}, self.timing))

    def _time_units(self, calls: dict[str, UnitCall], progress: bool) -> dict[str, dict[str, Any]]:
        return {k: self._time_unit(c) for k, c in tqdm(calls.items(), desc="timing units", disable=not progress, leave=False)}

    # -- building --------------------------------------------------------------------------
    def ensure(self, calls: dict[str, UnitCall], base: BaseForward | None = None, covers: dict[str, list[str]] | None = None,
               rebuild: bool = False, teacher: str | None = None, progress: bool = False) -> dict[str, Any]:
        """Time what the table lacks of ``calls`` (and ``base``'s overhead), once across processes.

        Under the file lock: re-read what another worker wrote meanwhile, time only what is still
        missing, check the base's units against its whole forward (rebuilt once when they disagree,
        then :class:`UnreliableMeasurementError`), and write once. Returns what was timed."""
        if self.portable:
            raise ConfigError(f"latency table {self.path} was opened to read; build or extend it with hybridsd-nas lut build")
        with self._lock():
            if rebuild:
                self.units, self.overhead = {}, {}
                self.meta = self._fresh_meta(device_label(self.device))
            elif self.path.is_file():
                self._merge(self._read(), explicit=True)
            self.meta["teacher"] = self.meta.get("teacher") or teacher  # the first teacher, named in rebuild commands
            todo = {k: c for k, c in calls.items() if k not in self.units}
            if base is not None:
                todo.update({c.key: c for c in base.calls if c.key not in self.units})
            need_base = base is not None and base.key not in self.overhead
            new_covers = {k: sorted(set(self.meta["covers"].get(k, [])) | set(v)) for k, v in (covers or {}).items()}
            if not todo and not need_base:
                if any(new_covers.get(k) != self.meta["covers"].get(k) for k in new_covers):
                    self.meta["covers"].update(new_covers)
                    self.save()
                return {"timed": 0, "units": len(self.units), "build_id": self.meta.get("build_id")}
            timed = self._time_units(todo, progress)
            sanity = None
            if need_base:
                sanity = self._calibrate(base, timed, todo, progress)
            self.units.update(timed)
            self.meta["covers"].update(new_covers)
            self.meta.update(built=_now(), build_id=uuid.uuid4().hex, torch=torch.__version__, diffusers=diffusers.__version__,
                             hybridsd_nas=__version__)
            self.save()
            return {"timed": len(timed), "units": len(self.units), "build_id": self.meta["build_id"], "sanity": sanity}

    def _calibrate(self, base: BaseForward, timed: dict[str, dict[str, Any]], todo: dict[str, UnitCall],
                   progress: bool) -> dict[str, Any]:
        """The base's overhead (whole forward - its units), after the sanity check; ``timed`` is updated
        in place when the check asks for a rebuild."""
        for attempt in range(2):
            units_ms = sum((timed.get(c.key) or self.units[c.key])["ms"] for c in base.calls)
            whole = self._time_whole(base)
            ratio = max(whole["ms"], units_ms) / max(min(whole["ms"], units_ms), 1e-9)
            if ratio <= SANITY_RATIO:
                self.overhead[base.key] = {"ms": whole["ms"] - units_ms, "measured_ms": whole["ms"], "units_ms": units_ms,
                                           "ratio": round(whole["ms"] / units_ms, 4) if units_ms > 0 else None,
                                           "whole": whole, "rebuilt": attempt}
                return self.overhead[base.key]
            if attempt == 0:  # timed under other load: every unit of this build, and the base's, once more
                timed.update(self._time_units({**todo, **{c.key: c for c in base.calls}}, progress))
        raise UnreliableMeasurementError(
            f"latency table {self.path} is unreliable: the teacher's {len(base.calls)} units sum to {units_ms:.3g} ms but its whole "
            f"forward measured {whole['ms']:.3g} ms ({ratio:.1f}x apart, more than {SANITY_RATIO:g}x, twice); the device was "
            "probably busy: rebuild when nothing else runs on it (nothing was written)")

    # -- the pipeline's other parts (optional key ``components``; tables without it read as before) --
    def add_components(self, figures: dict[str, dict[str, Any]]) -> None:
        """Record timings of a pipeline's text encoder and VAE decoder (keyed and timed by
        :mod:`hybridsd_nas.cost.request`), under the file lock, beside what another worker wrote."""
        if self.portable:
            raise ConfigError(f"latency table {self.path} was opened to read; add the pipeline's parts with hybridsd-nas lut build --pipeline")
        with self._lock():
            if self.path.is_file():
                self._merge(self._read(), explicit=True)
            self.components.update(figures)
            self.save()

    # -- calibration (optional key ``calibration``, per teacher; cost/calibrate.py fits it) ----
    def time_forward(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """A whole forward of ``model`` (meta or real) timed on the table's device as its units are: the
        table's statistic, re-measured while the spread is wide."""
        if self.device is None:
            raise ConfigError(f"latency table {self.path} was opened to read; time forwards on its device")
        m = materialize(copy.deepcopy(model), self.device, self.dtype)
        x = _to_device_inputs(inputs, self.device, self.dtype, torch.Generator().manual_seed(0))
        return self._time(runner(m, (), {**x, "return_dict": False}, self.timing))

    def set_calibration(self, key: str, calibration: dict[str, Any]) -> None:
        """Store the correction fitted for teacher ``key``, under the file lock, beside what another worker wrote."""
        with self._lock():
            if self.path.is_file():
                self._merge(self._read(), explicit=True)
            self.calibration[key] = calibration
            self.save()

    # -- prediction ------------------------------------------------------------------------
    def unit_latencies(self, model: nn.Module, inputs: dict[str, Any], progress: bool = False,
                       memo: dict[str, Any] | None = None) -> list[tuple[UnitCall, float]]:
        calls = trace_units(model, inputs, memo)
        missing = {c.key: c for c in calls if c.key not in self.units}
        if missing:
            if self.portable:
                raise self.missing(missing)
            self.ensure(missing, progress=progress)
        return [(c, self.units[c.key]["ms"]) for c in calls]

    def missing(self, missing: dict[str, UnitCall]) -> MissingUnitsError:
        keys = list(missing)
        shown = ", ".join(f"{k} ({missing[k].desc})" for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        return MissingUnitsError(f"latency table {self.path} lacks {len(keys)} unit shape(s) this candidate needs: {shown}; "
                                 f"rebuild it on {self.meta.get('device')} with the candidates' space: {self.build_command()}", keys)

    def predict(self, model: nn.Module, inputs: dict[str, Any], base_key: str, base_model: Callable[[], nn.Module] | None = None,
                progress: bool = False, calibrated: bool = True) -> dict[str, Any]:
        """Predicted latency of ``model`` (meta) in ms: sum of its units + the base's overhead, or, where the
        table holds a calibration for the base (and ``calibrated``), the fitted correction of the unit sum
        and count (``uncalibrated_ms`` keeps the plain sum)."""
        if base_key not in self.overhead:
            if self.portable or base_model is None:
                have = ", ".join(sorted(self.overhead)) or "(none)"
                raise ConfigError(f"latency table {self.path} has no overhead for teacher {base_key} (it has: {have}); build a "
                                  f"table for this teacher: {self.build_command()}")
            bm = base_model()
            calls = trace_units(bm, inputs)
            self.ensure({}, base=BaseForward(base_key, bm, inputs, calls), progress=progress)
        units = self.unit_latencies(model, inputs, progress=progress)
        total_units = sum(ms for _, ms in units)
        over = self.overhead[base_key]["ms"]
        cal = self.calibration.get(base_key) if calibrated else None
        extra = {"uncalibrated_ms": total_units + over, "calibration": {"candidates": cal["candidates"], "loo": cal["loo"],
                                                                      "fitted": cal["fitted"]}} if cal else {}
        ms = apply_calibration(cal, total_units, len(units)) if cal else total_units + over
        return {"latency_ms": ms, **extra, "units_ms": total_units, "overhead_ms": over, "n_units": len(units),
                "table": str(self.path), "build_id": self.meta.get("build_id"), "statistic": self.meta.get("statistic"),
                **{k: self.meta[k] for k in ("device", "dtype", "resolution", "batch")}}


def calibration_features(units_ms: float, n_units: int, terms: Iterable[str]) -> list[float]:
    """The regressors of a calibration: 1 (the intercept), then each of ``terms`` (``units_ms``, ``n_units``)."""
    return [1.0] + [units_ms if t == "units_ms" else float(n_units) for t in terms]


def apply_calibration(calibration: dict[str, Any], units_ms: float, n_units: int) -> float:
    """A stored correction (cost/calibrate.py's ``fit``) applied to a unit sum and count."""
    c, terms = calibration["coef"], calibration["terms"]
    return sum(w * x for w, x in zip([c["intercept"], *(c[t] for t in terms)], calibration_features(units_ms, n_units, terms)))


def _settings(device: Any, dtype: Any, resolution: Any, batch: Any) -> str:
    return f"{device}, {dtype}, {resolution} px, batch {batch}"


def open_table(path: str | Path, resolution: int | None = None, dtype: torch.dtype | str | None = None,
               batch: int | None = None) -> LatencyTable:
    """A table built elsewhere, read for prediction (no device needed); one line when it was measured for
    another resolution, dtype or batch than asked."""
    table = LatencyTable.open(path)
    table.check(resolution, dtype, batch)
    return table


def unit_calls(arch: UNetArch, candidates: Iterable[Candidate | str | None], resolution: int, batch: int = 1,
               vae_scale: int = 8, text_len: int = 77, progress: bool = False) -> tuple[dict[str, UnitCall], BaseForward, int]:
    """Every distinct unit call of the teacher and ``candidates`` (first occurrence per key), the teacher's
    forward, and how many candidates were traced."""
    latent_size(resolution, vae_scale)
    memo: dict[str, Any] = {}
    base_model = build_student(plan(arch, Candidate()))
    inputs = unet_inputs(arch.config, resolution, batch, text_len, vae_scale)
    base_calls = trace_units(base_model, inputs, memo)
    calls = {c.key: c for c in base_calls}
    n = 0
    for cand in tqdm(candidates, desc="tracing candidates", disable=not progress, leave=False):
        p = plan(arch, resolve_candidate(cand, arch))
        model = build_student(p)
        cin = unet_inputs(model.config if p.expressible else arch.config, resolution, batch, text_len, vae_scale)
        for c in trace_units(model, cin, memo):
            calls.setdefault(c.key, c)
        n += 1
    return calls, BaseForward(base_key(arch), base_model, inputs, base_calls), n


def build_table(teacher: Any, candidates: Iterable[Candidate | str | None] = (), out: str | Path | None = None,
                device: str = "cpu", dtype: torch.dtype | str | None = None, resolution: int | None = None, batch: int = 1,
                warmup: int = WARMUP, repeats: int = REPEATS, covers: Iterable[str] = (), rebuild: bool = False,
                arch: UNetArch | None = None, progress: bool = False, timing: str | None = None) -> tuple[LatencyTable, dict[str, Any]]:
    """Build (or extend) the table of ``teacher`` at ``out`` (default: this machine's cache) on ``device``:
    every unit shape of the teacher and of ``candidates``, and the teacher's overhead, timed the way
    ``timing`` says (:data:`TIMING_MODES`; default :func:`default_timing`).

    ``covers`` names what ``candidates`` stand for (``layer-removal@1``); when the file already records
    them for this teacher, nothing is traced or timed. Several workers may call this at once: one
    times, the others wait for it and read its file. Returns the table and a summary (``timed``:
    units timed by this call, ``units``, ``candidates`` traced, ``build_id``, ``sanity``)."""
    arch = arch or describe(teacher)
    dev = check_device(device)
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    vs = vae_scale_factor(teacher)
    res = resolution or default_resolution(teacher, arch)
    table = LatencyTable(device, dt, res, batch, path=out, warmup=warmup, repeats=repeats, load=not rebuild, timing=timing)
    key = base_key(arch)
    covers = sorted(set(covers))
    if not rebuild and key in table.overhead and set(covers) <= set(table.meta["covers"].get(key, [])):
        return table, {"timed": 0, "units": len(table.units), "candidates": 0, "build_id": table.meta.get("build_id"),
                       "sanity": table.overhead[key]}  # built before, by this or another worker: nothing to trace
    calls, base, n = unit_calls(arch, candidates, res, batch, vs, progress=progress)
    summary = table.ensure(calls, base=base, covers={key: covers}, rebuild=rebuild,
                           teacher=teacher if isinstance(teacher, str) else arch.source, progress=progress)
    return table, {**summary, "candidates": n, "sanity": table.overhead.get(key)}


__all__ = ["TIMING_MODES", "LatencyTable", "MissingUnitsError", "base_key", "default_timing", "build_table", "default_resolution", "open_table", "table_path",
           "unit_calls"]
