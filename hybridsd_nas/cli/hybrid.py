"""``hybrid`` (several U-Nets over one denoising run) and ``hybrid-sweep`` (the switch step swept)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hybridsd_nas.cli.common import (
    add_device,
    add_eval_set,
    add_json,
    add_latency,
    add_out,
    add_parser,
    add_seed,
    add_teacher,
    print_json,
)
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost.pipeline import Link
from hybridsd_nas.hybrid import HybridPipeline, SweepSettings, parse_steps, plot, run_sweep, write_csv
from hybridsd_nas.sources import load_pipeline


def cmd_hybrid(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    if args.num_images < 1:
        raise HybridSDError(f"--num-images must be at least 1, got {args.num_images}")
    locations = args.locations.split(",") if args.locations else None
    pipe = load_pipeline(args.teacher, device=args.device)
    hp = HybridPipeline.from_pipeline(pipe, args.unets, steps, locations=locations, vae=args.vae, teacher=args.teacher)
    n = sum(steps)
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    kw = {"num_inference_steps": n, "generator": gens, "output_type": "np"}
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    imgs = hp([args.prompt] * args.num_images, **kw).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, im in enumerate(imgs):
        f = out / f"image_{i:03d}_seed{args.seed + i}.png"
        Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).save(f)
        files.append(f.name)
    guided = (args.guidance if args.guidance is not None else 7.5) > 1
    cost = hp.cost(batch=args.num_images, guidance=guided, latency=args.latency, device=args.device, prompt=args.prompt,
                   link=Link(args.bandwidth_mbps, args.rtt_ms))
    summary = {"teacher": args.teacher, "prompt": args.prompt, "seed": args.seed, "steps": steps,
               "schedule": hp.schedule(), "vae": hp.vae_name, "images": files, "cost": cost}
    (out / "cost_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.json:
        print_json({"out": str(out), **summary})
        return 0
    share = cost["cloud_share"]
    print(f"{len(files)} image(s) in {out}; schedule " + ", ".join(f"{s['model']} x{s['steps']} ({s['location']})" for s in hp.schedule()))
    print(f"cloud share: {100 * share['steps']:.1f}% of steps, {100 * share['unet_macs']:.1f}% of U-Net MACs, "
          f"{100 * share['all_macs']:.1f}% of all MACs; {cost['bytes_sent']} bytes sent; summary in cost_summary.json")
    return 0


def cmd_hybrid_sweep(args: argparse.Namespace) -> int:
    if len(args.unets) != 2:
        raise HybridSDError(f"--unets takes two U-Nets (large, small), got {len(args.unets)}")
    st = SweepSettings(steps=args.steps, step_every=args.step_every, orders=args.orders, samples=args.samples,
                       seed=args.seed, guidance=args.guidance, batch=args.batch_size, device=args.device,
                       eval_prompts=args.eval_prompts, classifier=args.classifier, clip_model=args.clip_model)
    r = run_sweep(args.teacher, args.unets, st, progress=not (args.quiet or args.json))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_csv(r, out / "hybrid_sweep.csv"), "json": out / "hybrid_sweep.json",
             "plot": plot([r], out / "hybrid_sweep.png", "fid")}
    files["json"].write_text(json.dumps(r, indent=1, default=str))
    if args.json:
        print_json({"rows": len(r["rows"]), "seconds": r["seconds"], **{k: str(v) for k, v in files.items()}})
        return 0
    print(f"{len(r['rows'])} rows in {files['csv']}, plot {files['plot']} ({r['seconds']:.0f} s)")
    return 0


def register(sub) -> None:
    sp = add_parser(sub, "hybrid", help="run several U-Nets over one denoising run; write images and a cost summary")
    add_teacher(sp, default="tiny")
    sp.add_argument("--unets", nargs="+", required=True,
                    help="U-Nets in run order: 'teacher', a candidate preset (built by weight inheritance, not distilled), "
                         "an export directory, a model directory or zoo name")
    sp.add_argument("--steps", required=True, help="steps per U-Net, comma-separated, e.g. 10,15")
    sp.add_argument("--locations", default=None, help="cloud/edge per U-Net, comma-separated (default: cloud,edge,...)")
    sp.add_argument("--vae", default=None, help="decoder: teacher (default), tiny-random, or a diffusers VAE directory")
    sp.add_argument("--prompt", required=True)
    add_seed(sp)
    sp.add_argument("--guidance", type=float, default=None, help="default: the pipeline's (7.5)")
    sp.add_argument("--num-images", type=int, default=1)
    add_latency(sp)
    sp.add_argument("--bandwidth-mbps", type=float, default=Link().bandwidth_mbps)
    sp.add_argument("--rtt-ms", type=float, default=Link().rtt_ms)
    add_device(sp)
    add_out(sp)
    add_json(sp)
    sp.set_defaults(func=cmd_hybrid)

    d = SweepSettings()
    sp = add_parser(sub, "hybrid-sweep", help="sweep the switch step of two U-Nets in both orders: FID, KID, adherence vs cloud share")
    add_teacher(sp, default="tiny")
    sp.add_argument("--unets", nargs="+", required=True, help="two U-Nets: the large (cloud) one, then the small (edge) one")
    sp.add_argument("--orders", choices=("both", "large-first", "small-first"), default=d.orders)
    sp.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default: {d.steps})")
    sp.add_argument("--step-every", type=int, default=d.step_every, help=f"switch-step spacing (default: {d.step_every})")
    sp.add_argument("--samples", type=int, default=d.samples, help=f"(default: {d.samples})")
    add_seed(sp)
    sp.add_argument("--guidance", type=float, default=d.guidance, help=f"(default: {d.guidance})")
    sp.add_argument("--batch-size", type=int, default=d.batch, help=f"images per sampling batch (default: {d.batch})")
    add_eval_set(sp)
    add_device(sp)
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    add_out(sp)
    add_json(sp)
    sp.set_defaults(func=cmd_hybrid_sweep)
