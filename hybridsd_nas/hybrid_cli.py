"""``hybridsd-nas hybrid`` and ``hybridsd-nas hybrid-sweep``: wire with ``register(subparsers)``.

Each handler returns an exit code; user mistakes raise :class:`~hybridsd_nas.errors.HybridSDError`
subclasses, which the main CLI prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import HybridSDError


def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HybridSDError(f"{what} must be a number, got {text!r}") from None


def cmd_hybrid(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .hybrid import HybridPipeline, Link, parse_steps
    from .pipeline import load_pipeline

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
    share = cost["cloud_share"]
    print(f"{len(files)} image(s) in {out}; schedule " + ", ".join(f"{s['model']} x{s['steps']} ({s['location']})" for s in hp.schedule()))
    print(f"cloud share: {100 * share['steps']:.1f}% of steps, {100 * share['unet_macs']:.1f}% of U-Net MACs, "
          f"{100 * share['all_macs']:.1f}% of all MACs; {cost['bytes_sent']} bytes sent; summary in cost_summary.json")
    return 0


def cmd_hybrid_sweep(args: argparse.Namespace) -> int:
    from .hybrid import SweepSettings, plot, run_sweep, write_csv

    if len(args.unets) != 2:
        raise HybridSDError(f"--unets takes two U-Nets (large, small), got {len(args.unets)}")
    st = SweepSettings(steps=args.steps, step_every=args.step_every, orders=args.orders, samples=args.samples,
                       seed=args.seed, guidance=args.guidance, batch=args.batch, device=args.device)
    r = run_sweep(args.teacher, args.unets, st, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(r, out / "hybrid_sweep.csv")
    (out / "hybrid_sweep.json").write_text(json.dumps(r, indent=1, default=str))
    plot([r], out / "hybrid_sweep.png", "fid")
    print(f"{len(r['rows'])} rows in {out / 'hybrid_sweep.csv'}, plot {out / 'hybrid_sweep.png'} ({r['seconds']:.0f} s)")
    return 0


def register(subparsers) -> None:
    """Add ``hybrid`` and ``hybrid-sweep`` to the main CLI's subparsers."""
    sp = subparsers.add_parser("hybrid", help="run several U-Nets over one denoising run; write images and a cost summary")
    sp.add_argument("--teacher", default="tiny", help="teacher pipeline: zoo name, directory or hub id (default: tiny)")
    sp.add_argument("--unets", nargs="+", required=True,
                    help="U-Nets in run order: 'teacher', a candidate preset (built by weight inheritance, not distilled), "
                         "an export directory, a model directory or zoo name")
    sp.add_argument("--steps", required=True, help="steps per U-Net, comma-separated, e.g. 10,15")
    sp.add_argument("--locations", default=None, help="cloud/edge per U-Net, comma-separated (default: cloud,edge,...)")
    sp.add_argument("--vae", default=None, help="decoder: teacher (default), tiny-random, or a diffusers VAE directory")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--guidance", type=float, default=None)
    sp.add_argument("--num-images", type=int, default=1)
    sp.add_argument("--latency", choices=("off", "measure", "lut"), default="off")
    sp.add_argument("--bandwidth-mbps", type=float, default=100.0)
    sp.add_argument("--rtt-ms", type=float, default=50.0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_hybrid)

    sp = subparsers.add_parser("hybrid-sweep", help="sweep the switch step of two U-Nets in both orders: FID, KID, adherence vs cloud share")
    sp.add_argument("--teacher", default="tiny")
    sp.add_argument("--unets", nargs="+", required=True, help="two U-Nets: the large (cloud) one, then the small (edge) one")
    sp.add_argument("--orders", choices=("both", "large-first", "small-first"), default="both")
    sp.add_argument("--steps", type=int, default=25)
    sp.add_argument("--step-every", type=int, default=5)
    sp.add_argument("--samples", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--guidance", type=float, default=5.0)
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_hybrid_sweep)
