"""``lut build``: a latency lookup table timed on this machine's device, to be used anywhere;
``lut calibrate``: whole candidates measured on that device, and the table's correction fitted to them."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

from hybridsd_nas.arch import Candidate, UNetArch, describe, resolve_candidate
from hybridsd_nas.cli.common import add_device, add_group, add_json, add_parser, add_teacher, print_json
from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.cost import build_table
from hybridsd_nas.cost.calibrate import MIN_CANDIDATES, calibrate
from hybridsd_nas.cost.latency import check_device, parse_dtype
from hybridsd_nas.cost.lut import REPEATS, SANITY_RATIO, STATISTIC, TIMING_MODES, WARMUP, LatencyTable, default_resolution
from hybridsd_nas.cost.request import PipelineParts, Request, time_components
from hybridsd_nas.spaces import list_spaces, load_space


def preset_candidates(arch: UNetArch) -> tuple[list[Candidate], list[str]]:
    """The presets of every known space that apply to ``arch``, and those that do not (named)."""
    out: dict[str, Candidate] = {}
    skipped = []
    for name in list_spaces():
        try:
            presets = load_space(name).presets(arch)
        except HybridSDError as e:  # a preset this teacher cannot express (its blocks differ)
            skipped.append(f"{name}: {e}")
            continue
        for c in presets.values():
            out.setdefault(c.key, c)
    return list(out.values()), skipped


def space_candidates(arch: UNetArch, names: list[str], exhaustive: bool) -> tuple[Iterator[Candidate], list[str]]:
    """Each named space's presets and unit cover (lazily), and the labels the table records them by."""
    spaces = [load_space(n) for n in names]  # an unknown name: one line, before anything is traced
    labels = [f"{s.name}@{s.version}" + (":exhaustive" if exhaustive else "") for s in spaces]
    return itertools.chain.from_iterable(itertools.chain(s.presets(arch).values(), s.unit_cover(arch, exhaustive))
                                         for s in spaces), labels


def cmd_build(args: argparse.Namespace) -> int:
    arch = describe(args.teacher)
    parts = PipelineParts(args.teacher, arch) if args.pipeline else None  # no text encoder or VAE: one line, before timing
    presets, skipped = preset_candidates(arch)
    extra, labels = space_candidates(arch, args.space or [], args.exhaustive)
    if args.timing is None and not args.rebuild and Path(args.out).is_file():  # an existing table is extended as it was timed
        args.timing = LatencyTable.open(args.out).timing
    table, summary = build_table(args.teacher, itertools.chain(presets, extra), out=args.out, device=args.device,
                                 dtype=args.dtype, resolution=args.resolution, batch=args.batch_size, warmup=args.warmup,
                                 repeats=args.repeats, covers=["presets", *labels], rebuild=args.rebuild, arch=arch,
                                 progress=not args.json, timing=args.timing)
    if parts is not None:  # one image per request: the keys a study's default request looks up
        one = Request(steps=1, guidance=1.0, resolution=table.resolution)
        figs = time_components(parts, one, args.device, table.dtype, warmup=args.warmup, repeats=args.repeats)
        table.add_components({parts.key(k, one.images, one.resolution): f for k, f in figs.items()})
        summary["components"] = {k: f["ms"] for k, f in figs.items()}
    m, s = table.meta, summary.get("sanity") or {}
    if args.json:
        print_json({"table": str(table.path), **summary, "meta": m, "skipped_presets": skipped})
        return 0
    what = f"timed {summary['timed']} unit shapes now" if summary["timed"] else "nothing to time (already built, by this or another worker)"
    print(f"latency table {table.path}: {summary['units']} unit shapes; {what}")
    print(f"measured on {m['device']}, {m['dtype']}, {m['resolution']} px, batch {m['batch']}, torch {m['torch']}, diffusers "
          f"{m['diffusers']}; {m['timing']} forward, {m['statistic']} of {m['repeats']} repeats; build {m['build_id']} ({m['built']})")
    if s:
        print(f"teacher: whole forward {s['measured_ms']:.3g} ms, its units {s['units_ms']:.3g} ms (within {SANITY_RATIO:g}x), "
              f"overhead {s['ms']:.3g} ms")
    if parts is not None:
        c = summary["components"]
        print(f"pipeline, one image: text encoder {c['text_encoder']:.3g} ms per call, VAE decoder {c['decoder']:.3g} ms")
    for line in skipped:
        print(f"note: presets skipped, {line}")
    print(f"use it on any machine: hybridsd-nas cost --teacher {args.teacher} --latency lut --table {table.path}")
    return 0


def calibration_candidates(arch: UNetArch, names: list[str], space: str | None, count: int, seed: int) -> list[Candidate]:
    """The named candidates, then ``count`` random points of ``space``; without either, the presets of every space."""
    out = {c.key: c for c in (resolve_candidate(n, arch) for n in names)}
    if space:
        for pt in load_space(space).sample(arch, count, seed=seed):
            out.setdefault(pt.candidate.key, pt.candidate)
    if not names and not space:
        out = {c.key: c for c in preset_candidates(arch)[0]}
    return list(out.values())


def cmd_calibrate(args: argparse.Namespace) -> int:
    arch = describe(args.teacher)
    cands = calibration_candidates(arch, args.candidate or [], args.space, args.count, args.seed)
    if len(cands) < MIN_CANDIDATES:  # before anything is timed
        raise ConfigError(f"calibration needs at least {MIN_CANDIDATES} distinct candidates, these options give {len(cands)}; "
                            f"add --candidate NAME or --space NAME --count K")
    dev = check_device(args.device)
    dt = parse_dtype(args.dtype) if args.dtype else None
    if args.table and Path(args.table).is_file():  # the table's own settings, unless asked otherwise (then a one-line mismatch)
        opened = LatencyTable.open(args.table)
        opened.check(args.resolution, dt, args.batch_size)
        dt, res, batch, timing = opened.dtype, opened.resolution, opened.batch, opened.timing
        if args.timing and args.timing != timing:
            raise ConfigError(f"latency table {args.table} was timed {timing}, not {args.timing}; calibrate it as it was timed "
                              "(a whole forward and its units must run the same way)")
    else:
        res, batch, timing = args.resolution or default_resolution(args.teacher, arch), args.batch_size or 1, args.timing
    dt = dt or parse_dtype("float16" if dev.type == "cuda" else "float32")
    table = LatencyTable(str(dev), dt, res, batch, path=args.table, timing=timing)
    cal = calibrate(args.teacher, cands, table, arch=arch, progress=not args.json)
    if args.json:
        print_json({"table": str(table.path), "calibration": cal})
        return 0
    print(f"latency table {table.path}: calibrated on {cal['candidates']} whole candidates measured on {table.meta['device']} "
          f"({table.meta['statistic']} of {table.meta['repeats']} repeats)")
    print(f"fit: {cal['model']}, " + ", ".join(f"{k} {v:.4g}" for k, v in cal["coef"].items()))
    print(f"{'candidate':<28}{'measured ms':>13}{'table ms':>11}{'error %':>9}{'LOO error %':>13}")
    for pt in cal["points"]:
        print(f"{pt['candidate'][:27]:<28}{pt['measured_ms']:>13.4g}{pt['uncalibrated_ms']:>11.4g}"
              f"{pt['uncalibrated_error_pct']:>9.2f}{pt['loo_error_pct']:>13.2f}")
    u, loo = cal["uncalibrated"], cal["loo"]
    print(f"mean |error| {u['mean_abs_pct']:.2f}% (max {u['max_abs_pct']:.2f}%) without calibration; "
          f"leave-one-out {loo['mean_abs_pct']:.2f}% (max {loo['max_abs_pct']:.2f}%) with it")
    return 0


def add_timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timing", choices=list(TIMING_MODES), default=None,
                   help="how units and forwards run while timed: " + "; ".join(f"{k}: {v}" for k, v in TIMING_MODES.items())
                        + " (default: cuda-graph on cuda, else eager; an existing table keeps its own)")


def register(sub) -> None:
    lsub = add_group(sub, "lut", help="latency lookup tables: built on the target device, used anywhere")
    p = add_parser(lsub, "build", help="time every unit shape of the teacher, the shipped spaces' presets and the candidates "
                                       "of --space on this machine's device, and write the table (JSON)")
    add_teacher(p, default="sd-v1", weights=False)
    add_device(p)
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on cuda, else float32)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image resolution in pixels (default: the config's sample_size x VAE scale)")
    p.add_argument("--batch-size", type=int, default=1, help="latents per U-Net forward (default: 1)")
    p.add_argument("--space", action="append", metavar="NAME",
                   help="also every unit shape the candidates of this space can need (repeatable; see `space list`)")
    p.add_argument("--exhaustive", action="store_true",
                   help="with --space: trace every candidate of the space rather than one per choice of each stage")
    p.add_argument("--out", required=True, help="the table file (JSON); an existing table for the same device and settings "
                                                "is extended, and left as it is when it holds everything already")
    p.add_argument("--pipeline", action="store_true",
                   help="also time the teacher pipeline's text encoder and VAE decoder for one image, for pipeline_latency_ms "
                        "(the teacher must be a pipeline; its U-Net steps need --batch-size 2 with classifier-free guidance)")
    p.add_argument("--rebuild", action="store_true", help="time every unit again instead of extending the existing table")
    add_timing(p)
    p.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed calls before each measurement (default: {WARMUP})")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"timed calls per measurement; the table keeps their {STATISTIC} (default: {REPEATS})")
    add_json(p)
    p.set_defaults(func=cmd_build)

    p = add_parser(lsub, "calibrate", help=f"measure at least {MIN_CANDIDATES} whole candidates on this machine's device and store, "
                                           "in the table, a correction of its unit sums fitted to them (with leave-one-out errors)")
    add_teacher(p, default="sd-v1", weights=False)
    add_device(p)
    p.add_argument("--table", required=True, help="the table file (built or extended here on the device as needed)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the table's; for a new table float16 "
                                                 "on cuda, else float32)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution in pixels (default: the table's)")
    p.add_argument("--batch-size", type=int, default=None, help="latents per U-Net forward (default: the table's, else 1)")
    p.add_argument("--candidate", action="append", metavar="NAME", help="a candidate preset to measure (repeatable)")
    p.add_argument("--space", default=None, help="also measure --count random candidates of this space")
    p.add_argument("--count", type=int, default=MIN_CANDIDATES, help=f"with --space: how many (default: {MIN_CANDIDATES})")
    p.add_argument("--seed", type=int, default=0, help="with --space: the sampling seed (default: 0)")
    add_timing(p)
    add_json(p)
    p.set_defaults(func=cmd_calibrate)
