"""The cost of one candidate: params, MACs (two conventions) and, when asked, latency, weight-free."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridsd_nas.arch import Candidate, Plan, UNetArch, describe, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import UnknownNameError
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.cost.analytic import METHOD as ANALYTIC_METHOD
from hybridsd_nas.cost.analytic import NotAnalyticError, analytic_count
from hybridsd_nas.cost.inputs import latent_size, unet_inputs
from hybridsd_nas.cost.latency import check_device, measure_latency, parse_dtype
from hybridsd_nas.cost.lut import LatencyTable, base_key, open_table
from hybridsd_nas.cost.macs import count_macs
from hybridsd_nas.sources import vae_scale_factor


@dataclass
class CostReport:
    """What :func:`estimate_cost` found; ``to_dict()`` is the JSON the CLI and studies write."""

    unet: str
    candidate: dict[str, Any]
    candidate_key: str
    build: str
    params: int
    macs: int
    macs_conv_linear: int
    breakdown: dict[str, int]
    measured: dict[str, Any]
    count_seconds: float
    surgery_reason: str | None = None
    by_block: dict[str, Any] | None = None
    latency_ms: float | None = None
    latency: dict[str, Any] | None = field(default=None)
    method: str = "traced"  # how params and MACs were counted: "analytic" or "traced"
    method_reason: str | None = None  # why they were traced where the closed form was asked first

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"unet": self.unet, "candidate": self.candidate, "candidate_key": self.candidate_key,
                             "build": self.build, "params": self.params, "macs": self.macs,
                             "macs_conv_linear": self.macs_conv_linear, "breakdown": self.breakdown, "measured": self.measured}
        if self.surgery_reason is not None:
            d["surgery_reason"] = self.surgery_reason
        if self.by_block is not None:
            d["by_block"] = self.by_block
        d["method"] = self.method
        if self.method_reason is not None:
            d["method_reason"] = self.method_reason
        d["count_seconds"] = self.count_seconds
        if self.latency is not None:
            d["latency_ms"] = self.latency_ms
            d["latency"] = self.latency
        return d


@dataclass
class LatencyRequest:
    """What a latency mode is handed: the candidate's meta-device model and inputs, and the settings
    (``device`` is None when a table built elsewhere is read: no device is needed then)."""

    arch: UNetArch
    plan: Plan
    model: nn.Module
    inputs: dict[str, Any]
    device: torch.device | None
    dtype: torch.dtype
    resolution: int
    batch: int
    repeats: int
    lut: LatencyTable | str | Path | None


# name -> fn(LatencyRequest) -> {"latency_ms": float, ...how it was measured}
LATENCY_MODES: Registry[Callable[[LatencyRequest], dict[str, Any]] | None] = Registry("latency mode")
LATENCY_MODES.register("off", None, help="no latency")

# how params and MACs are counted: the closed form where it is exact, else (or when asked) tracing
COUNT_METHODS = {
    "auto": "closed form where it is exact for the base, else traced (the report says why)",
    "analytic": "closed form from the plan only; an error where it does not cover the base",
    "traced": "the candidate built on the meta device and one forward counted",
}
_TRACED_METHOD = "FlopCounterMode + module hooks on the meta device (no weights)"


@LATENCY_MODES.register("measure", help="a real forward with random weights on the device: warm-up, repeats, median")
def _measure(r: LatencyRequest) -> dict[str, Any]:
    st = measure_latency(r.model, r.inputs, r.device, r.dtype, repeats=r.repeats)
    return {"latency_ms": st.median_ms, **st.as_dict(), "method": "measured", "resolution": r.resolution, "batch": r.batch}


@LATENCY_MODES.register("lut", help="sum of per-unit timings from a lookup table built on the device, plus the base's overhead")
def _lookup(r: LatencyRequest) -> dict[str, Any]:
    table = r.lut if isinstance(r.lut, LatencyTable) else LatencyTable(str(r.device), r.dtype, r.resolution, r.batch)
    table.check(r.resolution, r.dtype, r.batch)
    pred = table.predict(r.model, r.inputs, base_key(r.arch), base_model=lambda: build_student(plan(r.arch, Candidate())))
    return {**pred, "method": "lookup table"}


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
    method: str = "auto",
) -> CostReport:
    """Cost of ``candidate`` on base ``unet``: params, MACs, and latency when asked (a name of
    :data:`LATENCY_MODES`).

    ``lut`` (``latency="lut"``): a :class:`LatencyTable`, or the path of a table file built elsewhere
    (read as it is, on any machine: ``device`` is then not needed, and ``dtype`` defaults to the
    table's); default this machine's table for ``device`` in the cache, grown as units are met.

    ``resolution`` is in pixels (default: the config's ``sample_size`` x VAE scale); MACs are for
    one forward of ``batch`` latents with ``text_len`` text tokens.

    ``method`` (:data:`COUNT_METHODS`): ``auto`` counts in closed form
    (:mod:`hybridsd_nas.cost.analytic`, no model built) where that is exact for the base, else by
    tracing, with the reason in ``method_reason``; ``analytic`` raises
    :class:`~hybridsd_nas.cost.analytic.NotAnalyticError` instead of tracing; ``traced`` always
    builds and traces. A latency mode builds the meta-device model in any case.
    """
    if method not in COUNT_METHODS:
        raise UnknownNameError("count method", method, COUNT_METHODS)
    mode = LATENCY_MODES.get(latency)
    t0 = time.perf_counter()
    arch = arch or describe(unet)
    cand = resolve_candidate(candidate, arch)
    p = plan(arch, cand)
    vs = vae_scale or vae_scale_factor(unet)
    res = resolution or int(arch.config.get("sample_size") or 64) * vs
    latent_size(res, vs)
    mc, reason = None, None
    if method != "traced":
        try:
            mc = analytic_count(p, res, batch, text_len, vs)
        except NotAnalyticError as e:
            if method == "analytic":
                raise
            reason = str(e)
    model = inputs = None
    if mc is None or mode is not None:
        model = build_student(p)  # meta device
        inputs = unet_inputs(model.config if p.expressible else arch.config, res, batch, text_len, vs)
    if mc is None:
        names = {bp.student_path: bp.name for bp in p.down + p.up}
        mc = count_macs(model, inputs, names)
    traced = reason is not None or method == "traced"
    report = CostReport(
        unet=arch.source, candidate=cand.to_dict(), candidate_key=cand.key,
        build="diffusers-config" if p.expressible else "surgery",
        params=mc.params, macs=mc.macs, macs_conv_linear=mc.macs_conv_linear, breakdown=mc.as_dict()["breakdown"],
        measured={"resolution": res, "latent": res // vs, "batch": batch, "text_tokens": text_len,
                  "method": _TRACED_METHOD if traced else ANALYTIC_METHOD},
        surgery_reason=None if p.expressible else p.config_reason,
        by_block=mc.by_block if by_block else None,
        count_seconds=round(time.perf_counter() - t0, 4),
        method="traced" if traced else "analytic",
        method_reason=reason,
    )
    if mode is not None:
        dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if latency == "lut" and lut is not None and not isinstance(lut, LatencyTable):
            lut = open_table(lut)
        if isinstance(lut, LatencyTable) and lut.portable:  # read from a file: the device it was built on need not be here
            dev, dt = None, dt or lut.dtype
        else:
            dev = check_device(device)
            dt = dt or (torch.float16 if dev.type == "cuda" else torch.float32)
        figures = mode(LatencyRequest(arch, p, model, inputs, dev, dt, res, batch, repeats, lut))
        report.latency_ms = figures.pop("latency_ms")
        report.latency = figures
    return report
