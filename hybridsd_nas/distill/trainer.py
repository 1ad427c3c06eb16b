"""One distillation loop, two lengths: the short proxy run and the long final training.

Only the candidate's trainable parts get gradients and optimizer state (A-SDM's progressive
incubation: frozen parts are excluded). The loop stops itself on a NaN or a diverging loss and
returns ``status="failed"`` with the reason instead of raising. Long runs checkpoint periodically
(safetensors + JSON, atomically) and resume from the last checkpoint. With ``ema_decay`` the loop
keeps an exponential moving average of the trainable weights (diffusers' ``EMAModel``, as the
BK-SDM training scripts do) and hands the student back holding it. The learning rate is constant by
default; ``lr_schedule`` takes any of diffusers' schedules in ``LR_SCHEDULES`` over the run's steps.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from hybridsd_nas.arch import Plan
from hybridsd_nas.build import apply_frozen
from hybridsd_nas.core.checkpoint import load_state, save_state
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.status import RunStatus
from hybridsd_nas.data.latents import gather_text
from hybridsd_nas.distill.data import DistillData
from hybridsd_nas.distill.losses import LossWeights, attach_taps, feature_losses, predicted_x0
from hybridsd_nas.sources.conditioning import predict, to_device

# diffusers' learning-rate schedules (``diffusers.optimization.get_scheduler``) that need no more than
# the run's length and warm-up steps
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 32
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
    # 0 = off; else the decay of an EMA of the trainable weights (diffusers' EMAModel, whose decay also
    # ramps up as (1 + n) / (10 + n) over the first steps), which the student holds at the end of an ok run
    ema_decay: float = 0.0
    # the learning rate over the run (one of LR_SCHEDULES: e.g. "cosine" decays lr to 0 at the last
    # step) after ``lr_warmup_steps`` of linear warm-up from 0; "constant" ignores the warm-up
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps {self.lr_warmup_steps} is negative; use 0 or more steps")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = self.weights.as_dict()
        return d


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


def _target(scheduler, latents, noise, t):
    pt = scheduler.config.get("prediction_type", "epsilon")
    if pt == "epsilon":
        return noise
    if pt == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"prediction_type {pt!r} is not supported; supported: epsilon, v_prediction")


def _save_checkpoint(ckpt: Path, student: nn.Module, opt: torch.optim.Optimizer, step: int, curve: list, rng: torch.Generator,
                     ema=None, ema_names: list[str] | None = None) -> None:
    tensors = {"student": student.state_dict()}
    meta: dict[str, Any] = {"step": step, "curve": curve, "rng": rng.get_state().tolist()}
    if ema is not None:
        tensors["ema"] = dict(zip(ema_names, ema.shadow_params))
        meta["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    save_state(ckpt, tensors, meta, optimizer=opt)


def _lr_scheduler(opt: torch.optim.Optimizer, cfg: DistillConfig, start: int):
    """diffusers' ``cfg.lr_schedule`` from ``cfg.lr`` over ``cfg.steps``, positioned at step ``start``
    (a resumed run: the rate is a function of the step, so a checkpoint need not hold the schedule)."""

    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
    return get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps,
                         last_epoch=start - 1)


def _load_checkpoint(ckpt: Path, student: nn.Module, opt: torch.optim.Optimizer, rng: torch.Generator,
                     ema=None, ema_names: list[str] | None = None) -> tuple[int, list]:
    tensors, meta = load_state(ckpt, ["student", "ema"], optimizer=opt, optional=("ema",))
    student.load_state_dict(tensors["student"], strict=True)
    rng.set_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    if ema is not None:
        if "ema" not in meta or "ema" not in tensors:
            raise ConfigError(f"checkpoint {ckpt} holds no moving average of the weights; resume it without ema_decay "
                             "(--ema-decay 0), or start the run again to average its weights")
        shadow = tensors["ema"]
        ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n].to(p_.device) for n, p_ in zip(ema_names, ema.shadow_params)]})
    return int(meta["step"]), list(meta["curve"])


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
) -> DistillResult:
    """Distil ``teacher`` into ``student`` (built from ``plan``) on ``data`` for ``cfg.steps`` steps.

    The data, noise and timestep draws come from one generator seeded with ``cfg.seed``; with the
    constant learning rate (``cfg.lr_schedule``, the default) the student after ``n`` steps of a
    longer run is therefore the student of a run of ``n`` steps (a decaying schedule depends on the
    run's length, so it is not). ``on_step(steps_done, student)`` is called after every optimizer step
    (e.g. to evaluate intermediate students); it must leave the student as it found it. With
    ``cfg.ema_decay`` it may evaluate the moving average inside ``with averaged_weights(student):``;
    an ok run returns the student holding the average (``DistillResult.ema`` says so).
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
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
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
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema, ema_names = None, [n for n, _ in named]
    if cfg.ema_decay:
        ema = EMAModel(params, decay=cfg.ema_decay)
    ckpt = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir else None
    start, curve = 0, []
    if resume and ckpt is not None and ckpt.is_dir():
        start, curve = _load_checkpoint(ckpt, student, opt, g, ema, ema_names)
    lr_sched = _lr_scheduler(opt, cfg, start)
    teacher.eval().requires_grad_(False)  # from here on the finally below hands it back as it came
    taps = attach_taps(student, teacher, plan)
    if ema is not None:
        _RUNNING_EMA[student] = (ema, params)
    acp = scheduler.alphas_cumprod
    pred_type = scheduler.config.get("prediction_type", "epsilon")
    n_t = scheduler.config.num_train_timesteps
    early: list[float] = []
    over = 0
    status, reason = RunStatus.OK, None

    bar = tqdm(range(start, cfg.steps), desc="distill", disable=not progress, initial=start, total=cfg.steps, leave=False)
    step = start
    try:
        for step in bar:
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
            lat, text = gather_text(data, idx, cfg.p_uncond, g)
            dev = next(student.parameters()).device
            lat, text = lat.to(dev), to_device(text, dev)
            noise = torch.randn(lat.shape, generator=g).to(dev)
            t = torch.randint(0, n_t, (lat.shape[0],), generator=g).to(dev)
            noisy = scheduler.add_noise(lat, noise, t)
            target = _target(scheduler, lat, noise, t)
            with torch.no_grad():
                pred_t = predict(teacher, noisy, t, text)
            pred_s = predict(student, noisy, t, text)
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
                x0_s = predicted_x0(pred_type, noisy, pred_s, a)
                x0_t = predicted_x0(pred_type, noisy, pred_t, a)
                parts["perceptual"] = F.mse_loss(perceptual(decode(x0_s)), perceptual(decode(x0_t)).detach())
            loss = sum(getattr(w, k) * v for k, v in parts.items())
            lv = float(loss.detach())
            if not math.isfinite(lv):
                status, reason = RunStatus.FAILED, f"loss is {lv} at step {step} ({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in parts.items())})"
                break
            if len(early) < 20:
                early.append(lv)
            else:
                ref = sorted(early)[len(early) // 2]
                over = over + 1 if lv > cfg.divergence_factor * ref else 0
                if over >= cfg.divergence_patience:
                    status, reason = RunStatus.FAILED, f"diverged: loss {lv:.4g} above {cfg.divergence_factor}x its early median {ref:.4g} for {over} steps (step {step})"
                    break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr_now = opt.param_groups[0]["lr"]  # this step's rate (the schedule moves it after the step)
            opt.step()
            lr_sched.step()
            if ema is not None:
                ema.step(params)
            if on_step is not None:
                on_step(step + 1, student)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                curve.append({"step": step, "loss": lv, "lr": lr_now, **{k: float(v.detach()) for k, v in parts.items()}})
                bar.set_postfix(loss=f"{lv:.4f}")
            if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, student, opt, step + 1, curve, g, ema, ema_names)
        else:
            step = cfg.steps
    except KeyboardInterrupt:
        status, reason = RunStatus.INTERRUPTED, f"interrupted at step {step}"
        if ckpt is not None:
            _save_checkpoint(ckpt, student, opt, step, curve, g, ema, ema_names)
    finally:
        _RUNNING_EMA.pop(student, None)
        taps.remove()
        bar.close()
        student.eval()
        teacher.train(teacher_state[0])
        for p_, flag in zip(teacher.parameters(), teacher_state[1]):
            p_.requires_grad_(flag)
    if status == RunStatus.OK and ckpt is not None and cfg.checkpoint_every:
        _save_checkpoint(ckpt, student, opt, cfg.steps, curve, g, ema, ema_names)
    ema_info = None
    if ema is not None:
        ema_info = {"decay": cfg.ema_decay, "last_decay": ema.cur_decay_value, "steps": ema.optimization_step,
                    "held_by_student": status == RunStatus.OK}
        if status == RunStatus.OK:  # a failed or interrupted run hands back its own last weights (the checkpoint keeps both)
            ema.copy_to(params)
    return DistillResult(status, reason, step if status != RunStatus.OK else cfg.steps, time.perf_counter() - t0, curve,
                         taps.report(), n_train, n_frozen, cfg.as_dict(), ema_info)
