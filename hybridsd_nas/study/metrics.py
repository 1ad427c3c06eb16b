"""The figures a study can optimise or constrain: the ``METRICS`` registry.

Each metric names its group (when it is computed: ``cost`` from the weight-free cost engine before
anything else, ``zero_cost`` from the student as inherited, ``quality`` after the proxy's
distillation), its default direction and what it is. ``pipeline_latency_ms`` and ``peak_memory_mb``
are figures of a whole text-to-image request (the study's ``pipeline:`` settings), defined in
:mod:`hybridsd_nas.cost.request`. Config validation, the trial tables, the
report and the model cards all read this registry.
"""

from __future__ import annotations

from typing import NamedTuple

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.registry import Registry

METRIC_GROUPS = ("cost", "zero_cost", "quality")
DIRECTIONS = ("minimize", "maximize")


class Metric(NamedTuple):
    """What a study metric is. A tuple, so ``METRICS[m][0]`` (group) and ``[1]`` (direction) read as before."""

    group: str
    direction: str
    help: str
    sampled: bool = True  # a quality figure read from the student's samples (False: needs no sampling)
    hybrid: bool = False  # a figure of hybrid schedules only (a hybrid-schedule space)
    pipeline: bool = False  # a figure of a whole request (text encoder, U-Net steps, decoder): a time or a size, > 0


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, group: str, direction: str, help: str, *, sampled: bool = True, hybrid: bool = False,
                    pipeline: bool = False) -> Metric:
    """Add a study metric; ``group`` is one of :data:`METRIC_GROUPS`, ``direction`` its default."""
    if group not in METRIC_GROUPS:
        raise ConfigError(f"metric {name!r}: group {group!r} is not one of {', '.join(METRIC_GROUPS)}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"metric {name!r}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return METRICS.register(name, Metric(group, direction, help, sampled, hybrid, pipeline), help=help)


register_metric("params", "cost", "minimize", "parameter count of the U-Net")
register_metric("macs", "cost", "minimize", "MACs of one U-Net forward, attention matmuls included")
register_metric("macs_conv_linear", "cost", "minimize", "MACs of conv and linear layers only (thop / BK-SDM convention)")
register_metric("latency_ms", "cost", "minimize", "latency of one U-Net forward (measured or from the lookup table)")
register_metric("pipeline_latency_ms", "cost", "minimize",
                "latency of one whole request (pipeline: steps, guidance, resolution): text encoder, every U-Net step at the "
                "guidance batch, VAE decoder", pipeline=True)
register_metric("peak_memory_mb", "cost", "minimize",
                "peak memory of one whole request in MB (2**20 bytes): text encoder, U-Net and VAE decoder weights plus the "
                "activation peak (pipeline.memory: predict or measure)", pipeline=True)
register_metric("cloud_share", "cost", "minimize",
                "hybrid schedules: the cloud's share of the all-cloud MACs (U-Net steps, text encoder, decoder)", hybrid=True)
register_metric("edge_macs", "cost", "minimize",
                "hybrid schedules: MACs the edge runs per image (its U-Net steps with guidance, the decoder)", hybrid=True)
register_metric("output_mse", "zero_cost", "minimize", "output MSE against the teacher before any training")
register_metric("latent_stat_shift", "zero_cost", "minimize",
                "|d mean| + |d std| of the predicted noise vs the teacher, before training")
register_metric("proxy_fid", "quality", "minimize", "FID of the distilled student's samples against the teacher's samples")
register_metric("kid", "quality", "minimize", "KID against the teacher's samples")
register_metric("fid_real", "quality", "minimize", "FID against real images")
register_metric("heldout_mse", "quality", "minimize",
                "the distilled student's output MSE against the teacher on fixed held-out noisy latents (no sampling)",
                sampled=False)
register_metric("paired_mse", "quality", "minimize",
                "mean squared pixel difference of the student's samples from the teacher's, same prompts and seeds")
register_metric("adherence", "quality", "maximize", "share of samples the evaluation classifier assigns to the prompted class")
register_metric("clip_score", "quality", "maximize", "CLIP score of the student's samples and their prompts (needs clip_model)")
register_metric("cmmd", "quality", "minimize", "CMMD of the student's samples against the teacher's (needs clip_model)")


def metric_group(name: str) -> str:
    """The group of metric ``name`` (one-line :class:`UnknownNameError` if unknown)."""
    return METRICS.get(name).group


def metrics_in(group: str) -> tuple[str, ...]:
    """The registered metrics of ``group``, in registration order."""
    return tuple(n for n, m in METRICS.items() if m.group == group)


def unsampled_metrics() -> tuple[str, ...]:
    """Quality figures that need no sampling: a study that asks for no other skips the proxy's sampling."""
    return tuple(n for n, m in METRICS.items() if m.group == "quality" and not m.sampled)


def hybrid_metrics() -> tuple[str, ...]:
    """Figures of hybrid schedules only."""
    return tuple(n for n, m in METRICS.items() if m.hybrid)


def pipeline_metrics() -> tuple[str, ...]:
    """Figures of a whole text-to-image request (the study's ``pipeline:`` settings)."""
    return tuple(n for n, m in METRICS.items() if m.pipeline)
