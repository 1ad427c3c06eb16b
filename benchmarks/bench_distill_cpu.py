"""Images per second of hybridsd_nas's distillation loop against minimal plain loops, on the CPU.

A benchmark, not a test. The same student (BK-SDM-Small of the embedded ``tiny`` teacher), the same
encoded data (Fashion-MNIST, 1024 images, 32 px), the same global batch, one process:

- ``task``: the plain diffusers text-to-image training step (noise, timesteps, U-Net forward, MSE
  to the noise, backward, clip, AdamW) against ``distill`` with only the task loss;
- ``bk-sdm``: the same plain step plus the frozen teacher's forward, output KD and feature KD on
  hooked block outputs (BK-SDM's losses) against ``distill`` with its default losses.

Each pair runs interleaved in rounds: one ``distill`` call whose ``on_step`` runs a round of the
plain loop after each round of its own steps (timed apart), so that load on the machine hits both
alike; the figure is the median seconds per step over the rounds after a warm-up round. The trainer's own
extras (moving average, checkpoints, trackers, validation) are off, as in a plain loop. Writes
results/bench_distill_cpu.json and .md.

    python benchmarks/bench_distill_cpu.py --threads 2 --batch 32 --rounds 6 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_step_factory(student, teacher, data, scheduler, batch: int, lr: float, kd: bool, seed: int):
    """A minimal training loop written plainly (the diffusers train_text_to_image step, plus BK-SDM's
    output and feature KD with forward hooks when ``kd``)."""
    import torch
    import torch.nn.functional as F

    from hybridsd_nas.data.latents import gather_text
    from hybridsd_nas.sources.conditioning import predict

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    feats_s, feats_t = {}, {}
    if kd:
        names = [f"down_blocks.{i}" for i in range(len(student.down_blocks))] + [f"up_blocks.{i}" for i in range(len(student.up_blocks))]
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for n in names:
            if n in t_mods:
                s_mods[n].register_forward_hook(lambda m, a, o, n=n: feats_s.__setitem__(n, o[0] if isinstance(o, tuple) else o))
                t_mods[n].register_forward_hook(lambda m, a, o, n=n: feats_t.__setitem__(n, o[0] if isinstance(o, tuple) else o))
    teacher.requires_grad_(False).eval()
    student.train()
    n_t = scheduler.config.num_train_timesteps

    def step() -> None:
        idx = torch.randint(0, len(data), (batch,), generator=g)
        lat, text = gather_text(data, idx, 0.1, g)
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, n_t, (batch,), generator=g)
        noisy = scheduler.add_noise(lat, noise, t)
        pred = predict(student, noisy, t, text)
        loss = F.mse_loss(pred, noise)
        if kd:
            with torch.no_grad():
                pred_t = predict(teacher, noisy, t, text)
            loss = loss + F.mse_loss(pred, pred_t)
            loss = loss + sum(F.mse_loss(feats_s[k], feats_t[k]) for k in feats_s if feats_s[k].shape == feats_t[k].shape)
            feats_s.clear()
            feats_t.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--candidate", default="bk-sdm-small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per pair")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    import torch
    from diffusers import DDPMScheduler

    from hybridsd_nas.build import student_of
    from hybridsd_nas.cost.latency import device_label
    from hybridsd_nas.distill import DistillConfig, LossWeights, distill, distill_data
    from hybridsd_nas.sources.teacher import vae_scale_factor

    torch.set_num_threads(args.threads)
    d = student_of(args.teacher, args.candidate)
    data = distill_data(d.pipe, d.teacher, f"fashion-mnist?limit={args.images}")
    sched = DDPMScheduler.from_config(d.pipe.scheduler.config)
    teacher = d.pipe.unet
    rows = []
    for pair, weights, kd in (("task", LossWeights(task=1.0, out_kd=0.0, feat_kd=0.0), False), ("bk-sdm", LossWeights(), True)):
        s_plain, s_ours = copy.deepcopy(d.student), copy.deepcopy(d.student)
        plain = plain_step_factory(s_plain, teacher, data, sched, args.batch, 5e-4, kd, seed=0)
        times = {"plain": [], "hybridsd_nas": []}
        for _ in range(args.steps):  # warm-up of the plain loop
            plain()
        mark = [time.perf_counter()]

        def interleave(n, _student):
            # after each round of the trainer's steps, a round of the plain loop, timed apart
            if n % args.steps:
                return
            now = time.perf_counter()
            if n > args.steps:  # the trainer's first round is its warm-up
                times["hybridsd_nas"].append((now - mark[0]) / args.steps)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                plain()
            times["plain"].append((time.perf_counter() - t0) / args.steps)
            mark[0] = time.perf_counter()

        cfg = DistillConfig(steps=(args.rounds + 1) * args.steps, batch_size=args.batch, seed=0, weights=weights,
                            log_every=10**9, checkpoint_every=0)
        res = distill(s_ours, teacher, d.plan, data, sched, cfg, on_step=interleave)
        if res.status != "ok":
            print(f"distill {res.status}: {res.reason}", file=sys.stderr)
            return 1
        times["plain"] = times["plain"][1:]  # the same number of rounds as the trainer's
        med = {k: statistics.median(v) for k, v in times.items()}
        overhead = med["hybridsd_nas"] / med["plain"] - 1
        rows.append({"pair": pair, "plain_s_per_step": round(med["plain"], 4), "hybridsd_nas_s_per_step": round(med["hybridsd_nas"], 4),
                     "plain_images_per_s": round(args.batch / med["plain"], 2),
                     "hybridsd_nas_images_per_s": round(args.batch / med["hybridsd_nas"], 2),
                     "overhead": round(overhead, 4), "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()}})
        print(f"{pair}: plain {args.batch / med['plain']:.1f} images/s, hybridsd_nas {args.batch / med['hybridsd_nas']:.1f} "
              f"images/s, overhead {overhead * 100:+.1f}%", flush=True)
    dev = device_label(torch.device("cpu"))
    meta = {"device": dev, "machine": platform.machine(), "threads": args.threads, "dtype": "float32", "teacher": args.teacher,
            "teacher_fingerprint": d.teacher.fingerprint.rsplit("@", 1)[-1], "student": args.candidate,
            "resolution": int(d.pipe.unet.config.sample_size) * vae_scale_factor(d.pipe), "batch": args.batch, "rounds": args.rounds,
            "steps_per_round": args.steps, "data": data.source, "torch": torch.__version__,
            "method": "median seconds per step over interleaved rounds (one distill call; a plain round after each of its "
                      "rounds, timed apart) after one warm-up round"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill_cpu.json").write_text(json.dumps({"meta": meta, "pairs": rows}, indent=1))
    lines = ["# Distillation loop overhead against plain loops (CPU)", "",
             f"Made by `python benchmarks/bench_distill_cpu.py --threads {args.threads} --batch {args.batch} --rounds {args.rounds} "
             f"--steps {args.steps}`: {dev}, {args.threads} threads, float32, teacher `{args.teacher}` ({meta['teacher_fingerprint']}), "
             f"student {args.candidate}, {meta['resolution']} px, global batch {args.batch}, {data.source}. {meta['method']}.", "",
             "| losses | plain loop (images/s) | hybridsd_nas distill (images/s) | overhead |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['plain_images_per_s']:.1f} | {r['hybridsd_nas_images_per_s']:.1f} | {r['overhead'] * 100:+.1f}% |")
    lines += ["", "Target: overhead at most 5%."]
    (out / "bench_distill_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
