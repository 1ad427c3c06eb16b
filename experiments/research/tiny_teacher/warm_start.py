"""Keep a teacher run's progress in the repository, so that a later run can start from it.

A run's checkpoint (weights, moving average, optimizer: about 100 MB) lives in its work directory,
which does not travel with the repository. ``save`` keeps the smallest thing a later run can go on
from: the run's exported pipeline (its moving-average weights), with the U-Net stored in bfloat16
(11 MB instead of 22 MB; a run loads it back into float32), and ``warm_start.json`` saying which run
and step it is, how long it trained and how it scored. A later run starts from it with ``--init``:

    python -m experiments.research.tiny_teacher.warm_start save runs/teacher-v5 --out experiments/research/tiny_teacher/warm_start
    python -m experiments.research.tiny_teacher.train_unet --work runs/teacher-v6 --init experiments/research/tiny_teacher/warm_start \\
        --threads 2 --minutes 30 --eval-count 200

Starting from it is a new run (fresh optimizer state and warm-up); its chunks count training time
from zero, and ``warm_start.json`` holds the time that came before.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def save(work: Path, out: Path) -> Path:
    pipeline = work / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        raise SystemExit(f"{work} has no exported pipeline (pipeline/model_index.json): let a chunk end first")
    chunks = [json.loads(line) for line in (work / "chunks.jsonl").read_text().splitlines() if line.strip()]
    settings = json.loads((work / "settings.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pipeline, tmp)
    weights = load_file(str(tmp / UNET_WEIGHTS))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}, str(tmp / UNET_WEIGHTS),
              metadata={"format": "pt"})
    last = chunks[-1] if chunks else {}
    (tmp / "warm_start.json").write_text(json.dumps({
        "run": work.name, "step": last.get("to_step"), "train_seconds": last.get("run_train_seconds"),
        "images_seen": last.get("run_images"), "weights": "moving average (EMA) of the run, U-Net in bfloat16",
        "recipe": settings.get("recipe"), "last_eval": last.get("eval"), "chunks": chunks}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# What the package's teacher keeps of its own when a warm start replaces its weights: the slow tokenizer's
# files (stock ``CLIPTokenizer`` reads vocab.json and merges.txt), the eval set, the eval classifier and
# the documents that say what the teacher is.
KEEP = ("tokenizer", "eval_prompts.json", "eval_classifier", "evaluation.json", "sampling.json", "README.md")


def ship(warm: Path, zoo_dir: Path) -> Path:
    """Make the warm start the package's teacher: its U-Net, text encoder, VAE and scheduler, all in
    float32 (bfloat16 values widen exactly, so the warm start's scores hold), with what :data:`KEEP`
    names taken from the teacher it replaces. The tokenizer must encode the eval prompts identically."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    prompts = [e["prompt"] for e in json.loads((zoo_dir / "eval_prompts.json").read_text())] + [""]
    old = CLIPTokenizer.from_pretrained(str(zoo_dir / "tokenizer"))
    new = CLIPTokenizerFast.from_pretrained(str(warm / "tokenizer"))
    if old(prompts).input_ids != new(prompts).input_ids:
        raise SystemExit(f"{warm}/tokenizer encodes the eval prompts differently from {zoo_dir}/tokenizer: not the same tokenizer")
    tmp = zoo_dir.with_name(zoo_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(warm, tmp, ignore=shutil.ignore_patterns("warm_start.json", *KEEP))
    for name in KEEP:
        src = zoo_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
    weights = load_file(str(tmp / UNET_WEIGHTS))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, str(tmp / UNET_WEIGHTS),
              metadata={"format": "pt"})
    for cfg in (tmp / part / "config.json" for part in ("unet", "vae", "text_encoder")):
        c = json.loads(cfg.read_text())
        c.pop("_name_or_path", None)  # the run's work directory, meaningless in the package
        cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(zoo_dir)
    tmp.rename(zoo_dir)
    return zoo_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="keep a run's exported pipeline as a warm start")
    s.add_argument("work")
    s.add_argument("--out", default=str(Path(__file__).parent / "warm_start"))
    h = sub.add_parser("ship", help="make a warm start the package's teacher (hybridsd_nas/zoo/tiny)")
    h.add_argument("warm", nargs="?", default=str(Path(__file__).parent / "warm_start"))
    h.add_argument("--zoo", default=str(Path(__file__).resolve().parents[3] / "hybridsd_nas" / "zoo" / "tiny"))
    a = p.parse_args(argv)
    if a.cmd == "ship":
        print(f"teacher written to {ship(Path(a.warm), Path(a.zoo))}")
        return 0
    out = save(Path(a.work), Path(a.out))
    print(f"warm start written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
