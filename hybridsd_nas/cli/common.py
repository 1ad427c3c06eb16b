"""What every command module shares: exit codes, the JSON/table output, and one definition per option."""

from __future__ import annotations

import argparse
import json
from enum import IntEnum
from typing import Any

from hybridsd_nas.cost import LATENCY_MODES


class ExitCode(IntEnum):
    """The ``hybridsd-nas`` exit statuses."""

    OK = 0
    RUN_FAILED = 1  # the run itself failed: NaN or divergence in training, a proxy that could not score
    USAGE = 2  # the user's mistake: unknown name, malformed file, impossible candidate, bad option
    INTERRUPTED = 130  # Ctrl-C; what was computed before is kept


class RunFailed(Exception):
    """A command's run ended without a result (exit status 1); the message says why and what is kept."""


def add_parser(sub, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command parser that takes no abbreviated option names."""
    return sub.add_parser(name, allow_abbrev=False, **kwargs)


def add_group(sub, name: str, help: str):
    """A command group (``space list``, ``zoo path``): its parser's sub-commands, one of which is required."""
    return add_parser(sub, name, help=help).add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# --- one option name per concept ------------------------------------------------------------------

def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_teacher(p: argparse.ArgumentParser, default: str | None = None, weights: bool = True) -> None:
    """``--teacher``: the model being compressed, everywhere."""
    what = ("zoo name, pipeline directory or hub id (with weights)" if weights else
            "U-Net preset, zoo name, config.json, model directory or hub id (a config is enough)")
    if default is None:
        p.add_argument("--teacher", required=True, help=what)
    else:
        p.add_argument("--teacher", default=default, help=f"{what} (default: {default})")


def add_eval_set(p: argparse.ArgumentParser) -> None:
    """``--eval-prompts``, ``--classifier``, ``--clip-model``: what sampled scores are measured on."""
    g = p.add_argument_group("evaluation set")
    g.add_argument("--eval-prompts", default=None, metavar="FILE",
                   help="fixed evaluation prompts: .txt (one per line), .jsonl or .json ({\"prompt\", \"label\"}); "
                        "default: the teacher's own (evaluation.json or eval_prompts.json beside it)")
    g.add_argument("--classifier", default=None, metavar="DIR",
                   help="adherence classifier for the prompts' labels (default: the teacher's own, where it ships one)")
    g.add_argument("--clip-model", default=None, metavar="DIR",
                   help="local CLIP model directory: adds CLIP score and CMMD (skipped without one)")


def add_base_unet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-unet", default=None,
                   help="compressed Base U-Net for recombination candidates (A-SDM); default: built from the teacher")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default: cpu)")


def add_seed(p: argparse.ArgumentParser, help: str = "random seed (default: 0)") -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def add_latency(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency", choices=LATENCY_MODES.names(), default="off",
                   help="; ".join(f"{e.name}: {e.help}" for e in LATENCY_MODES.entries()))


def add_out(p: argparse.ArgumentParser, what: str = "output directory") -> None:
    p.add_argument("--out", required=True, help=what)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
