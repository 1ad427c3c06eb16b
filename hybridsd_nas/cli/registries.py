"""``list``: every extension point's registered names, as validation and the other commands see them."""

from __future__ import annotations

import argparse

from hybridsd_nas.arch import CANDIDATE_PRESETS
from hybridsd_nas.cli.common import add_json, add_parser, print_json
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.cost import LATENCY_MODES
from hybridsd_nas.prune import IMPORTANCE
from hybridsd_nas.sources import UNET_PRESETS
from hybridsd_nas.spaces import SPACE_KINDS, list_spaces
from hybridsd_nas.study import METRICS, SAMPLERS

REGISTRIES: dict[str, Registry] = {
    "unet-presets": UNET_PRESETS,
    "candidate-presets": CANDIDATE_PRESETS,
    "importance": IMPORTANCE,
    "latency-modes": LATENCY_MODES,
    "space-kinds": SPACE_KINDS,
    "samplers": SAMPLERS,
    "metrics": METRICS,
}


def cmd_list(args: argparse.Namespace) -> int:
    chosen = [args.what] if args.what else [*REGISTRIES, "spaces"]
    out = {}
    for name in chosen:
        if name == "spaces":  # the shipped YAMLs and registered ones, by name
            out[name] = {n: "" for n in list_spaces()}
        else:
            out[name] = {e.name: e.help for e in REGISTRIES[name].entries()}
    if args.json:
        print_json(out)
        return 0
    for name, entries in out.items():
        print(f"{name}:")
        for n, h in entries.items():
            print(f"  {n:<20} {h}".rstrip())
    return 0


def register(sub) -> None:
    sp = add_parser(sub, "list", help="the registered names of every extension point (presets, criteria, samplers, ...)")
    sp.add_argument("what", nargs="?", choices=[*REGISTRIES, "spaces"], help="one registry (default: all)")
    add_json(sp)
    sp.set_defaults(func=cmd_list)
