"""Seconds of one quality-proxy run at the default settings on the embedded ``tiny`` teacher.

A benchmark, not a test. Runs ``run_proxy`` three times on one candidate: first with empty caches
(the teacher's samples, the reference features and the encoded training images are computed, as in
the first trial of a study), then again with them warm (every later trial), then warm and stopping
at the ranking score (``heldout_mse``, no sampling: a trial of a study that ranks by it). Writes
results/bench_proxy_<device>.json and .md.

    python benchmarks/bench_proxy.py --candidate bk-sdm-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--candidate", default="bk-sdm-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["HYBRIDSD_NAS_CACHE"] = cache  # cold: nothing computed before
        import torch

        from hybridsd_nas.cost.latency import device_label
        from hybridsd_nas.proxy import ProxySettings, Stage, run_proxy

        torch.set_num_threads(args.threads)
        runs = []
        for label, evaluate in (("cold caches", True), ("warm caches", True), ("warm caches, no sampling", False)):
            t0 = time.perf_counter()
            res = run_proxy(args.teacher, args.candidate, ProxySettings(), device=args.device,
                            until=Stage.SAMPLES if evaluate else Stage.HELDOUT)
            wall = time.perf_counter() - t0
            if not res.ok:
                print(f"proxy {res.status}: {res.reason}", file=sys.stderr)
                return 1
            r = res.to_dict()
            runs.append({"run": label, "wall_seconds": round(wall, 1), "distill_seconds": r["distill_seconds"],
                         "heldout_seconds": r["heldout_seconds"], "heldout_mse": r["heldout_mse"],
                         "eval_seconds": r.get("eval_seconds"), "proxy_fid": r.get("proxy_fid"), "adherence": r.get("adherence")})
            print(f"{label}: {wall:.1f} s (distill {r['distill_seconds']:.1f} s, held-out {r['heldout_seconds']:.1f} s, "
                  f"eval {r.get('eval_seconds', 0):.1f} s), held-out MSE {r['heldout_mse']:.5f}"
                  + (f", proxy FID {r['proxy_fid']:.2f}" if evaluate else ""), flush=True)
        dev = device_label(torch.device(args.device))
        res = {"what": f"run_proxy({args.teacher!r}, {args.candidate!r}) at the default ProxySettings, once with empty caches, "
                       "once with warm ones, once warm without sampling (until=Stage.HELDOUT)", "device": dev, "threads": args.threads, "dtype": "float32",
               "torch": torch.__version__, "python": platform.python_version(), "settings": r["settings"], "runs": runs,
               "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.device.replace(":", "")
    (out / f"bench_proxy_{tag}.json").write_text(json.dumps(res, indent=1))
    s = res["settings"]
    md = ["# Quality proxy: seconds per candidate at the defaults", "",
          f"`run_proxy('{args.teacher}', '{args.candidate}')` with the default settings: {s['distill_steps']} distillation steps "
          f"at batch {s['batch_size']} (lr {s['lr']}), the held-out output MSE on {s['heldout_latents']} held-out noisy latents "
          f"(the ranking score), then {s['samples']} samples ({s['sampler']}, {s['sampler_steps']} steps, "
          f"guidance {s['guidance']}, seed {s['seed']}) scored against the teacher's samples and {s['reference_images']} real "
          f"images. Device {dev}, {args.threads} threads, float32, torch {torch.__version__}; {res['date']}.", "",
          "| run | wall s | distill s | held-out s | eval s | held-out MSE | proxy FID |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['run']} | {r['wall_seconds']} | {r['distill_seconds']} | {r['heldout_seconds']} | {r['eval_seconds'] or '-'} | "
           f"{r['heldout_mse']:.5f} | {'-' if r['proxy_fid'] is None else format(r['proxy_fid'], '.2f')} |" for r in runs]
    md += ["", "Cold: the first candidate of a study also computes the teacher's samples, the reference features and "
           "the encoded training images; every later candidate runs warm. No sampling: a study whose only quality "
           "figure is `heldout_mse` (the ranking score) stops there.", ""]
    (out / f"bench_proxy_{tag}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
