"""Distillation throughput on one GPU at paper scale: BK-SDM-Small from an SD-1.5-shaped teacher.

A benchmark for a GPU machine, written to fit one 10-minute run. The teacher has the SD-1.5 U-Net
topology with random weights (nothing is downloaded); the student is its BK-SDM-Small, built with
the teacher's weights. Training data are random latents (4 x 64 x 64 at 512 px) and random CLIP-sized
text embeddings (77 x 768), held in host memory as a real run's cache would be. The loop is
``hybridsd_nas.distill.distill`` with BK-SDM's losses (task, output KD, feature KD), bf16 autocast
and the teacher frozen in bf16.

1. Probe the largest per-GPU batch that fits: a few steps at each of ``--batches`` (ascending) until
   one runs out of memory.
2. Time ``--steps`` steps at the largest batch that fitted (the loop's own rate, after a warm-up).
3. Report images per second, peak memory, and model FLOPs utilisation: FLOPs per image =
   2 x the teacher's forward MACs + 6 x the student's forward MACs (forward and backward; 8x with
   gradient checkpointing, which recomputes the forward), from the cost engine's weight-free count,
   against the GPU's dense bf16 peak.

Writes results/bench_distill_gpu_<device>.json and .md (the device named).

    python benchmarks/bench_distill_gpu.py                      # on the GPU machine
    python benchmarks/bench_distill_gpu.py --smoke --device cpu # the same code path on a tiny U-Net
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s
BF16_PEAK = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.5e12,
             "H100 NVL": 835.5e12, "A100": 312e12, "L40S": 362.05e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165.2e12}
SMOKE_CONFIG = {  # the tests' tiny SD-1.x topology
    "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 4,
    "layers_per_block": 2, "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def peak_flops(name: str) -> float | None:
    for key, flops in BF16_PEAK.items():
        if key in name:
            return flops
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--teacher-preset", default="sd-v1")
    p.add_argument("--student", default="bk-sdm-small")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--batches", default="8,16,32,48,64,96,128", help="per-GPU batches to probe, ascending")
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps at the largest batch that fits")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--examples", type=int, default=512, help="random training examples in host memory")
    p.add_argument("--smoke", action="store_true", help="a tiny U-Net at 128 px: the same code path anywhere, in seconds")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    import torch
    from diffusers import DDPMScheduler

    from hybridsd_nas.arch import candidate_preset, describe, instantiate, plan
    from hybridsd_nas.build import build_student
    from hybridsd_nas.cost import estimate_cost
    from hybridsd_nas.cost.latency import device_label
    from hybridsd_nas.distill import DistillConfig, DistillData, distill
    from hybridsd_nas.distill.trainer import HALF
    from hybridsd_nas.sources import UNET_PRESETS

    dev = torch.device(args.device)
    cfg = dict(SMOKE_CONFIG) if args.smoke else dict(UNET_PRESETS.get(args.teacher_preset))
    # the smoke U-Net's own size (16 x 16 latents): at 4 x 4 latents (1 x 1 at its last stage) torch 2.13's CPU
    # bf16 backward returns gradients that change from call to call (up to 1e34), a kernel defect of those sizes
    res = 128 if args.smoke else args.resolution
    batches = [2, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    steps = 2 if args.smoke else args.steps
    torch.manual_seed(0)
    t_start = time.perf_counter()
    arch = describe(cfg)
    pl = plan(arch, candidate_preset(args.student, arch))
    teacher = instantiate(cfg, device=dev)
    student = build_student(pl, teacher=teacher, device=dev)
    if args.mixed_precision != "no":
        teacher.to(HALF[args.mixed_precision])
    lat_side, ctx = res // 8, int(cfg["cross_attention_dim"])
    g = torch.Generator().manual_seed(0)
    data = DistillData(torch.randn(args.examples, 4, lat_side, lat_side, generator=g),
                       torch.randint(0, 64, (args.examples,), generator=g), torch.randn(65, 77, ctx, generator=g),
                       [f"prompt {i}" for i in range(64)], "random latents and text embeddings")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    build_s = time.perf_counter() - t_start

    def run(batch: int, n: int, model):
        c = DistillConfig(steps=n, batch_size=batch, mixed_precision=args.mixed_precision, checkpoint_every=0,
                          gradient_checkpointing=args.gradient_checkpointing, log_every=10**9)
        return distill(model, teacher, pl, data, sched, c)

    fits, probes = None, []
    for b in batches:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            r = run(b, args.probe_steps, copy.deepcopy(student))
            probes.append({"batch": b, "fits": r.status == "ok", "images_per_s": r.throughput["images_per_s"]})
            if r.status != "ok":
                print(f"batch {b}: the run {r.status}: {r.reason}", file=sys.stderr)
                break
            fits = b
        except torch.OutOfMemoryError:
            probes.append({"batch": b, "fits": False, "reason": "out of memory"})
            break
        print(f"probe batch {b}: {probes[-1]}", flush=True)
    if fits is None:
        print("no batch fits", file=sys.stderr)
        return 1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    model = copy.deepcopy(student)
    run(fits, 2, model)  # warm-up (kernels chosen, allocator settled)
    timed = run(fits, steps, model)
    if timed.status != "ok":
        print(f"the timed run {timed.status}: {timed.reason}", file=sys.stderr)
        return 1
    ips = timed.throughput["images_per_s"]
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    macs_t = estimate_cost(cfg, None, resolution=res).macs
    macs_s = estimate_cost(cfg, candidate_preset(args.student, arch), resolution=res).macs
    flops_img = 2 * macs_t + (8 if args.gradient_checkpointing else 6) * macs_s
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else device_label(dev)
    peak = peak_flops(name) if dev.type == "cuda" and args.mixed_precision != "no" else None
    mfu = ips * flops_img / peak if peak else None
    out = {"device": name, "torch": torch.__version__, "teacher": f"{'tiny test config' if args.smoke else args.teacher_preset} "
           "(random weights)", "student": args.student, "resolution": res, "mixed_precision": args.mixed_precision,
           "gradient_checkpointing": args.gradient_checkpointing, "losses": "task + output KD + feature KD (BK-SDM)",
           "largest_batch": fits, "probes": probes, "timed_steps": steps, "images_per_s": ips,
           "peak_memory_gib": round(peak_mem, 2) if peak_mem else None, "teacher_gmacs": round(macs_t / 1e9, 2),
           "student_gmacs": round(macs_s / 1e9, 2), "tflops_per_image": round(flops_img / 1e12, 4),
           "achieved_tflops": round(ips * flops_img / 1e12, 2), "peak_tflops": round(peak / 1e12, 1) if peak else None,
           "mfu": round(mfu, 4) if mfu is not None else None, "build_seconds": round(build_s, 1),
           "total_seconds": round(time.perf_counter() - t_start, 1), "smoke": args.smoke}
    print(json.dumps(out, indent=1))
    if args.smoke:
        return 0
    label = name.replace(" ", "-")
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"bench_distill_gpu_{label}.json").write_text(json.dumps(out, indent=1))
    mfu_txt = f"{mfu * 100:.1f}% of {out['peak_tflops']} TFLOP/s" if mfu is not None else "n/a (peak unknown)"
    (dest / f"bench_distill_gpu_{label}.md").write_text(
        f"# Distillation throughput on {name}\n\n"
        f"Made by `python benchmarks/bench_distill_gpu.py`: {args.student} from a {args.teacher_preset}-shaped teacher (random "
        f"weights), {res} px, {args.mixed_precision}, BK-SDM losses, one GPU, batch {fits} (the largest of {batches} that fitted), "
        f"{steps} timed steps after a warm-up; torch {torch.__version__}.\n\n"
        f"| images/s | peak memory | TFLOP/s achieved | MFU |\n|---:|---:|---:|---:|\n"
        f"| {ips:.1f} | {out['peak_memory_gib']} GiB | {out['achieved_tflops']} | {mfu_txt} |\n\n"
        f"FLOPs per image: 2 x teacher forward ({out['teacher_gmacs']} GMACs) + 6 x student forward ({out['student_gmacs']} GMACs)"
        f" = {out['tflops_per_image']} TFLOPs. Goal: MFU of 20% or more.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
