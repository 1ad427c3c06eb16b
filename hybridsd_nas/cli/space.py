"""``space list|show|enumerate``: the search spaces (``search_spaces/*.yaml``, shipped with the package)."""

from __future__ import annotations

import argparse
import json

from hybridsd_nas.arch import describe
from hybridsd_nas.cli.common import add_group, add_json, add_parser, add_seed, add_teacher, print_json
from hybridsd_nas.spaces import list_spaces, load_space, spaces_dir


def cmd_list(args: argparse.Namespace) -> int:
    spaces = [load_space(n) for n in list_spaces()]
    if args.json:
        print_json([{"name": sp.name, "version": sp.version, "kind": sp.kind, "description": sp.description,
                     "file": sp.source} for sp in spaces])
        return 0
    print(f"search spaces in {spaces_dir()}:")
    for sp in spaces:
        print(f"  {sp.name:<18} v{sp.version}  {sp.kind:<16} {sp.description}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    sp = load_space(args.name)
    arch = describe(args.teacher)
    d = sp.describe(arch)
    if sp.is_discrete(arch) and (d["raw_size"] or 0) <= 100_000:
        d["count"] = sp.count(arch)
    if args.json:
        print_json(d)
        return 0
    print(f"{sp.name} (v{sp.version}, {sp.kind}) on {arch.source}: {sp.description}")
    print(f"file: {sp.source}")
    for k, v in d["dimensions"].items():
        rng = v["choices"] if v["type"] == "categorical" else f"float in [{v['low']}, {v['high']}]"
        print(f"  {k:<16} {rng}")
    size = f"{d['count']} valid candidates" if "count" in d else f"raw size {d['raw_size'] or 'continuous'}"
    print(f"{size}; presets: {', '.join(d['presets']) or '-'}")
    return 0


def cmd_enumerate(args: argparse.Namespace) -> int:
    sp = load_space(args.name)
    arch = describe(args.teacher)
    if sp.is_discrete(arch):
        raw = sp.raw_size(arch) or 0
        points = list(sp.enumerate(arch, limit=args.limit))
        total = sp.count(arch) if raw <= 100_000 else None
        how = "enumerated"
    else:
        points = sp.sample(arch, args.limit or 10, seed=args.seed)
        total, how = None, f"sampled (seed {args.seed})"
    if args.json:
        print_json({"space": sp.name, "space_version": sp.version, "unet": arch.source, "how": how, "count": total,
                    "shown": len(points), "candidates": [p.to_json_obj(sp) for p in points]})
        return 0
    for p in points:
        extra = f"  {p.extra['schedule']}" if "schedule" in p.extra else ""
        print(f"{p.candidate.key}  {json.dumps(dict(p.params), sort_keys=True)}{extra}")
    count = f"count {total}" if total is not None else f"count not enumerated (raw size {sp.raw_size(arch)})"
    print(f"{len(points)} shown; {how}; {count}")
    return 0


def register(sub) -> None:
    ssub = add_group(sub, "space", help="list, show and enumerate search spaces")
    s = add_parser(ssub, "list", help="the shipped search spaces")
    add_json(s)
    s.set_defaults(func=cmd_list)
    for name, fn, help in (("show", cmd_show, "a space's dimensions, size and presets on a base"),
                           ("enumerate", cmd_enumerate, "a space's candidates on a base (sampled when continuous)")):
        s = add_parser(ssub, name, help=help)
        s.add_argument("name", help="space name (see 'space list') or a YAML path")
        add_teacher(s, default="sd-v1", weights=False)
        add_json(s)
        if name == "enumerate":
            s.add_argument("--limit", type=int, default=None, help="at most this many candidates")
            add_seed(s, help="seed for sampling a continuous space (default: 0)")
        s.set_defaults(func=fn)
