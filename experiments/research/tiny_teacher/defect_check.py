"""Is the embedded teacher under-trained, or is something mismatched between training and sampling?

Checks, each read off the shipped files and the training recipe (no training):

1. the training noise schedule (``recipe.SCHEDULER_CONFIG`` as the DDPMScheduler the training script
   builds) and the shipped sampling scheduler: betas, prediction type, number of train timesteps;
   and which timesteps the sampler visits (timestep spacing, ``steps_offset``);
2. the latent scaling factor: the VAE config's ``scaling_factor`` against the latents' measured
   standard deviation (training multiplies posterior samples by it, the pipeline divides by it);
3. the unconditional embedding: what training dropped captions to (the empty prompt, padded to 77
   tokens) against what the pipeline encodes for guidance (``encode_prompt``'s negative prompt).

Then samples on the teacher's evaluation prompts at 25 and 100 steps of two schedulers (the
shipped PNDM and DDIM from the same config) and guidance 1, 4 and 7.5, each scored by the share of
blank samples (95th-percentile pixel below 0.25) and prompt adherence by the shipped classifier.

    python -m experiments.research.tiny_teacher.defect_check --samples 50 --out results/tiny_teacher

Writes ``defect_check.json``, ``defect_check.md`` and ``defect_check.png`` (one row of samples per
setting).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from hybridsd_nas.data import load_fashion_mnist, to_rgb_uint8
from hybridsd_nas.metrics import load_classifier, prompt_adherence
from hybridsd_nas.proxy import generate
from hybridsd_nas.sources import resolve_teacher
from hybridsd_nas.zoo import recipe

# name -> (class, overrides of the shipped config): DDIM as the shipped config gives it (its
# ``clip_sample`` defaults to True, clipping the predicted clean latents to [-1, 1]) and with
# ``clip_sample: false``, as SD-1.5's own scheduler config sets it
SCHEDULERS = {"PNDM": (PNDMScheduler, {}), "DDIM": (DDIMScheduler, {}),
              "DDIM clip_sample=false": (DDIMScheduler, {"clip_sample": False})}


def blank_share(images: np.ndarray) -> float:
    """Share of uint8 images (N, 3, H, W) whose 95th-percentile pixel is below 0.25 (dark smears)."""
    p95 = np.percentile(images.reshape(len(images), -1) / 255.0, 95, axis=1)
    return float((p95 < 0.25).mean())


def check_schedule(pipe) -> dict:
    train = recipe.training_scheduler()
    ship = pipe.scheduler
    out = {"train_betas_equal": bool(torch.allclose(train.betas, ship.betas)),
           "train_prediction_type": train.config.prediction_type, "sampler_prediction_type": ship.config.prediction_type,
           "train_timesteps": train.config.num_train_timesteps, "sampler_train_timesteps": ship.config.num_train_timesteps,
           "timestep_spacing": ship.config.timestep_spacing, "steps_offset": ship.config.steps_offset}
    for n in (25, 100):
        ship.set_timesteps(n)
        ts = ship.timesteps.tolist()
        out[f"visited_{n}"] = {"first": int(ts[0]), "last": int(ts[-1]), "count": len(ts)}
    return out


@torch.no_grad()
def check_scaling(pipe, n: int = 512) -> dict:
    imgs = to_rgb_uint8(load_fashion_mnist("test").images[:n], pipe.vae.config.sample_size)
    x = torch.from_numpy(imgs).float() / 127.5 - 1
    post = pipe.vae.encode(x).latent_dist
    z = post.sample(generator=torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    return {"scaling_factor": float(pipe.vae.config.scaling_factor), "scaled_latent_std": float(z.std()),
            "scaled_latent_mean": float(z.mean()), "images": n}


@torch.no_grad()
def check_uncond(pipe) -> dict:
    tok = pipe.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    trained = pipe.text_encoder(ids)[0]
    _, neg = pipe.encode_prompt("a photo of a coat", "cpu", 1, True, negative_prompt=None)
    return {"max_abs_difference": float((trained - neg).abs().max()), "tokens": int(ids.shape[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0, 7.5])
    ap.add_argument("--out", default="results/tiny_teacher")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t = resolve_teacher(args.teacher)
    pipe = t.pipeline()
    report = {"teacher": t.fingerprint, "device": f"cpu ({platform.processor() or platform.machine()})", "dtype": "float32",
              "samples": args.samples, "seed": args.seed, "resolution": int(pipe.vae.config.sample_size),
              "schedule": check_schedule(pipe), "scaling": check_scaling(pipe), "uncond": check_uncond(pipe), "settings": []}
    rows = t.eval_prompts(args.samples)
    prompts, labels = [r["prompt"] for r in rows], np.array([r["class_index"] for r in rows])
    clf = load_classifier(t.classifier_dir)
    shipped = pipe.scheduler
    strips = []
    report["shipped_scheduler_config_has_clip_sample"] = "clip_sample" in shipped.config
    for name, (cls, overrides) in SCHEDULERS.items():
        pipe.scheduler = cls.from_config(shipped.config, **overrides)
        for steps in args.steps:
            for g in args.guidance:
                t0 = time.perf_counter()
                imgs = generate(pipe, pipe.unet, prompts, args.seed, steps, g)
                row = {"scheduler": name, "steps": steps, "guidance": g, "blank": blank_share(imgs),
                       "adherence": prompt_adherence(clf, imgs, labels), "seconds": round(time.perf_counter() - t0, 1)}
                report["settings"].append(row)
                strips.append(np.concatenate(list(imgs[:12].transpose(0, 2, 3, 1)), axis=1))
                print(row, flush=True)
    pipe.scheduler = shipped
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defect_check.json").write_text(json.dumps(report, indent=1))
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "defect_check.png", optimize=True)
    sc, s, u = report["schedule"], report["scaling"], report["uncond"]
    lines = [f"# The embedded teacher: training against sampling (`{t.fingerprint}`)", "",
             f"Made by `python -m experiments.research.tiny_teacher.defect_check --samples {args.samples}`; {report['device']}, "
             f"float32, {report['resolution']} px, {args.samples} samples on the teacher's evaluation prompts, seeds {args.seed}.."
             f"{args.seed + args.samples - 1}.", "",
             "## Checks", "",
             f"- Noise schedule: training betas equal the sampler's: {sc['train_betas_equal']}; prediction type "
             f"{sc['train_prediction_type']} / {sc['sampler_prediction_type']}; {sc['train_timesteps']} / "
             f"{sc['sampler_train_timesteps']} train timesteps; the sampler visits t = {sc['visited_25']['first']}.."
             f"{sc['visited_25']['last']} at 25 steps and {sc['visited_100']['first']}..{sc['visited_100']['last']} at 100 "
             f"({sc['timestep_spacing']} spacing, steps_offset {sc['steps_offset']}); training draws t uniformly in 0..999.",
             f"- Latent scaling: scaling_factor {s['scaling_factor']:.4f}; the scaled latents of {s['images']} test images have "
             f"std {s['scaled_latent_std']:.3f}, mean {s['scaled_latent_mean']:.3f} (training multiplies posterior samples by the "
             "factor, the pipeline divides by it).",
             f"- Unconditional embedding: training's empty prompt ({u['tokens']} tokens) against the pipeline's guidance "
             f"embedding: max |difference| {u['max_abs_difference']:.3g}.",
             f"- The shipped scheduler config names clip_sample: {report['shipped_scheduler_config_has_clip_sample']} "
             "(without it, DDIM's default clips the predicted clean latents to [-1, 1], where these latents have the mean above).", "",
             "## Samples", "",
             "| scheduler | steps | guidance | blank | adherence | seconds |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['scheduler']} | {r['steps']} | {r['guidance']} | {100 * r['blank']:.0f}% | {100 * r['adherence']:.0f}% | "
              f"{r['seconds']} |" for r in report["settings"]]
    lines += ["", "Blank: 95th-percentile pixel below 0.25. Adherence: the shipped classifier's reading of the prompted class. "
              "`defect_check.png`: the first 12 samples of each setting, one row each, in the table's order."]
    (out / "defect_check.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
