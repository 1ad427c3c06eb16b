"""``zoo list|path``: the embedded pipelines."""

from __future__ import annotations

import argparse

from hybridsd_nas.cli.common import add_group, add_json, add_parser, print_json
from hybridsd_nas.zoo import list_models, model_info, model_path


def cmd_list(args: argparse.Namespace) -> int:
    infos = [model_info(n) for n in list_models()]
    if args.json:
        print_json(infos)
        return 0
    for i in infos:
        state = "" if i["installed"] else "  (weights missing)"
        print(f"{i['name']}\t{i['description']}\t{i['path']}{state}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    path = model_path(args.name)  # an unknown name raises UnknownNameError: exit 2
    print_json({"name": args.name, "path": str(path)}) if args.json else print(path)
    return 0


def register(sub) -> None:
    zsub = add_group(sub, "zoo", help="embedded pipelines that need no download (e.g. 'tiny')")
    p = add_parser(zsub, "list", help="list the embedded pipelines")
    add_json(p)
    p.set_defaults(func=cmd_list)
    p = add_parser(zsub, "path", help="print the directory of an embedded pipeline")
    p.add_argument("name", help="zoo name, e.g. tiny")
    add_json(p)
    p.set_defaults(func=cmd_path)
