"""Seconds per quality-proxy run on the embedded teacher and on a foreign pipeline with a folder source,
cold and warm caches; and the peak memory of the data cache at 1x and 8x data.

A benchmark, not a test. The foreign teacher is a random-weight SD-1.x-topology pipeline with other
widths and a DDIM scheduler (``hybridsd_nas.zoo.recipe.build_random_pipeline``); its data is a folder
of generated 32 px images with captions (metadata.jsonl), its evaluation set a prompt file. Each
teacher runs ``run_proxy`` on one candidate three times: cold caches (its data encoded, the teacher's
samples and reference features computed), warm, and warm without sampling (the ranking score only).
Memory: a subprocess encodes a folder of N images (N and 8N, several shards) and then reads random
batches; its peak RSS is reset after set-up, so the rise is what the cache costs. Writes
results/byo_teacher.json and results/byo_teacher.md.

    python benchmarks/bench_byo_teacher.py --candidate bk-sdm-small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybridsd_nas.data.synthetic import shapes_folder

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green square", "a blue square", "a white square"]

MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from hybridsd_nas.data import encode_source
from diffusers import StableDiffusionPipeline

folder, warm, pipe_dir, work = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
encode_source(warm, pipe, 32, batch_size=16, cache_root=work / "warm").batch(torch.arange(8), 0.1)  # one-time set-up


def status():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
base, _ = status()
data = encode_source(folder, pipe, 32, shard_size=256, batch_size=16, cache_root=work / "cache", map_budget=1 << 22)
g = torch.Generator().manual_seed(0)
for _ in range(100):
    data.batch(torch.randint(0, len(data), (32,), generator=g), 0.1, g)
_, peak = status()
print(json.dumps({"n": len(data), "base_mib": base / 2**20, "peak_mib": peak / 2**20,
                  "shards": len(list(data.path.glob("shard-*")))}))
"""


def proxy_runs(teacher: str, candidate: str, settings, device: str) -> list[dict]:
    from hybridsd_nas.proxy import Stage, run_proxy

    runs = []
    for label, sample in (("cold caches", True), ("warm caches", True), ("warm caches, no sampling", False)):
        t0 = time.perf_counter()
        res = run_proxy(teacher, candidate, settings, device=device, until=Stage.SAMPLES if sample else Stage.HELDOUT)
        wall = time.perf_counter() - t0
        if not res.ok:
            raise SystemExit(f"proxy {res.status}: {res.reason}")
        r = res.to_dict()
        runs.append({"run": label, "wall_seconds": round(wall, 1), "distill_seconds": r["distill_seconds"],
                     "heldout_seconds": r["heldout_seconds"], "eval_seconds": r.get("eval_seconds"),
                     "heldout_mse": r["heldout_mse"], "proxy_fid": r.get("proxy_fid"), "data": r["provenance"]["data"]})
        print(f"  {label}: {wall:.1f} s", flush=True)
    return runs


def memory(work: Path, pipe_dir: Path, n: int) -> dict:
    warm = shapes_folder(work / "warm", 16, CAPTIONS)
    out = {}
    for k in (n, 8 * n):
        d = shapes_folder(work / f"mem{k}", k, CAPTIONS, unique_captions=True)
        p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(d), str(warm), str(pipe_dir), str(work / f"w{k}")],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYBRIDSD_NAS_CACHE": str(work)})
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        out[k] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  {k} images: peak {out[k]['peak_mib']:.0f} MiB, rise {out[k]['peak_mib'] - out[k]['base_mib']:.1f} MiB", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidate", default="bk-sdm-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder-images", type=int, default=512)
    p.add_argument("--memory-images", type=int, default=512, help="1x of the memory measurement (8x: eight times as many)")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HYBRIDSD_NAS_CACHE"] = str(tmp / "cache")  # cold: nothing computed before
        import torch

        from hybridsd_nas.cost.latency import device_label
        from hybridsd_nas.proxy import ProxySettings
        from hybridsd_nas.zoo.recipe import build_random_pipeline

        torch.set_num_threads(args.threads)
        foreign = build_random_pipeline(tmp / "foreign", CAPTIONS)
        folder = shapes_folder(tmp / "folder", args.folder_images, CAPTIONS)
        (tmp / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
        print("embedded tiny teacher, Fashion-MNIST:", flush=True)
        tiny = proxy_runs("tiny", args.candidate, ProxySettings(), args.device)
        print(f"foreign pipeline, folder of {args.folder_images} images:", flush=True)
        own = proxy_runs(str(foreign), args.candidate,
                         ProxySettings(data=str(folder), eval_prompts=str(tmp / "prompts.txt")), args.device)
        print("data cache memory:", flush=True)
        mem = memory(tmp / "mem", foreign, args.memory_images)
        dev = device_label(torch.device(args.device))

    report = {"device": dev, "threads": args.threads, "dtype": "float32", "candidate": args.candidate,
              "settings": "ProxySettings() defaults: 40 distillation steps at batch 16, 32 samples, 64 held-out latents, seed 0",
              "machine": f"{platform.machine()}, torch {torch.__version__}",
              "tiny": tiny, "foreign": own, "foreign_teacher": "random-weight SD-1.x topology, block_out_channels [32, 32, 64, 64], "
              "text encoder 64 wide, DDIM, 32 px", "memory": mem}
    out = Path(args.out)
    (out / "byo_teacher.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = []
    for name, runs in (("tiny (embedded), Fashion-MNIST 4096 images", tiny),
                       (f"foreign pipeline, folder of {args.folder_images} images", own)):
        for r in runs:
            ev = f"{r['eval_seconds']:.1f}" if r["eval_seconds"] is not None else "-"
            rows.append(f"| {name} | {r['run']} | {r['wall_seconds']:.1f} | {r['distill_seconds']:.1f} | {r['heldout_seconds']:.1f} | {ev} |")
    m1, m8 = mem[args.memory_images], mem[8 * args.memory_images]
    md = ["# Bring your own teacher: proxy seconds and data-cache memory", "",
          f"Made by `python benchmarks/bench_byo_teacher.py --candidate {args.candidate}` on {dev} ({args.threads} threads, "
          f"float32, {report['machine']}). {report['settings']}; candidate `{args.candidate}`. "
          f"The foreign teacher: {report['foreign_teacher']}; its data a folder of generated 32 px images "
          "with captions (metadata.jsonl), its last 64 examples held out; its evaluation set 4 prompts.", "",
          "| teacher, data | run | wall s | distill s | held-out s | eval s |", "|---|---|---:|---:|---:|---:|", *rows, "",
          "Cold: empty caches (data encoded, the teacher's samples and reference features computed), as in a study's first trial.", "",
          "## Data-cache memory", "",
          "A subprocess encodes a folder (every caption distinct, 256 examples a shard) and reads 100 random batches of 32; "
          "its peak RSS is reset after loading the pipeline and a warm-up encode.", "",
          "| images | shards | RSS before, MiB | peak, MiB | rise, MiB |", "|---:|---:|---:|---:|---:|",
          *[f"| {m['n']} | {m['shards']} | {m['base_mib']:.0f} | {m['peak_mib']:.0f} | {m['peak_mib'] - m['base_mib']:.1f} |" for m in (m1, m8)],
          ""]
    (out / "byo_teacher.md").write_text("\n".join(md))
    print(f"wrote {out / 'byo_teacher.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
