"""``proxy``: the quality proxy of one candidate."""

from __future__ import annotations

import argparse

from hybridsd_nas.cli.common import (
    RunFailed,
    add_base_unet,
    add_device,
    add_eval_set,
    add_json,
    add_parser,
    add_seed,
    add_teacher,
    print_json,
)
from hybridsd_nas.distill import LossWeights
from hybridsd_nas.proxy import ProxyResult, ProxySettings, Stage, run_proxy


def _print(r: ProxyResult, st: ProxySettings, args: argparse.Namespace) -> None:
    zc = r.zero_cost
    print(f"{r.candidate.get('name') or r.candidate_key}: status {r.status}" + (f" ({r.reason})" if r.reason else ""))
    print(f"  zero-cost: output MSE {zc['output_mse']:.4g}, latent-stat shift {zc['latent_stat_shift']:.4g}")
    if not r.ok:
        return
    f = r.figures
    print(f"  held-out output MSE {f['heldout_mse']:.5f} (the ranking score: {st.heldout_latents} held-out noisy latents, "
          f"after {st.distill_steps} steps at batch {st.batch_size}); distill {f['distill_seconds']:.1f} s, "
          f"held-out {f['heldout_seconds']:.1f} s")
    if r.evaluation:
        parts = [f"proxy FID {f['proxy_fid']:.2f} (vs teacher samples)", f"KID {f['kid']:.4f}", f"paired MSE {f['paired_mse']:.5f}"]
        if "fid_real" in f:
            parts.append(f"FID real {f['fid_real']:.2f}")
        if "adherence" in f:
            parts.append(f"adherence {100 * f['adherence']:.1f}% (teacher {100 * f['adherence_teacher']:.1f}%)")
        if "clip_score" in f:
            parts.append(f"CLIP score {f['clip_score']:.2f} (teacher {f['clip_score_teacher']:.2f}), CMMD {f['cmmd']:.3f}")
        print("  " + ", ".join(parts))
        for name, why in f.get("skipped", {}).items():
            print(f"  {name}: not measured ({why})")
        print(f"  eval {f['eval_seconds']:.1f} s; {f['samples']} samples, "
              f"{r.settings['sampler_steps']} {r.settings['sampler']} steps, guidance {r.settings['guidance']}, "
              f"seed {args.seed}, {args.device} float32")


def cmd_proxy(args: argparse.Namespace) -> int:
    st = ProxySettings(distill_steps=args.distill_steps, samples=args.samples, seed=args.seed,
                       sampler_steps=args.sampler_steps, guidance=args.guidance, batch_size=args.batch_size,
                       weights=LossWeights(mid=args.w_mid), reference_images=args.reference_images,
                       data=args.data, data_images=args.data_images, kid_subset=args.kid_subset, eval_prompts=args.eval_prompts,
                       classifier=args.classifier, clip_model=args.clip_model)
    r = run_proxy(args.teacher, args.candidate, st, base=args.base_unet, device=args.device, progress=not args.json,
                  until=Stage.HELDOUT if args.no_sampling else Stage.SAMPLES)
    print_json(r.to_dict()) if args.json else _print(r, st, args)
    if not r.ok:
        raise RunFailed(f"proxy {r.status}: {r.reason}")
    return 0


def register(sub) -> None:
    d = ProxySettings()
    sp = add_parser(sub, "proxy", help="quality proxy of a candidate: short distillation, the held-out output MSE, "
                                       "then proxy FID, KID, adherence")
    add_teacher(sp, default="tiny")
    sp.add_argument("--candidate", required=True, help="candidate preset or JSON/YAML file")
    sp.add_argument("--distill-steps", type=int, default=d.distill_steps, help=f"(default: {d.distill_steps})")
    sp.add_argument("--no-sampling", action="store_true",
                    help="stop after the held-out output MSE (the ranking score): no samples, no FID, KID or adherence")
    sp.add_argument("--samples", type=int, default=d.samples, help=f"evaluation samples (default: {d.samples})")
    sp.add_argument("--sampler-steps", type=int, default=d.sampler_steps, help="default: the teacher's sampling.json, else 20")
    sp.add_argument("--guidance", type=float, default=d.guidance, help="default: the teacher's sampling.json, else 5.0")
    sp.add_argument("--batch-size", type=int, default=d.batch_size, help=f"distillation batch (default: {d.batch_size})")
    sp.add_argument("--w-mid", type=float, default=d.weights.mid, help=f"A-SDM mid-block supervision (default: {d.weights.mid})")
    sp.add_argument("--reference-images", type=int, default=d.reference_images,
                    help=f"held-out real images for fid_real, cached (default: {d.reference_images})")
    sp.add_argument("--data", default=None, metavar="SPEC",
                    help="training data (docs/data.md): fashion-mnist, DIR, hf:DIR, parquet:GLOB, wds:PATTERN, prompts:FILE; "
                         "default: the teacher's own (fashion-mnist for tiny); its last 64 examples are held out for the ranking score")
    sp.add_argument("--data-images", type=int, default=d.data_images,
                    help=f"training images encoded for the distillation, cached (default: {d.data_images})")
    sp.add_argument("--kid-subset", type=int, default=d.kid_subset, help=f"(default: {d.kid_subset})")
    add_eval_set(sp)
    add_base_unet(sp)
    add_seed(sp)
    add_device(sp)
    add_json(sp)
    sp.set_defaults(func=cmd_proxy)
