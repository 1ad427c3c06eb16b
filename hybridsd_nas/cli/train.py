"""``prune`` (build a candidate with the teacher's weights and export it) and ``distill`` (the final
training, exported at the end)."""

from __future__ import annotations

import argparse
import time

from hybridsd_nas.arch import describe, resolve_candidate
from hybridsd_nas.cli.common import (
    RunFailed,
    add_base_unet,
    add_device,
    add_json,
    add_out,
    add_overwrite,
    add_parser,
    add_seed,
    add_teacher,
    print_json,
)
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.distill import (
    DATA_SOURCES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    TRACKERS,
    DistillConfig,
    LossWeights,
    distill_candidate,
)
from hybridsd_nas.export import export_candidate


def cmd_prune(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cand = resolve_candidate(args.candidate, describe(args.teacher))
    out, cost = export_candidate(args.teacher, cand, args.out, base=args.base_unet, device=args.device, seed=args.seed,
                                 overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({"out": str(out), "candidate": cand.label, "seconds": round(seconds, 2), **cost})
        return 0
    fmt = ("stock diffusers (UNet2DConditionModel.from_pretrained)" if cost["format"] == "diffusers"
           else "hybridsd (hybridsd_nas.load_unet)")
    res = cost["measured"]["resolution"]
    print(f"{cand.label}: {cost['params'] / 1e6:.2f} M params, {cost['macs'] / 1e9:.2f} GMACs at {res}px -> {out} [{fmt}] "
          f"in {seconds:.1f} s")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                        ema_decay=args.ema_decay, lr_schedule=args.lr_schedule, lr_warmup_steps=args.lr_warmup_steps,
                        mixed_precision=args.mixed_precision, gradient_accumulation=args.gradient_accumulation,
                        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                        validate_every=args.validate_every, log_every=args.log_every,
                        weights=LossWeights(task=args.w_task, out_kd=args.w_out, feat_kd=args.w_feat, mid=args.w_mid,
                                            perceptual=args.w_perceptual))
    log_with = [x for x in args.log_with.split(",") if x] if args.log_with else None
    if log_with and (bad := [x for x in log_with if x not in TRACKERS]):
        raise ConfigError(f"unknown tracker {bad[0]!r} in --log-with; valid: {', '.join(TRACKERS)}")
    run = distill_candidate(args.teacher, args.candidate, args.out, cfg, data=args.data, base_unet=args.base_unet,
                            device=args.device, resume=args.resume, overwrite=args.overwrite,
                            perceptual_net=args.perceptual_net, progress=not args.json, resize=args.resize,
                            log_with=log_with, validation_samples=args.validation_samples,
                            eval_prompts=args.eval_prompts, classifier=args.classifier)
    if run.out is None and run.ok:
        return 0  # another process of a data-parallel run: the main process exports and reports
    if not run.ok:
        raise RunFailed(f"distillation {run.result.status}: {run.result.reason}; last checkpoint kept in {run.work_dir} "
                        "(rerun with --resume)")
    if args.json:
        print_json(run.to_dict())
        return 0
    res = run.result
    last = res.curve[-1]["loss"] if res.curve else float("nan")
    averaged = f", exported weights: EMA (decay {res.ema['last_decay']:.4g} at the end)" if res.ema else ""
    tp = res.throughput or {}
    speed = f", {tp['images_per_s']:.1f} images/s" if tp.get("images_per_s") else ""
    print(f"{run.label}: {res.steps_done} steps in {res.seconds:.0f} s{speed}, final loss {last:.4f}{averaged}; "
          f"{res.trainable_params / 1e6:.2f} M trainable, {res.frozen_params / 1e6:.2f} M frozen -> {run.out}")
    return 0


def register(sub) -> None:
    sp = add_parser(sub, "prune", help="build a candidate with the teacher's weights and export it")
    add_teacher(sp)
    sp.add_argument("--candidate", required=True, help="candidate preset or JSON/YAML file")
    add_out(sp)
    add_base_unet(sp)
    add_device(sp)
    add_seed(sp, help="seed of the calibration inputs of data-driven pruning criteria (default: 0)")
    add_overwrite(sp)
    add_json(sp)
    sp.set_defaults(func=cmd_prune)

    d, w = DistillConfig(), LossWeights()
    sp = add_parser(sub, "distill", help="distil a candidate from its teacher (the final training) and export it")
    add_teacher(sp)
    sp.add_argument("--candidate", required=True, help="candidate preset or JSON/YAML file")
    sp.add_argument("--steps", type=int, required=True, help="training steps")
    add_out(sp)
    sp.add_argument("--data", default=None,
                    help=f"training data: {', '.join(DATA_SOURCES)}; options after '?', e.g. hf:DIR?text=caption&limit=1000 "
                         "(docs/data.md; default: fashion-mnist, 4096 images); checked before the teacher is loaded, "
                         "encoded once and cached")
    sp.add_argument("--resize", action="store_true",
                    help="upscale images smaller than the training resolution (default: such an image is an error)")
    add_base_unet(sp)
    sp.add_argument("--batch-size", type=int, default=d.batch_size,
                    help=f"global batch per optimizer step, over all processes and accumulation steps (default: {d.batch_size})")
    sp.add_argument("--gradient-accumulation", type=int, default=d.gradient_accumulation,
                    help="micro-batches per process and step: each process trains on batch / (processes x this) at a time "
                         f"(default: {d.gradient_accumulation})")
    sp.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                    help="autocast the forwards in bf16, or fp16 with loss scaling (CUDA); the teacher runs frozen in it "
                         f"(default: {d.mixed_precision})")
    sp.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the student's activations in the backward pass (less memory, ~30%% more compute)")
    sp.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                    help=f"adamw, or adamw8bit (needs bitsandbytes) (default: {d.optimizer})")
    sp.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    sp.add_argument("--lr-schedule", default=d.lr_schedule,
                    help=f"learning rate over the run, one of diffusers' schedules: {', '.join(LR_SCHEDULES)} "
                         f"(default: {d.lr_schedule})")
    sp.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps,
                    help="linear warm-up steps of the schedule (not of constant)")
    sp.add_argument("--w-task", type=float, default=w.task, help=f"denoising task loss weight (default: {w.task})")
    sp.add_argument("--w-out", type=float, default=w.out_kd, help=f"output distillation weight (default: {w.out_kd})")
    sp.add_argument("--w-feat", type=float, default=w.feat_kd, help=f"feature distillation weight (default: {w.feat_kd})")
    sp.add_argument("--w-mid", type=float, default=w.mid, help=f"A-SDM mid-block output supervision (default: {w.mid})")
    sp.add_argument("--w-perceptual", type=float, default=w.perceptual,
                    help="perceptual term: frozen classifier features of the decoded predicted clean images "
                         f"(default: {w.perceptual})")
    sp.add_argument("--perceptual-net", default=None,
                    help="classifier directory for the perceptual term (default: the teacher's eval_classifier)")
    sp.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help=f"steps between checkpoints in OUT.work/checkpoints (default: {d.checkpoint_every})")
    sp.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                    help=f"the newest checkpoints kept (default: {d.keep_checkpoints})")
    sp.add_argument("--log-every", type=int, default=d.log_every, help=f"steps between logged rows (default: {d.log_every})")
    sp.add_argument("--log-with", default=None,
                    help=f"accelerate trackers, comma-separated: {', '.join(TRACKERS)} (files in OUT.work/logs; "
                         "WANDB_MODE=offline keeps wandb local)")
    sp.add_argument("--validate-every", type=int, default=d.validate_every,
                    help="steps between validation passes: a sample grid and FID against the teacher on the evaluation set "
                         f"(default: {d.validate_every}: only none)")
    sp.add_argument("--validation-samples", type=int, default=64, help="samples per validation pass (default: 64)")
    sp.add_argument("--eval-prompts", default=None,
                    help="evaluation prompts of the validation (.txt/.jsonl/.json; default: the teacher's own)")
    sp.add_argument("--classifier", default=None, help="classifier directory for the validation's prompt adherence")
    sp.add_argument("--ema-decay", type=float, default=d.ema_decay,
                    help="keep an EMA of the trained weights with this decay (e.g. 0.999) and export it; 0 = off "
                         f"(default: {d.ema_decay})")
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT.work/checkpoints")
    sp.add_argument("--device", default="auto",
                    help="auto (the process's GPU under accelerate launch, else cuda if present, else cpu), cpu, cuda, cuda:N "
                         "(default: auto)")
    add_seed(sp)
    add_overwrite(sp)
    add_json(sp)
    sp.set_defaults(func=cmd_distill)
