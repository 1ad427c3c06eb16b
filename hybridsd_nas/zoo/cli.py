"""The ``zoo`` command: list the embedded pipelines and print their paths."""

from __future__ import annotations

import argparse
import json


def cmd_list(args: argparse.Namespace) -> int:
    from . import list_models, model_info

    infos = [model_info(n) for n in list_models()]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    for i in infos:
        state = "" if i["installed"] else "  (weights missing)"
        print(f"{i['name']}\t{i['description']}\t{i['path']}{state}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from . import model_path

    print(model_path(args.name))  # an unknown name raises UnknownNameError: the CLI prints it, exit 2
    return 0


def register(subparsers) -> None:
    """Add ``zoo list [--json]`` and ``zoo path NAME`` to an argparse sub-parser set."""
    zoo = subparsers.add_parser("zoo", help="embedded pipelines that need no download (e.g. 'tiny')")
    sub = zoo.add_subparsers(dest="zoo_command", metavar="{list,path}")
    sub.required = True
    p = sub.add_parser("list", help="list the embedded pipelines")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("path", help="print the directory of an embedded pipeline")
    p.add_argument("name", help="zoo name, e.g. tiny")
    p.set_defaults(func=cmd_path)
