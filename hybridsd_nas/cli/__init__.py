"""The ``hybridsd-nas`` command line: one module per command group, a thin layer over the library.

Exit statuses (:class:`ExitCode`): 0 ok; 1 the run failed (NaN or divergence in training, a proxy
that could not score, a latency table whose measurements disagree); 2 the user's mistake (an
unknown name, a malformed file, an impossible candidate, a bad option), reported as one line
before any model is loaded; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from hybridsd_nas.cli import arch, cost, hybrid, lut, proxy, registries, space, study, train, zoo
from hybridsd_nas.cli.common import ExitCode, RunFailed
from hybridsd_nas.core.errors import HybridSDError, UnreliableMeasurementError
from hybridsd_nas.core.runtime import __version__

GROUPS = (cost, lut, arch, space, train, proxy, study, hybrid, zoo, registries)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: status 2, as every user mistake
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hybridsd-nas", allow_abbrev=False,
                 description="Architecture search and structural pruning of Stable Diffusion U-Nets.",
                 epilog="exit status: 0 ok, 1 the run failed, 2 a usage or input mistake, 130 interrupted")
    ap.add_argument("--version", action="version", version=f"hybridsd-nas {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or ExitCode.OK)
    except UnreliableMeasurementError as e:  # not the user's mistake: the measurement failed
        print(f"hybridsd-nas: failed: {e}", file=sys.stderr)
        return ExitCode.RUN_FAILED
    except HybridSDError as e:
        print(f"hybridsd-nas: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except RunFailed as e:
        print(f"hybridsd-nas: failed: {e}", file=sys.stderr)
        return ExitCode.RUN_FAILED
    except KeyboardInterrupt:
        print("hybridsd-nas: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


__all__ = ["ExitCode", "RunFailed", "build_parser", "main"]
