"""A study, declared in YAML and validated: every error names the file, the key and what is valid."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.paths import results_root
from hybridsd_nas.cost import LATENCY_MODES
from hybridsd_nas.cost.request import MEMORY_MODES
from hybridsd_nas.data import parse_data_spec
from hybridsd_nas.data.evalset import load_eval_set
from hybridsd_nas.distill import LR_SCHEDULES, DistillConfig
from hybridsd_nas.proxy import ProxySettings
from hybridsd_nas.spaces import read_yaml

from .fidelity import Fidelity
from .metrics import DIRECTIONS, METRICS, metrics_in, pipeline_metrics
from .samplers import SAMPLERS

WANDB_MODES = ("off", "offline", "online")
_TOP = ("name", "teacher", "base", "space", "objectives", "constraints", "cost", "latency", "sampler", "trials",
        "timeout", "enqueue", "proxy", "prefilter", "storage", "results_dir", "artifacts", "heartbeat", "wandb",
        "max_failures", "description", "data", "eval_prompts", "classifier", "clip_model", "fidelity", "pipeline")
EVAL_KEYS = ("data", "eval_prompts", "classifier", "clip_model")  # top-level keys that go to the proxy's settings
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Constraint:
    metric: str
    max: float | None = None
    min: float | None = None
    of: str | None = None  # "teacher": max/min are fractions of the teacher's own figure

    def absolute(self, reference: float) -> "Constraint":
        """This constraint with fractions of ``reference`` turned into absolute bounds."""
        if self.of is None:
            return self
        return Constraint(self.metric, None if self.max is None else self.max * reference,
                          None if self.min is None else self.min * reference)

    def violation(self, value: float) -> float:
        """> 0 when broken (by how much), <= 0 when kept: Optuna's constraint convention."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        v = -math.inf
        if self.max is not None:
            v = max(v, value - self.max)
        if self.min is not None:
            v = max(v, self.min - value)
        return v

    def describe(self) -> str:
        parts = []
        unit = " x the teacher's" if self.of else ""
        if self.min is not None:
            parts.append(f"{self.metric} >= {self.min:g}{unit}")
        if self.max is not None:
            parts.append(f"{self.metric} <= {self.max:g}{unit}")
        return " and ".join(parts)


@dataclass(frozen=True)
class PipelineSpec:
    """The request whose ``pipeline_latency_ms`` and ``peak_memory_mb`` a study counts (YAML ``pipeline:``);
    what is None is the teacher's (its sampling defaults; the resolution: ``cost.resolution``, else the
    teacher's sampling height, else its default)."""

    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    images: int = 1
    memory: str = "predict"  # predicted weight-free, or measured on latency.device
    table: str | None = None  # a lookup table for the guidance batch; default latency.table


PIPELINE_KEYS = tuple(PipelineSpec.__dataclass_fields__)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    teacher: str
    space: str
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...] = ()
    base: str | None = None
    resolution: int | None = None
    batch: int = 1
    latency_mode: str = "off"
    latency_device: str = "cpu"
    latency_dtype: str | None = None
    latency_table: str | None = None
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    trials: int | None = 20
    timeout: float | None = None
    enqueue: tuple[str, ...] = ()
    proxy: dict[str, Any] = field(default_factory=dict)
    prefilter: tuple[Constraint, ...] = ()
    storage: str | None = None
    results: str | None = None  # the YAML's results_dir; None: results_root() / name
    artifacts: str | None = None
    heartbeat_interval: int = 10
    heartbeat_grace: int = 30
    max_retry: int = 3
    max_failures: int = 5
    wandb: str = "off"
    description: str = ""
    fidelity: Fidelity | None = None  # multi-fidelity: rungs of distillation steps and the fraction promoted
    pipeline: PipelineSpec | None = None  # the whole request of pipeline_latency_ms and peak_memory_mb (None: defaults)
    source: str = "<dict>"

    # -- derived -------------------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys([o.metric for o in self.objectives] + [c.metric for c in self.constraints]
                                  + [c.metric for c in self.prefilter]))

    def needs(self, group: str) -> bool:
        return any(METRICS.get(m).group == group for m in self.metrics)

    def needs_sampling(self) -> bool:
        """Whether a quality figure of this study comes from the student's samples (all but the unsampled ones)."""
        return any(METRICS.get(m).group == "quality" and METRICS.get(m).sampled for m in self.metrics)

    @property
    def results_dir(self) -> Path:
        """Where the study writes: the YAML's ``results_dir``, else ``results_root() / name``."""
        return results_dir_of(self.name, self.results)

    def storage_url(self, override: str | None = None) -> str:
        url = override or self.storage
        if url:
            return url
        return sqlite_url(self.results_dir / "study.db")

    def artifacts_dir(self) -> Path:
        return artifacts_dir_of(self.name, self.artifacts, self.results)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objectives"] = [asdict(o) for o in self.objectives]
        d["constraints"] = [asdict(c) for c in self.constraints]
        d["prefilter"] = [asdict(c) for c in self.prefilter]
        return d


def results_dir_of(name: str, results: str | None = None) -> Path:
    """A study's results folder: ``results`` when given, else ``results_root() / name``."""
    return Path(results) if results else results_root() / name


def artifacts_dir_of(name: str, artifacts: str | None = None, results: str | None = None) -> Path:
    """A study's artifact store: ``artifacts`` when given, else ``artifacts/`` in its results folder."""
    return Path(artifacts) if artifacts else results_dir_of(name, results) / "artifacts"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.as_posix()}"


def _err(src: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{src}: {key}: {msg}")


def _mapping(src: str, key: str, v: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _err(src, key, f"must be a mapping with keys {', '.join(allowed)}, got {type(v).__name__}")
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise _err(src, f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    return dict(v)


def _num(src: str, key: str, v: Any, kind=float, low: float | None = None, allow_none: bool = True):
    if v is None and allow_none:
        return None
    if isinstance(v, str):  # YAML 1.1 reads 5.0e6 (no sign in the exponent) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise _err(src, key, f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if isinstance(v, float) and math.isnan(v):
        raise _err(src, key, "must be a number, got NaN")
    if low is not None and v < low:
        raise _err(src, key, f"must be >= {low:g}, got {v!r}")
    return kind(v)


def _choice(src: str, key: str, v: Any, choices: tuple[str, ...]) -> str:
    if v is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if v not in choices:
        raise _err(src, key, f"{v!r} is not one of {', '.join(choices)}")
    return v


def _constraints(src: str, key: str, v: Any) -> tuple[Constraint, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _err(src, key, "must be a list of {metric, max and/or min, optional of: teacher}")
    out = []
    for i, c in enumerate(v):
        k = f"{key}[{i}]"
        c = _mapping(src, k, c, ("metric", "max", "min", "of"))
        m = c.get("metric")
        if m not in METRICS:
            raise _err(src, f"{k}.metric", f"{m!r} is not a metric; known: {', '.join(METRICS.names())}")
        lo, hi = _num(src, f"{k}.min", c.get("min")), _num(src, f"{k}.max", c.get("max"))
        if lo is None and hi is None:
            raise _err(src, k, "needs max, min or both")
        if lo is not None and hi is not None and lo > hi:
            raise _err(src, k, f"min {lo:g} is above max {hi:g}")
        bad = ([f"max {hi:g}"] if hi is not None and hi <= 0 else []) + ([f"min {lo:g}"] if lo is not None and lo < 0 else [])
        if METRICS.get(m).pipeline and bad:
            raise _err(src, k, f"{m} is a time or a size: max must be > 0 and min >= 0, got {bad[0]}")
        of = c.get("of")
        if of is not None:
            if of != "teacher":
                raise _err(src, f"{k}.of", f"{of!r} is not known; 'teacher' makes max/min fractions of the teacher's figure")
            if METRICS.get(m).group != "cost":
                raise _err(src, f"{k}.of", f"fractions of the teacher apply to cost metrics ({', '.join(metrics_in('cost'))}), not {m}")
        out.append(Constraint(m, max=hi, min=lo, of=of))
    return tuple(out)


def study_from_dict(data: Any, source: str = "<dict>") -> StudyConfig:
    src = source
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: a study must be a YAML mapping with keys {', '.join(_TOP)}")
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise _err(src, unknown[0], f"unknown key; allowed: {', '.join(_TOP)}")
    for key in ("name", "teacher", "space", "objectives"):
        if data.get(key) in (None, "", []):
            raise _err(src, key, "is required")
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(src, "name", f"{name!r} must be letters, digits, '.', '_' or '-' (it names the study and its results folder NAME/)")
    for key in ("teacher", "space", "base", "storage", "results_dir", "artifacts", "description", *EVAL_KEYS):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _err(src, key, f"must be a string, got {data[key]!r}")

    objs = data["objectives"]
    if not isinstance(objs, list):
        raise _err(src, "objectives", "must be a list of {metric, direction}")
    objectives = []
    for i, o in enumerate(objs):
        k = f"objectives[{i}]"
        if isinstance(o, str):
            o = {"metric": o}
        o = _mapping(src, k, o, ("metric", "direction"))
        m = o.get("metric")
        if m not in METRICS:
            raise _err(src, f"{k}.metric", f"{m!r} is not a metric; known: {', '.join(METRICS.names())}")
        d = _choice(src, f"{k}.direction", o.get("direction", METRICS.get(m).direction), DIRECTIONS)
        objectives.append(Objective(m, d))
    if len({o.metric for o in objectives}) != len(objectives):
        raise _err(src, "objectives", "names a metric twice")

    cost = _mapping(src, "cost", data.get("cost"), ("resolution", "batch"))
    lat = _mapping(src, "latency", data.get("latency"), ("mode", "device", "dtype", "table"))
    lat_mode = _choice(src, "latency.mode", lat.get("mode", "off"), LATENCY_MODES.names())
    smp = _mapping(src, "sampler", data.get("sampler"), ("name", "seed", "population_size", "n_startup_trials"))
    sampler = _choice(src, "sampler.name", smp.pop("name", "tpe"), SAMPLERS.names())
    seed = _num(src, "sampler.seed", smp.pop("seed", 0), int, allow_none=False)
    for k in ("population_size", "n_startup_trials"):
        if k in smp:
            smp[k] = _num(src, f"sampler.{k}", smp[k], int, low=2 if k == "population_size" else 0, allow_none=False)
    hb = _mapping(src, "heartbeat", data.get("heartbeat"), ("interval", "grace", "max_retry"))

    enq = data.get("enqueue") or []
    if isinstance(enq, str):
        enq = [enq]
    if not isinstance(enq, list) or not all(isinstance(e, str) for e in enq):
        raise _err(src, "enqueue", f"must be a list of candidate preset names or files, got {enq!r}")

    proxy_keys = tuple(k for k in ProxySettings.__dataclass_fields__ if k not in ("weights", *EVAL_KEYS))
    proxy = _mapping(src, "proxy", data.get("proxy"), proxy_keys)
    for k, v in proxy.items():
        if k in ("sampler_steps", "guidance") and v is None:
            continue
        if k == "lr_schedule":
            proxy[k] = _choice(src, "proxy.lr_schedule", v, LR_SCHEDULES)
            continue
        kind = float if k in ("lr", "guidance") else int
        proxy[k] = _num(src, f"proxy.{k}", v, kind, low=0 if k in ("seed", "lr_warmup_steps") else 1e-12, allow_none=False)
    for k in EVAL_KEYS:  # top-level keys: what the proxy trains on and scores on
        if data.get(k) is not None:
            proxy[k] = data[k]
    if data.get("data") is not None:
        try:
            parse_data_spec(data["data"])
        except ConfigError as e:
            raise _err(src, "data", str(e)) from None
    if data.get("eval_prompts") is not None:
        try:
            load_eval_set(data["eval_prompts"], classifier=data.get("classifier"))
        except ConfigError as e:
            raise _err(src, "eval_prompts", str(e)) from None
    elif data.get("classifier") is not None:
        raise _err(src, "classifier", "needs eval_prompts: (labelled prompts for the classifier to check)")

    pipeline = None
    if data.get("pipeline") is not None:
        pp = _mapping(src, "pipeline", data["pipeline"], PIPELINE_KEYS)
        if pp.get("table") is not None and not isinstance(pp["table"], str):
            raise _err(src, "pipeline.table", f"must be a string, got {pp['table']!r}")
        pipeline = PipelineSpec(
            steps=_num(src, "pipeline.steps", pp.get("steps"), int, low=1),
            guidance=_num(src, "pipeline.guidance", pp.get("guidance"), float, low=0),
            resolution=_num(src, "pipeline.resolution", pp.get("resolution"), int, low=8),
            images=_num(src, "pipeline.images", pp.get("images", 1), int, low=1, allow_none=False),
            memory=_choice(src, "pipeline.memory", pp.get("memory", "predict"), MEMORY_MODES), table=pp.get("table"))

    fidelity = None
    if data.get("fidelity") is not None:
        fidelity = Fidelity.from_dict(data["fidelity"], f"{src}: fidelity")
        given = proxy.get("distill_steps")
        if given is not None and given != fidelity.first:
            raise _err(src, "proxy.distill_steps", f"{given} differs from fidelity.rungs[0] ({fidelity.first}); with fidelity the "
                       "rungs set the distillation steps: leave proxy.distill_steps out")
        proxy["distill_steps"] = fidelity.first
        dc = DistillConfig(lr_schedule=proxy.get("lr_schedule", "constant"))
        if not dc.length_free:
            raise _err(src, "fidelity.rungs", f"proxy.lr_schedule {dc.lr_schedule} sets the rate by the run's length, so the "
                       f"checkpoint at {fidelity.first} steps cannot continue to {fidelity.rungs[1] if len(fidelity.rungs) > 1 else 'a later rung'}; "
                       "use lr_schedule constant or constant_with_warmup")

    cfg = StudyConfig(
        name=name, teacher=data["teacher"], space=data["space"], objectives=tuple(objectives),
        constraints=_constraints(src, "constraints", data.get("constraints")), base=data.get("base"),
        resolution=_num(src, "cost.resolution", cost.get("resolution"), int, low=8),
        batch=_num(src, "cost.batch", cost.get("batch", 1), int, low=1, allow_none=False),
        latency_mode=lat_mode, latency_device=str(lat.get("device", "cpu")), latency_dtype=lat.get("dtype"),
        latency_table=lat.get("table"), sampler=sampler, sampler_options=smp, seed=seed,
        trials=_num(src, "trials", data.get("trials", 20), int, low=1),
        timeout=_num(src, "timeout", data.get("timeout"), float, low=1),
        enqueue=tuple(enq), proxy=proxy, prefilter=_constraints(src, "prefilter", data.get("prefilter")),
        storage=data.get("storage"), results=data.get("results_dir"), artifacts=data.get("artifacts"),
        heartbeat_interval=_num(src, "heartbeat.interval", hb.get("interval", 10), int, low=1, allow_none=False),
        heartbeat_grace=_num(src, "heartbeat.grace", hb.get("grace", 30), int, low=1, allow_none=False),
        max_retry=_num(src, "heartbeat.max_retry", hb.get("max_retry", 3), int, low=0, allow_none=False),
        wandb=_choice(src, "wandb", data.get("wandb", "off"), WANDB_MODES),
        max_failures=_num(src, "max_failures", data.get("max_failures", 5), int, low=1, allow_none=False),
        description=data.get("description") or "", fidelity=fidelity, pipeline=pipeline, source=src,
    )
    if cfg.trials is None and cfg.timeout is None:
        raise _err(src, "trials", "a study needs a trial count, a timeout, or both")
    if cfg.heartbeat_grace <= cfg.heartbeat_interval:
        raise _err(src, "heartbeat.grace", f"must exceed heartbeat.interval ({cfg.heartbeat_interval}s), got {cfg.heartbeat_grace}")
    for m in ("latency_ms", "pipeline_latency_ms"):
        if m in cfg.metrics and cfg.latency_mode == "off":
            raise _err(src, "latency.mode", f"{m} is an objective or constraint, so latency.mode must be lut or measure")
    if pipeline is not None and not any(m in cfg.metrics for m in pipeline_metrics()):
        raise _err(src, "pipeline", f"sets the request of {' and '.join(pipeline_metrics())}, which are neither objectives nor "
                   "constraints of this study; add one, or remove pipeline")
    if fidelity is not None and not cfg.needs("quality"):
        raise _err(src, "fidelity", f"rungs are distillation steps of the quality proxy, and this study's metrics "
                   f"({', '.join(cfg.metrics)}) need no distillation; add a quality objective such as heldout_mse, or remove fidelity")
    for c in cfg.prefilter:
        if METRICS.get(c.metric).group == "quality":
            raise _err(src, "prefilter", f"{c.metric} needs the distillation; a pre-filter takes cost or zero-cost metrics only")
    return cfg


def load_study_config(path: str | Path) -> StudyConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist (a YAML file such as experiments/quickstart.yaml)")
    return study_from_dict(read_yaml(p), str(p))
