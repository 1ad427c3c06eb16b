"""One distillation loop, two lengths: the short proxy run and the long final training.

Only the candidate's trainable parts get gradients and optimizer state (A-SDM's progressive
incubation: frozen parts are excluded). The loop stops itself on a NaN or a diverging loss and
returns ``status="failed"`` with the reason instead of raising. With ``ema_decay`` it keeps an
exponential moving average of the trainable weights (diffusers' ``EMAModel``, as the BK-SDM training
scripts do) and hands the student back holding it. The learning rate is constant by default;
``lr_schedule`` takes any of diffusers' schedules in ``LR_SCHEDULES`` over the run's steps.

Scale (Hugging Face accelerate): the same loop runs in one process, or data-parallel over the
processes of ``accelerate launch`` (GPUs of one or several machines, or CPU processes over gloo).
``batch_size`` is the *global* batch of one optimizer step; it is split into ``processes x
gradient_accumulation`` micro-batches. Every process draws the same global batch (data, guidance
dropout, noise, timesteps) from one generator seeded with ``seed`` and trains on its own slice, so a
step's gradient is the global batch's mean gradient whatever the layout: one process, several, with
or without accumulation, up to float rounding. Memory options: bf16 or fp16 autocast (fp16 with loss
scaling), gradient checkpointing, 8-bit AdamW (bitsandbytes).

Checkpoints (safetensors + JSON, no pickles) hold the whole state: student, moving average,
optimizer, loss scaler, random generators (hence the data position) and the step; the learning rate
is a function of the step. Each is written atomically into ``checkpoints/step-NNNNNNN`` of the run's
directory, the last ``keep_checkpoints`` are kept, and a resumed run (after Ctrl-C, a crash or
SIGKILL) starts from the newest. One process on the CPU resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from hybridsd_nas.arch import Plan
from hybridsd_nas.build import apply_frozen
from hybridsd_nas.core.checkpoint import generator_states, load_state, restore_generators, save_state
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.data.latents import gather_text
from hybridsd_nas.distill.data import DistillData
from hybridsd_nas.distill.losses import LossWeights, attach_taps, feature_losses, predicted_x0
from hybridsd_nas.sources.conditioning import predict, to_device

# diffusers' learning-rate schedules (``diffusers.optimization.get_scheduler``) that need no more than
# the run's length and warm-up steps
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")  # the rate at a step does not depend on cfg.steps
MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
TRACKERS = ("wandb", "tensorboard", "comet_ml", "aim", "mlflow", "clearml", "dvclive")  # accelerate's, by name
CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, one step-NNNNNNN per save
_STEP_DIR = re.compile(r"^step-(\d+)$")
# settings a resumed run may change: how long it runs, how often it logs, checkpoints and validates,
# and the memory layout (processes, accumulation, gradient checkpointing), which leaves each step's
# gradient the global batch's mean gradient; everything else is the run's recipe
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "validate_every",
                     "gradient_accumulation", "gradient_checkpointing", "divergence_factor", "divergence_patience")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 32  # the global batch of one optimizer step (all processes and accumulation steps)
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    p_uncond: float = 0.1  # captions dropped to "" (classifier-free guidance keeps working)
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    divergence_factor: float = 20.0  # loss above this x its early median for `divergence_patience` steps
    divergence_patience: int = 20
    log_every: int = 10
    checkpoint_every: int = 500  # steps between checkpoints when a checkpoint directory is given; 0 = none
    keep_checkpoints: int = 2  # the newest checkpoints kept; older ones are deleted once a newer one is whole
    # 0 = off; else the decay of an EMA of the trainable weights (diffusers' EMAModel, whose decay also
    # ramps up as (1 + n) / (10 + n) over the first steps), which the student holds at the end of an ok run
    ema_decay: float = 0.0
    # the learning rate over the run (one of LR_SCHEDULES: e.g. "cosine" decays lr to 0 at the last
    # step) after ``lr_warmup_steps`` of linear warm-up from 0; "constant" ignores the warm-up
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"  # "bf16" or "fp16" (with loss scaling): the forwards under autocast
    gradient_accumulation: int = 1  # micro-batches per process and optimizer step
    gradient_checkpointing: bool = False  # recompute the student's block activations in the backward pass
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)
    validate_every: int = 0  # steps between validation passes (the caller's ``validate``); 0 = none

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps {self.lr_warmup_steps} is negative; use 0 or more steps")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"unknown mixed precision {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        for name in ("batch_size", "gradient_accumulation", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")
        if self.batch_size % self.gradient_accumulation:
            raise ConfigError(f"global batch {self.batch_size} is not divisible by {self.gradient_accumulation} "
                              f"gradient accumulation steps; use a multiple of {self.gradient_accumulation}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = self.weights.as_dict()
        return d

    def recipe(self) -> dict[str, Any]:
        """The settings a resumed run must keep (all but ``RESUMABLE_CHANGES``; the step count too
        when the learning rate depends on it)."""
        d = {k: v for k, v in self.as_dict().items() if k not in RESUMABLE_CHANGES}
        if not self.length_free:
            d["steps"] = self.steps
        return d

    @property
    def length_free(self) -> bool:
        """Whether the learning rate at a step is independent of the run's length (constant, or constant
        after a warm-up): only then can a checkpoint continue to more steps than it was started for."""
        return self.lr_schedule in LENGTH_FREE_SCHEDULES


@dataclass
class DistillResult:
    status: RunStatus
    reason: str | None
    steps_done: int
    seconds: float
    curve: list[dict[str, float]]
    feature_rule: list[dict[str, str]]
    trainable_params: int
    frozen_params: int
    config: dict[str, Any]
    ema: dict[str, Any] | None = None  # with ema_decay: the decay reached and the steps averaged
    # where and how fast it ran: processes, device, micro-batch, images per second of this call
    throughput: dict[str, Any] | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)  # what ``validate`` returned, by step
    checkpoint: str | None = None  # the newest checkpoint written or resumed from
    resumed_from: int = 0  # the step this call started at (0: from the start)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# the EMA of each student while ``distill`` trains it, for ``averaged_weights`` (e.g. inside on_step)
_RUNNING_EMA: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, list[nn.Parameter]]]" = weakref.WeakKeyDictionary()


@contextmanager
def averaged_weights(student: nn.Module):
    """Inside the block ``student`` holds its moving-average weights (a ``distill`` run with
    ``ema_decay`` must be training it, e.g. from ``on_step``); its own weights come back after."""
    if student not in _RUNNING_EMA:
        raise ValueError("this student has no moving average: averaged_weights works inside a distill run "
                         "with DistillConfig(ema_decay > 0), e.g. from its on_step callback")
    ema, params = _RUNNING_EMA[student]
    ema.store(params)
    ema.copy_to(params)
    try:
        yield student
    finally:
        ema.restore(params)


def has_moving_average(student: nn.Module) -> bool:
    """Whether a running ``distill`` keeps a moving average of ``student`` (see :func:`averaged_weights`)."""
    return student in _RUNNING_EMA


def check_precision(mixed_precision: str, device: str | torch.device) -> None:
    """One-line ConfigError where ``device`` cannot run ``mixed_precision``."""
    dev = torch.device(device)
    if mixed_precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"mixed precision fp16 needs a CUDA GPU (loss scaling); on {dev.type} use bf16 or no")
    if mixed_precision == "bf16":
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"mixed precision bf16 is not supported by {torch.cuda.get_device_name(dev)}; use fp16 or no")
        if dev.type not in ("cuda", "cpu"):
            raise ConfigError(f"mixed precision bf16 is not supported on {dev.type}; use no")


def micro_batch(cfg: DistillConfig, processes: int) -> int:
    """The examples one process trains on per forward: global batch / (processes x accumulation)."""
    parts = processes * cfg.gradient_accumulation
    if cfg.batch_size % parts:
        raise ConfigError(f"global batch {cfg.batch_size} is not divisible by {processes} processes x "
                          f"{cfg.gradient_accumulation} gradient accumulation steps (= {parts}); use a multiple of {parts}")
    return cfg.batch_size // parts


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's whole checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [(int(m.group(1)), d) for d in root.glob("step-*") if (m := _STEP_DIR.match(d.name)) and (d / "state.json").is_file()]
    return [d for _, d in sorted(found)]


def check_resume(run_dir: str | Path, cfg: DistillConfig, identity: dict[str, Any] | None = None) -> Path | None:
    """The checkpoint a resume of ``run_dir`` with ``cfg`` starts from (None: none yet), or a one-line
    ConfigError naming what differs: the candidate or teacher (``identity``), or a recipe setting."""
    found = checkpoints(run_dir)
    if not found:
        return None
    last = found[-1]
    meta = json.loads((last / "state.json").read_text())
    for key, want in (identity or {}).items():
        have = meta.get("identity", {}).get(key)
        if have != want:
            raise ConfigError(f"checkpoint {last} is of {key} {have!r}, not {want!r}: it belongs to another run; "
                              "give another output directory, or start again with --overwrite")
    saved = meta.get("recipe", {})
    for key, want in cfg.recipe().items():
        if key in saved and saved[key] != want:
            raise ConfigError(f"resume changes {key} (checkpoint {saved[key]!r}, now {want!r}); resume with the "
                              "checkpoint's settings, or start again with --overwrite")
    return last


def refuse_fresh_start(run_dir: str | Path) -> None:
    """A one-line ConfigError when a fresh start would overwrite ``run_dir``'s checkpoints."""
    found = checkpoints(run_dir)
    if found:
        raise ConfigError(f"{Path(run_dir) / CHECKPOINTS} already holds checkpoints up to {found[-1].name}; resume the run "
                          "(--resume), or start again with --overwrite")


def _target(scheduler, latents, noise, t):
    pt = scheduler.config.get("prediction_type", "epsilon")
    if pt == "epsilon":
        return noise
    if pt == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"prediction_type {pt!r} is not supported; supported: epsilon, v_prediction")


def _lr_scheduler(opt: torch.optim.Optimizer, cfg: DistillConfig, start: int):
    """diffusers' ``cfg.lr_schedule`` from ``cfg.lr`` over ``cfg.steps``, positioned at step ``start``
    (a resumed run: the rate is a function of the step, so a checkpoint need not hold the schedule)."""

    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
    return get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps,
                         last_epoch=start - 1)


def _optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 (optional: only 8-bit AdamW needs it)
        except ImportError as e:
            raise ConfigError(f"optimizer adamw8bit needs bitsandbytes ({e}); pip install bitsandbytes, or use adamw") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _peak_memory_mib(dev: torch.device) -> dict[str, float]:
    if dev.type == "cuda":
        return {"memory_peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20}
    return {"rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Checkpoints:
    """Saves and loads the run's state in ``run_dir/checkpoints`` (main process writes)."""

    def __init__(self, run_dir: Path, acc: Accelerator, cfg: DistillConfig, identity: dict[str, Any]):
        self.root, self.acc, self.cfg, self.identity = run_dir / CHECKPOINTS, acc, cfg, identity
        self.last: Path | None = None

    def save(self, step: int, student: nn.Module, opt, curve: list, gens: dict[str, torch.Generator], ema, ema_names,
             scaler, wait: bool = True) -> None:
        if self.acc.is_main_process:
            tensors: dict[str, dict[str, torch.Tensor]] = {"student": student.state_dict(), "rng": generator_states(gens)}
            tensors["rng"]["torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors["rng"]["cuda"] = torch.cuda.get_rng_state()
            meta: dict[str, Any] = {"step": step, "curve": curve, "identity": self.identity, "recipe": self.cfg.recipe(),
                                    "settings": self.cfg.as_dict(), "processes": self.acc.num_processes}
            if ema is not None:
                tensors["ema"] = dict(zip(ema_names, ema.shadow_params))
                meta["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            if scaler is not None:
                meta["scaler"] = scaler.state_dict()
            self.last = save_state(self.root / f"step-{step:07d}", tensors, meta, optimizer=opt)
            for old in checkpoints(self.root.parent)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if wait:
            self.acc.wait_for_everyone()

    def load(self, student: nn.Module, opt, gens: dict[str, torch.Generator], ema, ema_names, scaler) -> tuple[int, list]:
        last = check_resume(self.root.parent, self.cfg, self.identity)
        if last is None:
            return 0, []
        tensors, meta = load_state(last, ["student", "rng", "ema"], optimizer=opt, optional=("ema",))
        student.load_state_dict(tensors["student"], strict=True)
        restore_generators(gens, tensors["rng"])
        torch.set_rng_state(tensors["rng"]["torch"])
        if "cuda" in tensors["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng"]["cuda"])
        if ema is not None:
            if "ema" not in meta or "ema" not in tensors:
                raise ConfigError(f"checkpoint {last} holds no moving average of the weights; resume it without ema_decay "
                                  "(--ema-decay 0), or start the run again to average its weights")
            shadow = tensors["ema"]
            ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n].to(p_.device) for n, p_ in zip(ema_names, ema.shadow_params)]})
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        self.last = last
        return int(meta["step"]), list(meta["curve"])

    def clean_partial(self) -> None:
        """Half-written checkpoints of a killed run (their temporary folders)."""
        if self.acc.is_main_process and self.root.is_dir():
            for tmp in self.root.glob(".step-*"):
                shutil.rmtree(tmp, ignore_errors=True)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    plan: Plan,
    data: DistillData,
    scheduler,
    cfg: DistillConfig | None = None,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    perceptual: Callable[[torch.Tensor], torch.Tensor] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    validate: Callable[[int, nn.Module], dict[str, Any]] | None = None,
    log_with: Sequence[Any] | None = None,
    identity: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` (built from ``plan``) on ``data`` for ``cfg.steps`` steps.

    The data, noise and timestep draws come from one generator seeded with ``cfg.seed``; with the
    constant learning rate (``cfg.lr_schedule``, the default) the student after ``n`` steps of a
    longer run is therefore the student of a run of ``n`` steps (a decaying schedule depends on the
    run's length, so it is not). ``on_step(steps_done, student)`` is called after every optimizer step
    in every process; it must leave the student as it found it. With ``cfg.ema_decay`` it may
    evaluate the moving average inside ``with averaged_weights(student):``; an ok run returns the
    student holding the average (``DistillResult.ema`` says so).

    ``validate(step, student)`` runs in the main process every ``cfg.validate_every`` steps and at the
    end; the figures it returns are logged. ``log_with``: accelerate trackers ("wandb",
    "tensorboard", or tracker objects), which get every loss term, the learning rate, images per
    second and peak memory every ``cfg.log_every`` steps. ``identity`` (e.g. candidate and teacher
    fingerprint) is stored in each checkpoint and must match on resume. In several processes
    (``accelerate launch``) the student must already sit on this process's device
    (``Accelerator().device``); the teacher stays as handed over (frozen; in half precision if the
    caller put it there).
    """
    cfg = cfg or DistillConfig()
    if cfg.ema_decay and not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay {cfg.ema_decay} is not a decay: use a value in (0, 1), e.g. 0.999, or 0 for no moving average")
    w = cfg.weights
    if perceptual is not None and w.perceptual > 0 and decode is None:
        raise ValueError("a perceptual loss needs a decode function (latents -> images)")
    if w.perceptual > 0 and perceptual is None:
        raise ValueError(f"perceptual weight {w.perceptual} given but no perceptual network "
                         "(pass perceptual= and decode=, e.g. from hybridsd_nas.distill.perceptual_term)")
    dev = next(student.parameters()).device
    check_precision(cfg.mixed_precision, dev)
    run_dir = Path(checkpoint_dir) if checkpoint_dir else None
    acc = accelerator or Accelerator(cpu=dev.type == "cpu", log_with=list(log_with) if log_with else None,
                                     project_dir=str(run_dir / "logs") if run_dir else None)
    micro = micro_batch(cfg, acc.num_processes)
    ckpts = _Checkpoints(run_dir, acc, cfg, identity or {}) if run_dir else None
    if ckpts is not None and not resume:
        refuse_fresh_start(run_dir)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    gens = {"data": g}
    # The teacher is frozen for the run and handed back as it came (mode and grad flags).
    teacher_state = (teacher.training, [p_.requires_grad for p_ in teacher.parameters()])
    student.train()
    for p_ in student.parameters():
        p_.requires_grad_(True)
    frozen = set(apply_frozen(student, plan))
    named = [(n, p_) for n, p_ in student.named_parameters() if n not in frozen]
    params = [p_ for _, p_ in named]
    n_train = sum(p_.numel() for p_ in params)
    n_frozen = sum(p_.numel() for n, p_ in student.named_parameters() if n in frozen)
    opt = _optimizer(params, cfg)
    scaler = torch.amp.GradScaler(dev.type) if cfg.mixed_precision == "fp16" else None
    ema, ema_names = None, [n for n, _ in named]
    if cfg.ema_decay:
        ema = EMAModel(params, decay=cfg.ema_decay)
    start, curve = 0, []
    if ckpts is not None:
        ckpts.clean_partial()
        if resume:
            start, curve = ckpts.load(student, opt, gens, ema, ema_names, scaler)
            if start > cfg.steps:
                raise ConfigError(f"checkpoint {ckpts.last} is at step {start}, past this run's {cfg.steps} steps; "
                                  f"give at least {start} steps, or another checkpoint directory")
    lr_sched = _lr_scheduler(opt, cfg, start)
    checkpointing = False
    if cfg.gradient_checkpointing:
        if not getattr(student, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(student).__name__} does not support gradient checkpointing; run without it")
        student.enable_gradient_checkpointing()
        checkpointing = True
    teacher.eval().requires_grad_(False)  # from here on the finally below hands it back as it came
    kinds = {k for k, on in (("block", w.feat_kd), ("mid", w.mid)) if on}
    need_teacher = bool(w.out_kd or w.feat_kd or w.mid or w.perceptual)  # a task-only run skips its forward
    taps = attach_taps(student, teacher, plan, kinds=kinds)
    if ema is not None:
        _RUNNING_EMA[student] = (ema, params)
    model = acc.prepare_model(student, device_placement=False)  # DDP over several processes; itself in one
    autocast = (torch.autocast(dev.type, dtype=HALF[cfg.mixed_precision]) if cfg.mixed_precision != "no"
                else contextlib.nullcontext())
    acp = scheduler.alphas_cumprod
    pred_type = scheduler.config.get("prediction_type", "epsilon")
    n_t = scheduler.config.num_train_timesteps
    rank, procs, accum = acc.process_index, acc.num_processes, cfg.gradient_accumulation
    trackers = bool(log_with)
    if trackers:
        # wandb writes beside the other trackers (OUT.work/logs), not into the working directory
        kwargs = {"wandb": {"dir": str(run_dir / "logs")}} if run_dir and "wandb" in log_with else {}
        if kwargs:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        acc.init_trackers("hybridsd-nas-distill", config=_flat(cfg.as_dict()), init_kwargs=kwargs)
    early: list[float] = []
    over = 0
    status, reason = RunStatus.OK, None
    validation: list[dict[str, Any]] = []
    bar = tqdm(range(start, cfg.steps), desc="distill", disable=not progress or not acc.is_main_process, initial=start,
               total=cfg.steps, leave=False, unit="step")
    step = start
    g_before, stepped = g.get_state(), False
    seen_t, seen_steps, since_t, since_steps = time.perf_counter(), 0, time.perf_counter(), 0
    try:
        for step in bar:
            # where the data stream stood before this step: an interrupt before its update resumes here
            g_before, stepped = g.get_state(), False
            # the whole global batch is drawn in every process (the same draws as one process), then sliced
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
            lat_all, text_all = gather_text(data, idx, cfg.p_uncond, g)
            noise_all = torch.randn(lat_all.shape, generator=g)
            t_all = torch.randint(0, n_t, (lat_all.shape[0],), generator=g)
            sums: dict[str, torch.Tensor] = {}
            for k in range(accum):
                rows = slice((k * procs + rank) * micro, (k * procs + rank + 1) * micro)
                lat, text = lat_all[rows].to(dev), to_device({n: v[rows] for n, v in text_all.items()}, dev)
                noise, t = noise_all[rows].to(dev), t_all[rows].to(dev)
                noisy = scheduler.add_noise(lat, noise, t)
                target = _target(scheduler, lat, noise, t)
                sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(model)
                with sync:
                    with autocast:
                        if need_teacher:
                            with taps.recording(), torch.no_grad():
                                pred_t = predict(teacher, noisy, t, text)
                        with taps.recording():
                            pred_s = predict(model, noisy, t, text)
                    parts: dict[str, torch.Tensor] = {}
                    if w.task:
                        parts["task"] = F.mse_loss(pred_s.float(), target.float())
                    if w.out_kd:
                        parts["out_kd"] = F.mse_loss(pred_s.float(), pred_t.float())
                    feat, mid = feature_losses(taps)
                    if w.feat_kd and feat is not None:
                        parts["feat_kd"] = feat
                    if w.mid and mid is not None:
                        parts["mid"] = mid
                    if w.perceptual and perceptual is not None:
                        a = acp.to(dev)[t].view(-1, 1, 1, 1)
                        with autocast:
                            x0_s = predicted_x0(pred_type, noisy, pred_s, a)
                            x0_t = predicted_x0(pred_type, noisy, pred_t, a)
                            parts["perceptual"] = F.mse_loss(perceptual(decode(x0_s)).float(),
                                                             perceptual(decode(x0_t)).float().detach())
                    loss = sum(getattr(w, n) * v for n, v in parts.items())
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                for n, v in (("loss", loss), *parts.items()):
                    sums[n] = sums.get(n, 0) + v.detach().float() / accum
            names = list(sums)
            vec = torch.stack([sums[n] for n in names])
            if procs > 1:
                vec = acc.reduce(vec, reduction="mean")
            figures = dict(zip(names, vec.tolist()))
            lv = figures.pop("loss")
            if not math.isfinite(lv):
                status, reason = RunStatus.FAILED, f"loss is {lv} at step {step} ({', '.join(f'{k}={v:.4g}' for k, v in figures.items())})"
                break
            if len(early) < 20:
                early.append(lv)
            else:
                ref = sorted(early)[len(early) // 2]
                over = over + 1 if lv > cfg.divergence_factor * ref else 0
                if over >= cfg.divergence_patience:
                    status, reason = RunStatus.FAILED, f"diverged: loss {lv:.4g} above {cfg.divergence_factor}x its early median {ref:.4g} for {over} steps (step {step})"
                    break
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr_now = opt.param_groups[0]["lr"]  # this step's rate (the schedule moves it after the step)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            lr_sched.step()
            if ema is not None:
                ema.step(params)
            stepped = True
            seen_steps += 1
            since_steps += 1
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                curve.append({"step": step, "loss": lv, "lr": lr_now, **figures})
                now = time.perf_counter()
                ips = since_steps * cfg.batch_size / max(now - since_t, 1e-9)
                since_t, since_steps = now, 0
                bar.set_postfix(loss=f"{lv:.4f}", img_s=f"{ips:.1f}")
                if trackers:
                    acc.log({"loss": lv, **{f"loss/{k}": v for k, v in figures.items()}, "lr": lr_now,
                             "images_per_s": ips, **_peak_memory_mib(dev)}, step=step + 1)
            if on_step is not None:
                on_step(step + 1, student)
            done = step + 1
            if validate is not None and cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.steps:
                validation.append(_validate(acc, validate, done, student, trackers))
            if ckpts is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                ckpts.save(done, student, opt, curve, gens, ema, ema_names, scaler)
        else:
            step = cfg.steps
    except KeyboardInterrupt:
        # a consistent state: after this step's update, or before its draws (a half-done step is redone)
        if stepped:
            step += 1
        elif step < cfg.steps:
            g.set_state(g_before)
        status, reason = RunStatus.INTERRUPTED, f"interrupted at step {step}"
        if ckpts is not None and acc.is_main_process:
            opt.zero_grad(set_to_none=True)
            ckpts.save(step, student, opt, curve, gens, ema, ema_names, scaler, wait=False)
    finally:
        _RUNNING_EMA.pop(student, None)
        taps.remove()
        bar.close()
        if checkpointing:
            student.disable_gradient_checkpointing()
        student.eval()
        teacher.train(teacher_state[0])
        for p_, flag in zip(teacher.parameters(), teacher_state[1]):
            p_.requires_grad_(flag)
    if status == RunStatus.OK and ckpts is not None and cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every:
        ckpts.save(cfg.steps, student, opt, curve, gens, ema, ema_names, scaler)
    ema_info = None
    if ema is not None:
        ema_info = {"decay": cfg.ema_decay, "last_decay": ema.cur_decay_value, "steps": ema.optimization_step,
                    "held_by_student": status == RunStatus.OK}
        if status == RunStatus.OK:  # a failed or interrupted run hands back its own last weights (the checkpoint keeps both)
            ema.copy_to(params)
    if status == RunStatus.OK and validate is not None and cfg.validate_every:
        validation.append(_validate(acc, validate, cfg.steps, student, trackers))
    elapsed = time.perf_counter() - seen_t
    throughput = {"processes": procs, "device": str(dev), "micro_batch": micro, "gradient_accumulation": accum,
                  "mixed_precision": cfg.mixed_precision, "steps": seen_steps,
                  "images_per_s": round(seen_steps * cfg.batch_size / elapsed, 3) if seen_steps else None,
                  **{k: round(v, 1) for k, v in _peak_memory_mib(dev).items()}}
    if trackers:
        acc.end_training()
    return DistillResult(status, reason, step if status != RunStatus.OK else cfg.steps, time.perf_counter() - t0, curve,
                         taps.report(), n_train, n_frozen, cfg.as_dict(), ema_info, throughput, validation,
                         str(ckpts.last) if ckpts is not None and ckpts.last else None, start)


def _validate(acc: Accelerator, validate: Callable[[int, nn.Module], dict[str, Any]], step: int, student: nn.Module,
              trackers: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if acc.is_main_process:
        was = student.training
        student.eval()
        try:
            figures = dict(validate(step, student) or {})
        finally:
            student.train(was)
        if trackers:
            acc.log({f"validation/{k}": v for k, v in figures.items() if isinstance(v, (int, float))}, step=step)
    acc.wait_for_everyone()
    return {"step": step, **figures}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

