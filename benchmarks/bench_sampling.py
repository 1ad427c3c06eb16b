"""Seconds to generate 64 images with the embedded ``tiny`` teacher at its default settings.

A benchmark, not a test. Writes results/bench_sampling_<device>.json and prints one line.
  python benchmarks/bench_sampling.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline

    from hybridsd_nas import zoo

    torch.set_num_threads(args.threads)
    info = zoo.model_info(args.model)
    s = info.get("sampling", {})
    steps, guidance = int(s.get("num_inference_steps", 25)), float(s.get("guidance_scale", 4.0))
    prompts = [e["prompt"] for e in zoo.eval_prompts(args.model)]
    prompts = [prompts[i % len(prompts)] for i in range(args.count)]
    pipe = StableDiffusionPipeline.from_pretrained(zoo.model_path(args.model)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts[:2], num_inference_steps=2, guidance_scale=guidance)  # warm-up
    load_before = os.getloadavg()
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, args.count, args.batch):
            pipe(prompts[i : i + args.batch], num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator(args.device).manual_seed(args.seed + i), output_type="np")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU"
    rec = {
        "what": f"generate {args.count} images with '{args.model}' at its default settings",
        "model": args.model, "images": args.count, "batch": args.batch, "sampler": type(pipe.scheduler).__name__,
        "steps": steps, "guidance": guidance, "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor,
        "dtype": "float32", "device": args.device, "device_name": dev, "threads": args.threads,
        "cpu_count": os.cpu_count(), "seed": args.seed, "seconds": [round(t, 2) for t in times],
        "seconds_min": round(min(times), 2),
        "load_average_1_5_15_min_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_min_after": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
        "note": "wall clock of the pipeline calls (text encoding, denoising with classifier-free guidance, VAE decoding); one warm-up call first",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_sampling_{args.device.split(':')[0]}{args.threads if args.device == 'cpu' else ''}.json"
    (out / name).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{args.count} images, {steps} steps, guidance {guidance:g}, {dev} ({args.threads} threads): {min(times):.1f} s -> {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
