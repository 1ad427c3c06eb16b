"""The ``hybridsd-nas`` command line: a thin layer over the library.

User mistakes raise :class:`~hybridsd_nas.errors.HybridSDError`; ``main`` prints its one-line
message and exits with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import HybridSDError

MAIN_TABLE = ("identity", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")


def _fmt_row(label: str, r: dict[str, Any], lat: bool) -> list[str]:
    row = [label, f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.1f}", f"{r['macs_conv_linear'] / 1e9:.1f}"]
    if lat:
        row.append(f"{r['latency_ms']:.1f}" if "latency_ms" in r else "-")
    return row


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _cost_rows(args: argparse.Namespace, candidates: list[str | None]) -> list[dict[str, Any]]:
    from .arch import describe
    from .cost import estimate_cost

    arch = describe(args.unet)
    out = []
    for c in candidates:
        out.append(
            estimate_cost(
                args.unet, c, resolution=args.resolution, batch=args.batch, latency=args.latency,
                device=args.device, dtype=args.dtype, by_block=getattr(args, "by_block", False), arch=arch,
                repeats=args.repeats,
            )
        )
    return out


def _how_measured(r: dict[str, Any]) -> str:
    m = r["measured"]
    s = f"{m['resolution']}x{m['resolution']} px (latent {m['latent']}x{m['latent']}), batch {m['batch']}, {m['text_tokens']} text tokens; MACs counted on the meta device"
    if "latency" in r:
        lt = r["latency"]
        s += f"; latency ({lt['method']}) on {lt['device']}, {lt['dtype']}"
    return s


def cmd_cost(args: argparse.Namespace) -> int:
    cands = args.candidate or [None]
    rows = _cost_rows(args, cands)
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1))
        return 0
    lat = args.latency != "off"
    header = ["candidate", "params (M)", "MACs (G)", "MACs conv+linear (G)"] + (["latency (ms)"] if lat else [])
    labels = [(c if c else "base") if not r["candidate"].get("name") else r["candidate"]["name"] for c, r in zip(cands, rows)]
    _print_table([_fmt_row(lbl, r, lat) for lbl, r in zip(labels, rows)], header)
    if args.by_block:
        for lbl, r in zip(labels, rows):
            print(f"\n{lbl} by block:")
            brow = [[b, f"{v['params'] / 1e6:.2f}", f"{v['macs'] / 1e9:.2f}", f"{v['macs_conv_linear'] / 1e9:.2f}"]
                    for b, v in r["by_block"].items()]
            _print_table(brow, ["block", "params (M)", "MACs (G)", "MACs conv+linear (G)"])
    for r in rows:
        if r.get("surgery_reason"):
            print(f"note: {r['candidate'].get('name') or r['candidate_key']} is built by surgery: {r['surgery_reason']}")
    print(f"\n{args.unet}: {_how_measured(rows[0])}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    args.candidate = list(MAIN_TABLE)
    args.by_block = False
    return cmd_cost(args)


def cmd_presets(args: argparse.Namespace) -> int:
    from .arch import list_candidate_presets
    from .arch.presets import PRESET_DESCRIPTIONS, UNET_PRESETS

    if args.json:
        print(json.dumps({"unet": list(UNET_PRESETS), "candidate": list_candidate_presets()}, indent=1))
        return 0
    print("U-Net presets (--unet):")
    for n in UNET_PRESETS:
        print(f"  {n:<14} {PRESET_DESCRIPTIONS.get(n, '')}")
    print("candidate presets (--candidate), defined on any SD-style base:")
    for n in list_candidate_presets():
        print(f"  {n}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .arch import build_student, describe, describe_module, plan, resolve_candidate

    arch = describe(args.unet)
    cand = resolve_candidate(args.candidate, arch)
    p = plan(arch, cand)
    if args.json:
        print(json.dumps({"unet": arch.source, "candidate": cand.to_dict(), "candidate_key": cand.key,
                          "expressible": p.expressible, "surgery_reason": p.config_reason,
                          "diffusers_config": p.config,
                          "kept_layers": {bp.name: list(bp.kept) for bp in p.blocks}}, indent=1, default=str))
        return 0
    print(f"base {arch.source}:\n{arch.summary()}")
    if not cand.is_identity:
        student = build_student(p)
        print(f"\ncandidate {cand.label} ({cand.key}):")
        print(describe_module(student, p.config or arch.config, cand.label).summary())
        print("\nbuilt from a stock diffusers config" if p.expressible else f"\nbuilt by surgery: {p.config_reason}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from .arch import describe
    from .spaces import list_spaces, load_space, spaces_dir

    if args.space_cmd == "list":
        names = list_spaces()
        if args.json:
            rows = []
            for n in names:
                sp = load_space(n)
                rows.append({"name": sp.name, "version": sp.version, "kind": sp.kind, "description": sp.description, "file": sp.source})
            print(json.dumps(rows, indent=1))
        else:
            print(f"search spaces in {spaces_dir()}:")
            for n in names:
                sp = load_space(n)
                print(f"  {n:<18} v{sp.version}  {sp.kind:<16} {sp.description}")
        return 0
    sp = load_space(args.name)
    arch = describe(args.unet)
    if args.space_cmd == "show":
        d = sp.describe(arch)
        if sp.is_discrete(arch) and (d["raw_size"] or 0) <= 100_000:
            d["count"] = sp.count(arch)
        if args.json:
            print(json.dumps(d, indent=1))
        else:
            print(f"{sp.name} (v{sp.version}, {sp.kind}) on {arch.source}: {sp.description}")
            print(f"file: {sp.source}")
            for k, v in d["dimensions"].items():
                rng = v["choices"] if v["type"] == "categorical" else f"float in [{v['low']}, {v['high']}]"
                print(f"  {k:<16} {rng}")
            size = f"{d['count']} valid candidates" if "count" in d else f"raw size {d['raw_size'] or 'continuous'}"
            print(f"{size}; presets: {', '.join(d['presets']) or '-'}")
        return 0
    # enumerate
    if sp.is_discrete(arch):
        raw = sp.raw_size(arch) or 0
        points = list(sp.enumerate(arch, limit=args.limit))
        total = sp.count(arch) if raw <= 100_000 else None
        how = "enumerated"
    else:
        points = sp.sample(arch, args.limit or 10, seed=args.seed)
        total, how = None, f"sampled (seed {args.seed})"
    if args.json:
        print(json.dumps({"space": sp.name, "space_version": sp.version, "unet": arch.source, "how": how,
                          "count": total, "shown": len(points),
                          "candidates": [p.to_json_obj(sp) for p in points]}, indent=1))
        return 0
    for p in points:
        extra = f"  {p.extra['schedule']}" if "schedule" in p.extra else ""
        print(f"{p.candidate.key}  {json.dumps(dict(p.params), sort_keys=True)}{extra}")
    print(f"{len(points)} shown; {how}; {'count ' + str(total) if total is not None else 'count not enumerated (raw size ' + str(sp.raw_size(arch)) + ')'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Build a candidate from a teacher's weights (layer removal, recombination, channel pruning) and export it."""
    import time

    from .arch import describe, resolve_candidate
    from .export import export_candidate

    t0 = time.perf_counter()
    cand = resolve_candidate(args.candidate, describe(args.teacher))
    out, cost = export_candidate(args.teacher, cand, args.out, base=args.base, device=args.device, seed=args.seed,
                                 overwrite=args.overwrite)
    fmt = "stock diffusers (UNet2DConditionModel.from_pretrained)" if cost["format"] == "diffusers" else "hybridsd (hybridsd_nas.load_unet)"
    res = cost["measured"]["resolution"]
    print(f"{cand.label}: {cost['params'] / 1e6:.2f} M params, {cost['macs'] / 1e9:.2f} GMACs at {res}px -> {out} [{fmt}] "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _distill_data(pipe, spec: str | None, seed: int):
    from .distill import fashion_mnist_data, folder_data, teacher_sample_data

    if spec in (None, "default", "fashion-mnist"):
        return fashion_mnist_data(pipe, n=4096, seed=seed)
    if spec == "teacher-samples":
        from .zoo import eval_prompts, is_zoo_name

        prompts = [r["prompt"] for r in eval_prompts("tiny")] if is_zoo_name("tiny") else ["a photo"]
        return teacher_sample_data(pipe, prompts, n=256, seed=seed)
    return folder_data(pipe, spec)


def cmd_distill(args: argparse.Namespace) -> int:
    """The final training: a long distillation with checkpoints, resume, and an export at the end."""
    from pathlib import Path

    from diffusers import DDPMScheduler

    from .arch import build_student, describe, load_pretrained_unet, plan, resolve_candidate
    from .cost import estimate_cost
    from .distill import DistillConfig, LossWeights, distill
    from .export import export_unet
    from .pipeline import load_pipeline

    arch = describe(args.teacher)
    cand = resolve_candidate(args.candidate, arch)
    p = plan(arch, cand)
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, ema_decay=args.ema_decay,
                        lr_schedule=args.lr_schedule, lr_warmup_steps=args.lr_warmup_steps,
                        weights=LossWeights(task=args.w_task, out_kd=args.w_out, feat_kd=args.w_feat, mid=args.w_mid,
                                            perceptual=args.w_perceptual))
    pipe = load_pipeline(args.teacher, device=args.device)
    base = load_pretrained_unet(args.base, device=args.device) if args.base else None
    student = build_student(p, teacher=pipe.unet, device=args.device, base_unet=base)
    data = _distill_data(pipe, args.data, args.seed)
    work = Path(args.out).with_name(Path(args.out).name + ".work")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    perc, dec = (None, None)
    if args.w_perceptual > 0:
        from .distill import perceptual_term

        perc, dec = perceptual_term(pipe, args.teacher, args.perceptual_net, device=args.device)
    res = distill(student, pipe.unet, p, data, sched, cfg, progress=True, checkpoint_dir=work, resume=args.resume,
                  perceptual=perc, decode=dec)
    if res.status != "ok":
        raise HybridSDError(f"distillation {res.status}: {res.reason}; last checkpoint kept in {work} (rerun with --resume)")
    cost = estimate_cost(args.teacher, cand, arch=arch)
    export_unet(student, p, args.out, teacher_id=str(args.teacher), cost=cost, overwrite=args.overwrite,
                extra={"distill": {k: v for k, v in res.as_dict().items() if k != "curve"}, "data": data.source,
                       "loss_curve": res.curve})
    last = res.curve[-1]["loss"] if res.curve else float("nan")
    averaged = f", exported weights: EMA (decay {res.ema['last_decay']:.4g} at the end)" if res.ema else ""
    print(f"{cand.label}: {res.steps_done} steps in {res.seconds:.0f} s, final loss {last:.4f}{averaged}; "
          f"{res.trainable_params / 1e6:.2f} M trainable, {res.frozen_params / 1e6:.2f} M frozen -> {args.out}")
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from .distill import LossWeights
    from .proxy import ProxySettings, run_proxy

    st = ProxySettings(distill_steps=args.distill_steps, samples=args.samples, seed=args.seed,
                       sampler_steps=args.sampler_steps, guidance=args.guidance, batch_size=args.batch_size,
                       weights=LossWeights(mid=args.w_mid), reference_images=args.reference_images,
                       data_images=args.data_images, kid_subset=args.kid_subset)
    r = run_proxy(args.teacher, args.candidate, st, base=args.base, device=args.device, progress=not args.json,
                  evaluate=not args.no_sampling)
    if args.json:
        print(json.dumps(r, indent=1, default=str))
    else:
        zc = r["zero_cost"]
        print(f"{r['candidate'].get('name') or r['candidate_key']}: status {r['status']}"
              + (f" ({r['reason']})" if r.get("reason") else ""))
        print(f"  zero-cost: output MSE {zc['output_mse']:.4g}, latent-stat shift {zc['latent_stat_shift']:.4g}")
        if r["status"] == "ok":
            print(f"  held-out output MSE {r['heldout_mse']:.5f} (the ranking score: {st.heldout_latents} held-out noisy latents, "
                  f"after {st.distill_steps} steps at batch {st.batch_size}); distill {r['distill_seconds']:.1f} s, "
                  f"held-out {r['heldout_seconds']:.1f} s")
        if r["status"] == "ok" and not args.no_sampling:
            print(f"  proxy FID {r['proxy_fid']:.2f} (vs teacher samples), paired MSE {r['paired_mse']:.5f}, "
                  f"FID real {r['fid_real']:.2f}, KID {r['kid']:.4f}, "
                  f"adherence {100 * r['adherence']:.1f}% (teacher {100 * r['adherence_teacher']:.1f}%)")
            print(f"  eval {r['eval_seconds']:.1f} s; {r['samples']} samples, "
                  f"{r['settings']['sampler_steps']} {r['settings']['sampler']} steps, guidance {r['settings']['guidance']}, "
                  f"seed {args.seed}, {args.device} float32")
    if r["status"] != "ok":
        print(f"hybridsd-nas: error: proxy {r['status']}: {r['reason']}", file=sys.stderr)
        return 2
    return 0


def _add_unet_args(sp: argparse.ArgumentParser, multi: bool) -> None:
    sp.add_argument("--unet", default="sd-v1", help="preset, zoo name, config.json, model directory or hub id (default: sd-v1)")
    if multi:
        sp.add_argument("--candidate", action="append", help="candidate preset or JSON/YAML file (repeatable)")
    sp.add_argument("--resolution", type=int, default=None, help="image resolution in pixels (default: the config's sample_size x VAE scale)")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--latency", choices=("off", "measure", "lut"), default="off")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    sp.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on cuda, else float32)")
    sp.add_argument("--repeats", type=int, default=10, help="timed repeats for --latency measure")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .proxy import ProxySettings

    ap = argparse.ArgumentParser(prog="hybridsd-nas", description="Architecture search and structural pruning of Stable Diffusion U-Nets.")
    ap.add_argument("--version", action="version", version=f"hybridsd-nas {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("cost", help="params, MACs and latency of a U-Net or candidate")
    _add_unet_args(sp, multi=True)
    sp.add_argument("--by-block", action="store_true", help="break the figures down by block")
    sp.set_defaults(func=cmd_cost)

    sp = sub.add_parser("table", help="cost table of a base U-Net and the BK-SDM candidates")
    _add_unet_args(sp, multi=False)
    sp.set_defaults(func=cmd_table)

    sp = sub.add_parser("presets", help="list U-Net and candidate presets")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("describe", help="blocks, layers and units of a U-Net (and of a candidate)")
    sp.add_argument("--unet", default="sd-v1")
    sp.add_argument("--candidate", default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_describe)

    sp = sub.add_parser("prune", help="build a candidate with the teacher's weights and export it")
    sp.add_argument("--teacher", required=True, help="zoo name, model directory or hub id (with weights)")
    sp.add_argument("--candidate", required=True, help="candidate preset or JSON/YAML file")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--base", default=None, help="compressed Base U-Net for recombination candidates (default: built from the teacher)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("distill", help="distil a candidate from its teacher (the final training) and export it")
    sp.add_argument("--teacher", required=True, help="teacher pipeline: zoo name (tiny), directory or hub id")
    sp.add_argument("--candidate", required=True)
    sp.add_argument("--steps", type=int, required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--data", default=None, help="fashion-mnist (default for tiny), teacher-samples, or a folder of image-caption pairs")
    sp.add_argument("--base", default=None, help="compressed Base U-Net for recombination candidates")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=5e-4)
    from .distill import LR_SCHEDULES

    sp.add_argument("--lr-schedule", default="constant",
                    help=f"learning rate over the run, one of diffusers' schedules: {', '.join(LR_SCHEDULES)} (default: constant)")
    sp.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps of the schedule (not of constant)")
    sp.add_argument("--w-task", type=float, default=1.0)
    sp.add_argument("--w-out", type=float, default=1.0)
    sp.add_argument("--w-feat", type=float, default=1.0)
    sp.add_argument("--w-mid", type=float, default=0.0, help="A-SDM mid-block output supervision")
    sp.add_argument("--w-perceptual", type=float, default=0.0,
                    help="perceptual term: frozen classifier features of the decoded predicted clean images")
    sp.add_argument("--perceptual-net", default=None,
                    help="classifier directory for the perceptual term (default: the teacher's eval_classifier)")
    sp.add_argument("--checkpoint-every", type=int, default=500)
    sp.add_argument("--ema-decay", type=float, default=0.0,
                    help="keep an EMA of the trained weights with this decay (e.g. 0.999) and export it; 0 = off (default)")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("proxy", help="quality proxy of a candidate: short distillation, the held-out output MSE, then proxy FID, KID, adherence")
    sp.add_argument("--teacher", default="tiny", help="teacher pipeline (default: the embedded tiny teacher)")
    sp.add_argument("--candidate", required=True)
    sp.add_argument("--distill-steps", type=int, default=ProxySettings.distill_steps)
    sp.add_argument("--no-sampling", action="store_true",
                    help="stop after the held-out output MSE (the ranking score): no samples, no FID, KID or adherence")
    sp.add_argument("--samples", type=int, default=ProxySettings.samples)
    sp.add_argument("--sampler-steps", type=int, default=None)
    sp.add_argument("--guidance", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=ProxySettings.batch_size)
    sp.add_argument("--w-mid", type=float, default=0.0)
    sp.add_argument("--reference-images", type=int, default=1000, help="held-out real images for fid_real (cached)")
    sp.add_argument("--data-images", type=int, default=4096, help="training images encoded for the distillation (cached)")
    sp.add_argument("--kid-subset", type=int, default=50)
    sp.add_argument("--base", default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_proxy)

    sp = sub.add_parser("space", help="list, show and enumerate search spaces (search_spaces/*.yaml)")
    ssub = sp.add_subparsers(dest="space_cmd", required=True)
    s1 = ssub.add_parser("list")
    s1.add_argument("--json", action="store_true")
    for cmd in ("show", "enumerate"):
        s2 = ssub.add_parser(cmd)
        s2.add_argument("name", help="space name (search_spaces/NAME.yaml) or a YAML path")
        s2.add_argument("--unet", default="sd-v1", help="the base U-Net the space is laid over (default: sd-v1)")
        s2.add_argument("--json", action="store_true")
        if cmd == "enumerate":
            s2.add_argument("--limit", type=int, default=None)
            s2.add_argument("--seed", type=int, default=0, help="for sampling a continuous space")
    sp.set_defaults(func=cmd_space)

    from .hybrid_cli import register as register_hybrid
    from .study.cli import register as register_study
    from .zoo.cli import register as register_zoo

    register_zoo(sub)  # command groups that live beside their library code
    register_hybrid(sub)
    register_study(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HybridSDError as e:
        print(f"hybridsd-nas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybridsd-nas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
