"""The cost engine: params, MACs (two conventions; in closed form where that is exact, else traced)
and latency of any candidate, weight-free (latency lookup tables built once on a device and read
anywhere); the whole text-to-image pipeline's cost and a hybrid schedule's cloud/edge accounting."""

from hybridsd_nas.cost.analytic import NotAnalyticError, analytic_count, analytic_support
from hybridsd_nas.cost.engine import COUNT_METHODS, LATENCY_MODES, CostReport, LatencyRequest, estimate_cost
from hybridsd_nas.cost.inputs import latent_size, unet_inputs
from hybridsd_nas.cost.latency import (
    LatencyStats,
    check_device,
    device_label,
    dtype_name,
    measure_latency,
    parse_dtype,
    time_fn,
)
from hybridsd_nas.cost.lut import (
    LatencyTable,
    MissingUnitsError,
    base_key,
    build_table,
    default_resolution,
    open_table,
    table_path,
)
from hybridsd_nas.cost.macs import MacCount, count_macs

__all__ = [
    "COUNT_METHODS",
    "LATENCY_MODES",
    "CostReport",
    "LatencyRequest",
    "LatencyStats",
    "LatencyTable",
    "MacCount",
    "MissingUnitsError",
    "NotAnalyticError",
    "analytic_count",
    "analytic_support",
    "base_key",
    "build_table",
    "check_device",
    "count_macs",
    "default_resolution",
    "device_label",
    "dtype_name",
    "estimate_cost",
    "latent_size",
    "measure_latency",
    "open_table",
    "parse_dtype",
    "table_path",
    "time_fn",
    "unet_inputs",
]
