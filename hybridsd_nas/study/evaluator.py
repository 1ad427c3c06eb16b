"""Evaluating the points of one study's space: cost, zero-cost scores and the quality proxy."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hybridsd_nas.arch import Candidate, describe, resolve_candidate
from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.cost import (
    CostReport,
    LatencyTable,
    MissingUnitsError,
    base_key,
    build_table,
    check_device,
    default_resolution,
    estimate_cost,
    open_table,
)
from hybridsd_nas.cost.request import PipelineCost, default_request, schedule_runs
from hybridsd_nas.distill import checked_data_spec
from hybridsd_nas.proxy import ProxyResult, ProxySettings, Stage, eval_set_for, run_proxy
from hybridsd_nas.sources import resolve_teacher
from hybridsd_nas.spaces import load_space

from .config import Constraint, PipelineSpec, StudyConfig
from .hybrid import HybridProxy, ScheduleCost, point_key
from .metrics import METRICS, hybrid_metrics, pipeline_metrics, unsampled_metrics

# figures measured against the teacher's own outputs or samples: the teacher scores 0 on each
TEACHER_RELATIVE = ("output_mse", "latent_stat_shift", "proxy_fid", "kid", "heldout_mse", "paired_mse", "cmmd")


class Evaluator:
    """Cost, zero-cost scores and the proxy for the points of one study's space."""

    def __init__(self, cfg: StudyConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.arch = describe(cfg.teacher)
        self.space = load_space(cfg.space)
        self.hybrid = self.space.kind == "hybrid-schedule"
        hybrid, unsampled = hybrid_metrics(), unsampled_metrics()
        used = [o.metric for o in cfg.objectives] + [c.metric for c in cfg.constraints]
        if not self.hybrid and any(m in hybrid for m in used):
            m = next(m for m in used if m in hybrid)
            raise ConfigError(f"{cfg.source}: {m} is a figure of hybrid schedules; it needs a hybrid-schedule space "
                              f"(space {self.space.name!r} is {self.space.kind})")
        for c in cfg.constraints:
            if c.metric in hybrid and c.of == "teacher":
                raise ConfigError(f"{cfg.source}: constraints: {c.metric} takes no 'of: teacher' "
                                  "(cloud_share is already a share of the all-cloud run; give edge_macs in MACs)")
        if self.hybrid and any(m in unsampled for m in used):
            m = next(m for m in used if m in unsampled)
            raise ConfigError(f"{cfg.source}: {m} is a figure of one distilled U-Net; a hybrid-schedule space is ranked by "
                              "the figures of its samples (proxy_fid, kid, fid_real, paired_mse, adherence)")
        if self.hybrid and cfg.fidelity is not None:
            raise ConfigError(f"{cfg.source}: fidelity: space {self.space.name!r} is a hybrid-schedule space, whose points share "
                              "one short distillation per small U-Net across schedules and so cannot continue it per point; "
                              "use fidelity with a layer-removal, recombination or channel-pruning space")
        if self.hybrid and cfg.enqueue:
            raise ConfigError(f"{cfg.source}: enqueue: names candidates of layer-removal or recombination spaces; "
                              f"space {self.space.name!r} is a hybrid-schedule space (leave enqueue out)")
        self.settings = ProxySettings(**cfg.proxy)
        if any(METRICS.get(m).group == "quality" for m in used):  # the data the proxy trains on, checked before any model loads
            checked_data_spec(self.settings.data, resolve_teacher(cfg.teacher))
        sampled = [m for m in used if METRICS.get(m).group == "quality" and METRICS.get(m).sampled]
        if sampled:  # what the samples are scored on, checked before any model loads
            es = eval_set_for(cfg.teacher, self.settings)
            needs = {"adherence": (es.classifier, "an adherence classifier (classifier:) and labelled eval_prompts"),
                     "fid_real": (es.real_reference, "an evaluation set that names real reference images"),
                     "clip_score": (self.settings.clip_model, "clip_model: (a local CLIP model directory)"),
                     "cmmd": (self.settings.clip_model, "clip_model: (a local CLIP model directory)")}
            for m in sampled:
                if m in needs and not needs[m][0]:
                    raise ConfigError(f"{cfg.source}: {m} needs {needs[m][1]}; evaluation set {es.source} has none")
        self._lut: LatencyTable | None = None
        if cfg.latency_mode == "lut" and cfg.latency_table and Path(cfg.latency_table).is_file():
            # a table built elsewhere, read as it is (no device needed): checked before any model loads
            try:
                self._lut = open_table(cfg.latency_table, resolution=cfg.resolution or default_resolution(cfg.teacher, self.arch),
                                       dtype=cfg.latency_dtype, batch=cfg.batch)
            except ConfigError as e:
                raise ConfigError(f"{cfg.source}: latency.table: {e}") from None
            if base_key(self.arch) not in self._lut.overhead:
                raise ConfigError(f"{cfg.source}: latency.table: {cfg.latency_table} was not built for teacher {cfg.teacher!r} "
                                  f"(it holds {', '.join(sorted(self._lut.overhead)) or 'no teacher'}); build one: "
                                  f"{self._lut.build_command(self.space.name, cfg.teacher)}")
            self._lut.space_hint = self.space.name
        self.pipeline_metrics = tuple(m for m in pipeline_metrics() if m in cfg.metrics)
        self._pipeline: PipelineCost | None = None
        self._pipeline_built = False
        if self.pipeline_metrics:  # the request, the teacher's text encoder and VAE, a named table: checked before any model loads
            self._pipeline = self._pipeline_cost(build=False)
        self._names: dict[str, str] | None = None
        self._teacher_cost: dict[str, Any] | None = None
        self._schedule_cost = None
        self._hybrid_proxy = None

    def label(self, candidate: Candidate) -> str:
        """A readable name of ``candidate``: the name of the space's preset or enqueued candidate it
        equals (bk-sdm-small, asdm-m2), else its structure (``-down1.1 -up2.0 -mid``)."""
        if self._names is None:
            names: dict[str, str] = {}
            for name in self.cfg.enqueue:
                try:
                    names.setdefault(resolve_candidate(name, self.arch).key, name)
                except HybridSDError:
                    pass
            for name, c in self.space.presets(self.arch).items():
                names.setdefault(c.key, name)
            self._names = names
        return self._names.get(candidate.key) or candidate.label

    def teacher_marker(self) -> dict[str, float]:
        """The teacher's own figures for plots: its cost (weight-free count; latency and whole-request
        figures where the study uses them), and 0 for every figure measured against the teacher itself."""
        if self._teacher_cost is not None or "latency_ms" in self.cfg.metrics or self.pipeline_metrics:  # counted anyway
            figs = dict(self.teacher_figures())
        else:
            figs = cost_figures(estimate_cost(self.cfg.teacher, Candidate(), resolution=self.cfg.resolution, batch=self.cfg.batch,
                                              arch=self.arch))
        return {**{k: float(v) for k, v in figs.items()}, **{m: 0.0 for m in TEACHER_RELATIVE}}

    def key(self, pt) -> str:
        """What makes two trials the same evaluation: the candidate, and for schedules the schedule too."""
        if self.hybrid:
            return point_key(pt)
        return pt.candidate.key

    def schedule_figures(self, pt, cost: CostReport) -> dict[str, Any]:
        """Cloud/edge figures of a schedule point (its small U-Net's ``cost`` given)."""
        if self._schedule_cost is None:
            self._schedule_cost = ScheduleCost(self.cfg.teacher, self.cfg.resolution)
        return self._schedule_cost(pt.extra["schedule"], int(cost.macs), int(self.teacher_figures()["macs"]))

    def teacher_figures(self) -> dict[str, Any]:
        """The teacher's own cost figures (the no-op candidate; its whole request where the study counts
        one: every step on the teacher), counted once."""
        if self._teacher_cost is None:
            cost = self.cost(Candidate())
            figs = cost_figures(cost)
            if self.pipeline_metrics:
                figs.update({k: v for k, v in self.pipeline_figures(Candidate(), None, cost).items() if k != "record"})
            self._teacher_cost = figs
        return self._teacher_cost

    def _pipeline_cost(self, build: bool) -> PipelineCost:
        """The whole-request figures' calculator: the request of the YAML's ``pipeline:`` (defaults: the
        teacher's), and for ``pipeline_latency_ms`` in ``lut`` mode the table of the guidance batch:
        ``pipeline.table``, else ``latency.table``, read as it is where the file exists; else (``build``)
        the study's own table when it is for the same resolution and batch, or one built on the device."""
        c, spec = self.cfg, self.cfg.pipeline or PipelineSpec()
        timed = "pipeline_latency_ms" in self.pipeline_metrics
        try:
            request = default_request(c.teacher, spec.steps, spec.guidance, spec.resolution or c.resolution, spec.images)
        except HybridSDError as e:
            raise ConfigError(f"{c.source}: pipeline: {e}") from None
        key, path = ("pipeline.table", spec.table) if spec.table else ("latency.table", c.latency_table)
        table: Any = None
        if timed and c.latency_mode == "lut":
            if path and Path(path).is_file():
                table = path
            elif build:
                table = self._pipeline_table(request, path)
        try:
            return PipelineCost(c.teacher, request, latency=c.latency_mode if timed else "off", device=c.latency_device,
                                dtype=c.latency_dtype, table=table, memory=spec.memory, arch=self.arch)
        except HybridSDError as e:
            hint = (f"; pipeline_latency_ms runs the U-Net on {request.unet_batch} latents at {request.resolution} px: "
                    "name a table built for those in pipeline.table") if table is not None and not spec.table else ""
            raise ConfigError(f"{c.source}: {key if table is not None else 'pipeline'}: {e}{hint}") from None

    def _pipeline_table(self, request, path: str | None) -> LatencyTable:
        """The lookup table of the whole request's U-Net steps when no table file exists yet: the study's
        own when it is for the same resolution and batch, else built on ``latency.device`` like it."""
        c = self.cfg
        res = c.resolution or default_resolution(c.teacher, self.arch)
        if path == c.latency_table:
            if (res, c.batch) == (request.resolution, request.unet_batch):
                return self.latency_table()
            path = None  # that file is the study's table for another batch or resolution: this one goes to the cache
        try:
            check_device(c.latency_device)
        except HybridSDError as e:
            raise ConfigError(f"{c.source}: latency.device: the whole request's latency table needs the device ({e}); build "
                              f"one there with hybridsd-nas lut build --batch-size {request.unet_batch} --resolution "
                              f"{request.resolution} --pipeline and name it in pipeline.table") from None
        cands = itertools.chain(self.space.presets(self.arch).values(), self.space.unit_cover(self.arch))
        table, _ = build_table(c.teacher, cands, out=path, device=c.latency_device, dtype=c.latency_dtype,
                               resolution=request.resolution, batch=request.unet_batch,
                               covers=[f"{self.space.name}@{self.space.version}"], arch=self.arch)
        table.space_hint = self.space.name
        return table

    def pipeline_cost(self) -> PipelineCost:
        """The study's :class:`PipelineCost` (its lookup table built or read on first use)."""
        if self._pipeline is None:
            raise ConfigError(f"{self.cfg.source}: the study counts no whole-request figure ({', '.join(pipeline_metrics())})")
        if not self._pipeline_built:
            if self._pipeline.mode == "lut" and self._pipeline.table is None:
                self._pipeline = self._pipeline_cost(build=True)
            self._pipeline_built = True
        return self._pipeline

    def pipeline_figures(self, candidate: Candidate, schedule: dict[str, Any] | None = None,
                         cost: CostReport | None = None) -> dict[str, Any]:
        """The study's whole-request figures of ``candidate`` (and its hybrid ``schedule``: each U-Net for
        its own steps), with how they were found under ``record``; ``cost``: its cost report, whose U-Net
        latency is reused when it was taken at the request's resolution and guidance batch."""
        pc = self.pipeline_cost()
        known = {}
        spec = self.cfg.pipeline or PipelineSpec()
        if (cost is not None and cost.latency_ms is not None and spec.table is None
                and (cost.measured["resolution"], cost.measured["batch"]) == (pc.request.resolution, pc.request.unet_batch)):
            known[candidate.key] = cost.latency_ms
        try:
            return pc.figures(schedule_runs(candidate, schedule, pc.request.steps), self.pipeline_metrics, known)
        except MissingUnitsError as e:
            raise ConfigError(f"{self.cfg.source}: {'pipeline.table' if spec.table else 'latency.table'}: {e}") from None

    def constraints(self, group: str) -> list[Constraint]:
        """The config's constraints on metrics of ``group``, fractions of the teacher made absolute."""
        out = []
        for c in self.cfg.constraints:
            if METRICS.get(c.metric).group != group:
                continue
            if c.of == "teacher":
                c = c.absolute(float(self.teacher_figures()[c.metric]))
            out.append(c)
        return out

    def measured(self) -> dict[str, Any]:
        c = self.cfg
        out = {"cost": {"resolution": c.resolution, "batch": c.batch, "method": "meta-device count, no weights"},
               "latency": None if c.latency_mode == "off" else {"mode": c.latency_mode, "device": c.latency_device,
                                                                "dtype": c.latency_dtype, "batch": c.batch},
               "proxy": {**self.settings.as_dict(), "device": self.device, "dtype": "float32"}}
        if self._pipeline is not None:
            spec = c.pipeline or PipelineSpec()
            out["pipeline"] = {"request": self._pipeline.request.to_dict(), "metrics": list(self.pipeline_metrics),
                               "memory": spec.memory, "table": spec.table or c.latency_table,
                               "dtype": str(self._pipeline.dtype).replace("torch.", "")}
        return out

    def latency_table(self) -> LatencyTable | None:
        """The study's lookup table (``latency.mode: lut``): the YAML's ``table`` file as it is when it
        exists (built elsewhere, read only); otherwise built once on ``latency.device`` (into that
        file, or this machine's cache) for the teacher, the space's presets and every unit shape of
        its candidates, under a file lock: other workers wait for it, then read it."""
        c = self.cfg
        if c.latency_mode != "lut":
            return None
        if self._lut is None:
            try:
                check_device(c.latency_device)
            except HybridSDError as e:
                where = f"latency.table {c.latency_table} does not exist, and building it" if c.latency_table else "a latency table"
                raise ConfigError(f"{c.source}: latency.device: {where} needs the device ({e}); build one there with "
                                  "hybridsd-nas lut build and name it in latency.table") from None
            cands = itertools.chain(self.space.presets(self.arch).values(), self.space.unit_cover(self.arch))
            self._lut, _ = build_table(c.teacher, cands, out=c.latency_table, device=c.latency_device, dtype=c.latency_dtype,
                                       resolution=c.resolution, batch=c.batch, covers=[f"{self.space.name}@{self.space.version}"],
                                       arch=self.arch)
            self._lut.space_hint = self.space.name
        return self._lut

    def cost(self, candidate) -> CostReport:
        c = self.cfg
        lut = self.latency_table()
        try:
            return estimate_cost(c.teacher, candidate, resolution=c.resolution, batch=c.batch, latency=c.latency_mode,
                                 device=c.latency_device, dtype=c.latency_dtype, lut=lut, arch=self.arch)
        except MissingUnitsError as e:
            raise ConfigError(f"{c.source}: latency.table: {e}") from None

    def proxy(self, candidate, prefilter: Callable[[dict[str, float]], str | None] | None, quality: bool,
              point=None, sample: bool = True, steps: int | None = None, checkpoint_dir=None,
              save_checkpoint: bool = True) -> dict[str, Any]:
        """The proxy's figures of one candidate as a flat dict (see :func:`proxy_record`): zero-cost
        scores only unless ``quality``; ``sample=False`` stops after the distillation and its held-out
        score (no student samples, no FID: the default proxy's 40 steps and held-out score, the ranking
        score, cost 7.8% of a long distillation, results/proxy_fidelity_ema_reference.md). ``steps``
        overrides the distillation's length; ``checkpoint_dir`` continues it from (and, with
        ``save_checkpoint``, leaves) a checkpoint there: a multi-fidelity study's rungs."""
        if self.hybrid:
            if self._hybrid_proxy is None:
                self._hybrid_proxy = HybridProxy(self.cfg.teacher, self.settings, self.device, self.cfg.base)
            return self._hybrid_proxy(point, prefilter, quality)
        until = Stage.ZERO_COST if not quality else Stage.SAMPLES if sample else Stage.HELDOUT
        settings = self.settings if steps is None else replace(self.settings, distill_steps=int(steps))
        res = run_proxy(self.cfg.teacher, candidate, settings, base=self.cfg.base, device=self.device, until=until,
                        keep_images=quality and sample, prefilter=prefilter, checkpoint_dir=checkpoint_dir,
                        save_checkpoint=save_checkpoint)
        return proxy_record(res)


def proxy_record(res: ProxyResult) -> dict[str, Any]:
    """A proxy result as the objective reads it: its JSON (``status`` and ``reason``, ``zero_cost``,
    every figure and timing flat) plus the student's samples under ``images`` when kept."""
    out = res.to_dict()
    if res.images is not None:
        out["images"] = res.images
    return out


def cost_figures(cost: CostReport) -> dict[str, Any]:
    """The study metrics among the cost engine's figures (params, both MACs, latency when measured)."""
    out: dict[str, Any] = {"params": cost.params, "macs": cost.macs, "macs_conv_linear": cost.macs_conv_linear}
    if cost.latency is not None:
        out["latency_ms"] = cost.latency_ms
    return out


def check_constraints(constraints: Sequence[Constraint], figures: dict[str, Any]) -> str | None:
    """Why ``figures`` break the first of ``constraints`` they break (one line), else None."""
    for c in constraints:
        if c.metric in figures and c.violation(figures[c.metric]) > 0:
            return f"{c.metric} = {figures[c.metric]:.6g} breaks {c.describe()}"
    return None
