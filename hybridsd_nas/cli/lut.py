"""``lut build``: a latency lookup table timed on this machine's device, to be used anywhere."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

from hybridsd_nas.arch import Candidate, UNetArch, describe
from hybridsd_nas.cli.common import add_device, add_group, add_json, add_parser, add_teacher, print_json
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.cost import build_table
from hybridsd_nas.cost.lut import REPEATS, SANITY_RATIO, STATISTIC, WARMUP
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
    presets, skipped = preset_candidates(arch)
    extra, labels = space_candidates(arch, args.space or [], args.exhaustive)
    table, summary = build_table(args.teacher, itertools.chain(presets, extra), out=args.out, device=args.device,
                                 dtype=args.dtype, resolution=args.resolution, batch=args.batch_size, warmup=args.warmup,
                                 repeats=args.repeats, covers=["presets", *labels], rebuild=args.rebuild, arch=arch,
                                 progress=not args.json)
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
    for line in skipped:
        print(f"note: presets skipped, {line}")
    print(f"use it on any machine: hybridsd-nas cost --teacher {args.teacher} --latency lut --table {table.path}")
    return 0


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
    p.add_argument("--rebuild", action="store_true", help="time every unit again instead of extending the existing table")
    p.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed calls before each measurement (default: {WARMUP})")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"timed calls per measurement; the table keeps their {STATISTIC} (default: {REPEATS})")
    add_json(p)
    p.set_defaults(func=cmd_build)
