"""``space list|show|enumerate``: the search spaces (``search_spaces/*.yaml``, shipped with the package)."""

from __future__ import annotations

import argparse
import json

from hybridsd_nas.arch import describe
from hybridsd_nas.cli.common import add_group, add_json, add_parser, add_seed, add_teacher, print_json
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.cost import CostReport, estimate_cost
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


def _cost_fields(r: CostReport) -> dict:
    return {"params": r.params, "macs": r.macs, "macs_conv_linear": r.macs_conv_linear, "method": r.method}


def cmd_enumerate(args: argparse.Namespace) -> int:
    if args.resolution is not None and not args.with_cost:
        raise ConfigError("--resolution is the resolution of --with-cost; add --with-cost")
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
    # the closed form costs a candidate in well under a millisecond: thousands of rows stay quick
    costs = [estimate_cost(args.teacher, p.candidate, resolution=args.resolution, arch=arch) for p in points] if args.with_cost else []
    if args.json:
        rows = [p.to_json_obj(sp) for p in points]
        for row, r in zip(rows, costs):
            row["cost"] = _cost_fields(r)  # beside "params", which are the space's choices
        out = {"space": sp.name, "space_version": sp.version, "unet": arch.source, "how": how, "count": total,
               "shown": len(points), "candidates": rows}
        if costs:
            out["cost_measured"] = {k: costs[0].measured[k] for k in ("resolution", "batch", "text_tokens")}
        print_json(out)
        return 0
    if costs:
        print(f"{'key':<12}  {'params (M)':>10}  {'MACs (G)':>9}  {'MACs c+l (G)':>12}  choices")
    for i, p in enumerate(points):
        extra = f"  {p.extra['schedule']}" if "schedule" in p.extra else ""
        cost = ""
        if costs:
            r = costs[i]
            cost = f"  {r.params / 1e6:>10.2f}  {r.macs / 1e9:>9.2f}  {r.macs_conv_linear / 1e9:>12.2f}"
        print(f"{p.candidate.key}{cost}  {json.dumps(dict(p.params), sort_keys=True)}{extra}")
    count = f"count {total}" if total is not None else f"count not enumerated (raw size {sp.raw_size(arch)})"
    print(f"{len(points)} shown; {how}; {count}")
    if costs:
        m = costs[0].measured
        print(f"cost: {m['resolution']} px, batch {m['batch']}, {m['text_tokens']} text tokens; MACs c+l: conv and linear only (thop)")
        for reason in sorted({r.method_reason for r in costs if r.method_reason}):
            print(f"note: counted by tracing, the closed form does not cover this base: {reason}")
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
            s.add_argument("--with-cost", action="store_true",
                           help="add each candidate's params and MACs (both conventions), in closed form where exact")
            s.add_argument("--resolution", type=int, default=None,
                           help="image resolution in pixels of --with-cost (default: the config's sample_size x VAE scale)")
        s.set_defaults(func=fn)
