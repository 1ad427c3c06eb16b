"""``presets`` and ``describe``: what the architecture model knows."""

from __future__ import annotations

import argparse

from hybridsd_nas.arch import CANDIDATE_PRESETS, describe, describe_module, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.cli.common import add_json, add_parser, add_teacher, print_json
from hybridsd_nas.sources import UNET_PRESETS


def cmd_presets(args: argparse.Namespace) -> int:
    if args.json:
        print_json({"unet": list(UNET_PRESETS.names()), "candidate": list(CANDIDATE_PRESETS.names())})
        return 0
    print("U-Net presets (--teacher, for cost and description; no weights):")
    for e in UNET_PRESETS.entries():
        print(f"  {e.name:<14} {e.help}")
    print("candidate presets (--candidate), defined on any SD-style base:")
    for e in CANDIDATE_PRESETS.entries():
        print(f"  {e.name:<14} {e.help}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    arch = describe(args.teacher)
    cand = resolve_candidate(args.candidate, arch)
    p = plan(arch, cand)
    if args.json:
        print_json({"unet": arch.source, "candidate": cand.to_dict(), "candidate_key": cand.key,
                    "expressible": p.expressible, "surgery_reason": p.config_reason, "diffusers_config": p.config,
                    "kept_layers": {bp.name: list(bp.kept) for bp in p.blocks}})
        return 0
    print(f"base {arch.source}:\n{arch.summary()}")
    if not cand.is_identity:
        student = build_student(p)
        print(f"\ncandidate {cand.label} ({cand.key}):")
        print(describe_module(student, p.config or arch.config, cand.label).summary())
        print("\nbuilt from a stock diffusers config" if p.expressible else f"\nbuilt by surgery: {p.config_reason}")
    return 0


def register(sub) -> None:
    sp = add_parser(sub, "presets", help="list U-Net and candidate presets")
    add_json(sp)
    sp.set_defaults(func=cmd_presets)

    sp = add_parser(sub, "describe", help="blocks, layers and units of a U-Net (and of a candidate)")
    add_teacher(sp, default="sd-v1", weights=False)
    sp.add_argument("--candidate", default=None, help="candidate preset or JSON/YAML file")
    add_json(sp)
    sp.set_defaults(func=cmd_describe)
