"""A small distillation run for the tests that need a process of its own: two processes under
``accelerate launch --cpu`` against one, and a run killed with SIGKILL then resumed.

    python -m tests.distill_worker OUT.json RUN_DIR [--steps N] [--accumulation A] [--resume] [--checkpoint-every K]

Builds the tests' tiny SD-1.x teacher and its BK-SDM-Small student (seed 0), trains on synthetic
latents with a global batch of 8, and writes the loss curve and a digest of the final weights
(from the main process) to OUT.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch

from hybridsd_nas.arch import candidate_preset, describe, instantiate, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.distill import DistillConfig, DistillData, distill

from .conftest import TINY_SD1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (a target for SIGKILL)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = instantiate(TINY_SD1, device="cpu")
    arch = describe(TINY_SD1)
    p = plan(arch, candidate_preset("bk-sdm-small", arch))
    student = build_student(p, teacher=teacher, device="cpu")
    g = torch.Generator().manual_seed(0)
    data = DistillData(torch.randn(32, 4, 16, 16, generator=g), torch.randint(0, 2, (32,), generator=g),
                       torch.randn(3, 7, 32, generator=g), ["a", "b"], "synthetic")
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    cfg = DistillConfig(steps=a.steps, batch_size=8, seed=1, log_every=1, gradient_accumulation=a.accumulation,
                        checkpoint_every=a.checkpoint_every, ema_decay=0.9)

    def wait(n, _s):
        if a.sleep:
            import time

            time.sleep(a.sleep)

    r = distill(student, teacher, p, data, sched, cfg, checkpoint_dir=a.run_dir if a.checkpoint_every else None,
                resume=a.resume, on_step=wait)
    if int(os.environ.get("RANK", "0")) == 0:
        digest = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in student.state_dict().values())).hexdigest()
        with open(a.out, "w") as f:
            json.dump({"status": r.status, "curve": r.curve, "digest": digest, "throughput": r.throughput,
                       "weights": {k: v.flatten()[:64].tolist() for k, v in student.state_dict().items()}}, f)


if __name__ == "__main__":
    main()
