"""``cost`` and ``table``: params, MACs and latency, weight-free."""

from __future__ import annotations

import argparse

from hybridsd_nas.arch import describe
from hybridsd_nas.cli.common import add_device, add_json, add_latency, add_parser, add_teacher, print_json, print_table
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.cost import COUNT_METHODS, CostReport, default_resolution, estimate_cost, open_table

MAIN_TABLE = ("identity", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")


def _row(label: str, r: CostReport, lat: bool) -> list[str]:
    row = [label, f"{r.params / 1e6:.2f}", f"{r.macs / 1e9:.1f}", f"{r.macs_conv_linear / 1e9:.1f}"]
    if lat:
        row.append(f"{r.latency_ms:.1f}" if r.latency_ms is not None else "-")
    return row


def how_measured(r: CostReport) -> str:
    m = r.measured
    how = "params and MACs in closed form" if r.method == "analytic" else "MACs counted on the meta device"
    s = (f"{m['resolution']}x{m['resolution']} px (latent {m['latent']}x{m['latent']}), batch {m['batch']}, "
         f"{m['text_tokens']} text tokens; {how}")
    if r.latency is not None:
        s += f"; latency ({r.latency['method']}) on {r.latency['device']}, {r.latency['dtype']}"
    return s


def _reports(args: argparse.Namespace, candidates: list[str | None], by_block: bool) -> list[CostReport]:
    arch = describe(args.teacher)
    lut = None
    if args.table is not None:
        if args.latency != "lut":
            raise ConfigError(f"--table is the table of --latency lut, not --latency {args.latency}; add --latency lut")
        # read as it is (no device needed); a table for another resolution, dtype or batch: one line, before any model
        lut = open_table(args.table, resolution=args.resolution or default_resolution(args.teacher, arch), dtype=args.dtype,
                         batch=args.batch_size)
    return [estimate_cost(args.teacher, c, resolution=args.resolution, batch=args.batch_size, latency=args.latency,
                          device=args.device, dtype=args.dtype, by_block=by_block, arch=arch, repeats=args.repeats, lut=lut,
                          method=args.method)
            for c in candidates]


def _print(args: argparse.Namespace, cands: list[str | None], rows: list[CostReport], by_block: bool) -> int:
    if args.json:
        dicts = [r.to_dict() for r in rows]
        print_json(dicts[0] if len(dicts) == 1 else dicts)
        return 0
    lat = args.latency != "off"
    header = ["candidate", "params (M)", "MACs (G)", "MACs conv+linear (G)"] + (["latency (ms)"] if lat else [])
    labels = [r.candidate.get("name") or (c if c else "base") for c, r in zip(cands, rows)]
    print_table([_row(lbl, r, lat) for lbl, r in zip(labels, rows)], header)
    if by_block:
        for lbl, r in zip(labels, rows):
            print(f"\n{lbl} by block:")
            brow = [[b, f"{v['params'] / 1e6:.2f}", f"{v['macs'] / 1e9:.2f}", f"{v['macs_conv_linear'] / 1e9:.2f}"]
                    for b, v in (r.by_block or {}).items()]
            print_table(brow, ["block", "params (M)", "MACs (G)", "MACs conv+linear (G)"])
    for r in rows:
        if r.surgery_reason:
            print(f"note: {r.candidate.get('name') or r.candidate_key} is built by surgery: {r.surgery_reason}")
    reasons = {r.method_reason for r in rows if r.method_reason}
    for reason in sorted(reasons):  # the same for every row of one base
        print(f"note: counted by tracing, the closed form does not cover this base: {reason}")
    print(f"\n{args.teacher}: {how_measured(rows[0])}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    cands = args.candidate or [None]
    return _print(args, cands, _reports(args, cands, args.by_block), args.by_block)


def cmd_table(args: argparse.Namespace) -> int:
    cands: list[str | None] = list(MAIN_TABLE)
    return _print(args, cands, _reports(args, cands, False), False)


def _cost_args(sp: argparse.ArgumentParser) -> None:
    add_teacher(sp, default="sd-v1", weights=False)
    sp.add_argument("--resolution", type=int, default=None,
                    help="image resolution in pixels (default: the config's sample_size x VAE scale)")
    sp.add_argument("--batch-size", type=int, default=1, help="latents per U-Net forward (default: 1)")
    add_latency(sp)
    add_device(sp)
    sp.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on cuda, else float32)")
    sp.add_argument("--repeats", type=int, default=10, help="timed repeats for --latency measure (default: 10)")
    sp.add_argument("--method", choices=list(COUNT_METHODS), default="auto",
                    help="how params and MACs are counted: " + "; ".join(f"{k}: {v}" for k, v in COUNT_METHODS.items())
                    + " (default: auto)")
    sp.add_argument("--table", default=None, metavar="FILE",
                    help="--latency lut from this table file (built with `lut build` on the target device; read here as it "
                         "is, no device needed); default: this machine's table for --device in the cache")
    add_json(sp)


def register(sub) -> None:
    sp = add_parser(sub, "cost", help="params, MACs and latency of a U-Net or candidate")
    _cost_args(sp)
    sp.add_argument("--candidate", action="append", help="candidate preset or JSON/YAML file (repeatable)")
    sp.add_argument("--by-block", action="store_true", help="break the figures down by block")
    sp.set_defaults(func=cmd_cost)

    sp = add_parser(sub, "table", help="cost table of a base U-Net and the BK-SDM candidates")
    _cost_args(sp)
    sp.set_defaults(func=cmd_table)
