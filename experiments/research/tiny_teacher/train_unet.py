"""Train the tiny teacher's text encoder and U-Net in chunks that resume exactly.

One run lives in a work directory. The first call fixes the run's recipe (``settings.json``), builds
the VAE's latent normalisation, encodes the training set's latents once (``latents.safetensors``)
and trains; every later call with the same ``--work`` resumes from ``checkpoint/`` where the last
one stopped, bit for bit on the same device and thread count (weights, moving average, optimizer,
random generator, step). A chunk ends after ``--minutes`` or ``--steps``; it checkpoints every
``--checkpoint-minutes`` too, so a killed chunk loses at most that much. At a chunk's end it can
export the pipeline (moving-average weights) and score it (``--eval-count`` samples: prompt
adherence by the eval classifier, the share of blank samples, FID against held-out real images).

The same script runs on a CPU and on a GPU. On CUDA the latents, labels and prompt ids stay on the
device, the U-Net runs under bf16 autocast (``--dtype``), and ``--compile`` compiles it. Each chunk
reports images per second.

  python -m experiments.research.tiny_teacher.train_unet --work runs/teacher --minutes 30 --eval-count 200
  python -m experiments.research.tiny_teacher.train_unet --work runs/teacher --minutes 30   # resumes

Recipe (fixed at the first call): prediction type, min-SNR-gamma loss weighting, learning rate with
a linear warm-up then constant, EMA decay, batch, guidance dropout, latent normalisation, attention
heads, and where the weights start (``--init``: a pipeline directory; ``--from-scratch``: fresh
U-Net and text encoder weights with that pipeline's tokenizer and VAE).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from experiments.research.tiny_teacher.defect_check import blank_share
from experiments.research.tiny_teacher.eval_tiny_teacher import generate, save_grid
from hybridsd_nas.core.checkpoint import generator_states, load_state, restore_generators, save_state
from hybridsd_nas.data import CLASS_NAMES, PROMPT_TEMPLATES, load_fashion_mnist, prompt_for_label, to_rgb_uint8
from hybridsd_nas.metrics import FeatureExtractor, fid_kid, load_classifier, prompt_adherence, reference_features
from hybridsd_nas.zoo import model_path, recipe

ROOT = Path(__file__).resolve().parents[3]  # the repository
RECIPE_KEYS = ("init", "from_scratch", "prediction_type", "min_snr_gamma", "lr", "warmup", "ema", "batch",
               "uncond_prob", "normalise_latents", "attention_heads", "weight_decay", "seed", "limit_images", "dtype")
# The evidence behind these defaults: docs/decisions/0002-tiny-teacher-recipe.md
DEFAULTS = {
    "init": None, "from_scratch": False, "prediction_type": "epsilon", "min_snr_gamma": 5.0, "lr": 3e-4, "warmup": 200,
    "ema": 0.999, "batch": 64, "uncond_prob": 0.1, "normalise_latents": True, "attention_heads": "1,2,3,3",
    "weight_decay": 1e-2, "seed": 0, "limit_images": 0, "dtype": "auto",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--work", required=True, help="the run's directory (created by the first call, resumed by later ones)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--minutes", type=float, default=0.0, help="end this chunk after this many minutes of training (0: no limit)")
    p.add_argument("--steps", type=int, default=0, help="end this chunk after this many steps (0: no limit)")
    p.add_argument("--until-step", type=int, default=0, help="end this chunk when the run reaches this step (0: no limit)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="also checkpoint every this many minutes")
    p.add_argument("--log-every", type=int, default=50, help="steps between rows of loss.csv")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (pays on a GPU)")
    p.add_argument("--export", default=None, help="at the chunk's end, also write the pipeline here (default: WORK/pipeline)")
    p.add_argument("--eval-count", type=int, default=0, help="at the chunk's end, sample this many images and score them (0: no scoring)")
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-fid", action=argparse.BooleanOptionalAction, default=True, help="include FID in the scoring")
    g = p.add_argument_group("recipe (fixed by the run's first call; a resumed run refuses a different value)")
    g.add_argument("--init", default=None, help="pipeline directory the run starts from (default: the embedded tiny teacher)")
    g.add_argument("--from-scratch", action="store_true", default=None, help="fresh U-Net and text encoder weights (tokenizer and VAE from --init)")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    g.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting (0: plain MSE)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW), constant after the warm-up")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--ema", type=float, default=None, help="EMA decay of the exported weights")
    g.add_argument("--batch", type=int, default=None)
    g.add_argument("--uncond-prob", type=float, default=None, help="share of prompts dropped to '' (classifier-free guidance)")
    g.add_argument("--normalise-latents", action=argparse.BooleanOptionalAction, default=None,
                   help="fold per-channel latent mean/std into the VAE (scaling_factor 1)")
    g.add_argument("--attention-heads", default=None, help="heads per U-Net level, comma-separated (SD-1.x: 8 at every level)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--limit-images", type=int, default=None, help="train on the first N images only (tests)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="autocast dtype of the U-Net (auto: bfloat16 on CUDA, float32 on CPU)")
    return p.parse_args(argv)


def recipe_of(args, work: Path) -> dict:
    """The run's recipe: settings.json's when resuming (a flag that disagrees is an error), else the flags over the defaults."""
    given = {k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k) is not None}
    if given.get("init"):  # the run records the absolute path; a relative --init names the same directory
        given["init"] = str(Path(given["init"]).resolve())
    f = work / "settings.json"
    if f.is_file():
        fixed = json.loads(f.read_text())["recipe"]
        clash = {k: (v, fixed[k]) for k, v in given.items() if fixed.get(k) != v}
        if clash:
            what = ", ".join(f"--{k.replace('_', '-')} {a!r} (the run has {b!r})" for k, (a, b) in clash.items())
            raise SystemExit(f"error: {work} is a run with another recipe: {what}; drop these flags to resume it, or use a new --work")
        return fixed
    r = {**DEFAULTS, **given}
    r["init"] = str(Path(r["init"]).resolve()) if r["init"] else str(model_path("tiny"))
    return r


def device_of(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


class Log:
    def __init__(self, path: Path):
        self.fh = open(path, "a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.fh.write(line + "\n")
        self.fh.flush()


def all_prompts() -> list[str]:
    return [prompt_for_label(c, template=t) for c in range(len(CLASS_NAMES)) for t in range(len(PROMPT_TEMPLATES))]


def encode_training_set(vae, r: dict, device: str, log: Log) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The training images' posterior means and stds, times the VAE's scaling factor, and their labels."""
    train = load_fashion_mnist("train")
    imgs, labels = train.images, train.labels
    if r["limit_images"]:
        imgs, labels = imgs[: r["limit_images"]], labels[: r["limit_images"]]
    x = torch.from_numpy(to_rgb_uint8(imgs, 32))
    t0 = time.time()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 512):
            d = vae.encode(x[i : i + 512].to(device).float().div(127.5).sub(1.0)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
    log(f"encoded {len(x)} training images in {time.time() - t0:.0f}s")
    sf = vae.config.scaling_factor
    return torch.cat(means) * sf, torch.cat(stds) * sf, labels


def save_latents(work: Path, mean: torch.Tensor, std: torch.Tensor, labels: np.ndarray) -> None:
    save_file({"mean": mean.contiguous(), "std": std.contiguous(), "labels": torch.from_numpy(labels.astype(np.int64))},
              str(work / "latents.safetensors"))


def prepare(work: Path, r: dict, device: str, log: Log) -> None:
    """First call: the VAE (normalised), tokenizer and the training set's latents, written into ``work``."""
    init = Path(r["init"])
    vae = AutoencoderKL.from_pretrained(init / "vae").to(device).eval()
    mean, std, labels = encode_training_set(vae, r, device, log)
    if r["normalise_latents"]:
        ch_mean, ch_std = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
        log(f"latent normalisation: per-channel mean {[round(v, 3) for v in ch_mean.tolist()]}, "
            f"std {[round(v, 3) for v in ch_std.tolist()]} (scaling_factor {vae.config.scaling_factor:.4f} -> 1)")
        mean, std = (mean - ch_mean.view(1, -1, 1, 1)) / ch_std.view(1, -1, 1, 1), std / ch_std.view(1, -1, 1, 1)
        recipe.normalise_latents(vae.cpu(), ch_mean, ch_std)
    vae.cpu().save_pretrained(work / "vae", safe_serialization=True)
    shutil.copytree(init / "tokenizer", work / "tokenizer", dirs_exist_ok=True)
    save_latents(work, mean, std, labels)


def ensure_latents(work: Path, r: dict, device: str, log: Log) -> None:
    """A resumed run whose latent cache was removed (it is large and recomputable) encodes it again
    with the run's own (normalised) VAE: the same latents to float rounding."""
    if not (work / "latents.safetensors").is_file():
        log("no latents.safetensors in the run: encoding the training set again with the run's VAE")
        vae = AutoencoderKL.from_pretrained(work / "vae").to(device).eval()
        save_latents(work, *encode_training_set(vae, r, device, log))


def build_models(r: dict, work: Path, device: str):
    init = Path(r["init"])
    text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder")
    unet_cfg = dict(UNet2DConditionModel.load_config(init / "unet"))
    heads = [int(h) for h in str(r["attention_heads"]).split(",")]
    unet_cfg["attention_head_dim"] = heads[0] if len(heads) == 1 else heads
    unet = UNet2DConditionModel.from_config(unet_cfg)
    if r["from_scratch"]:
        torch.manual_seed(r["seed"])
        text_encoder = CLIPTextModel(text_encoder.config)
        unet = UNet2DConditionModel.from_config(unet_cfg)
    else:  # the head split does not change any weight's shape
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
    return text_encoder.to(device), unet.to(device)


def lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1))


def loss_weights(alphas_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights: min-SNR-gamma (Hang et al. 2023), or ones when ``gamma`` is 0."""
    if gamma <= 0:
        return torch.ones_like(alphas_t)
    snr = alphas_t / (1 - alphas_t)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def export(work: Path, out: Path, text_encoder, unet, r: dict) -> Path:
    """The pipeline directory with these weights, float32, loadable by stock ``StableDiffusionPipeline``."""
    init = Path(r["init"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=copy.deepcopy(text_encoder).float().cpu(),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"), unet=copy.deepcopy(unet).float().cpu(),
        scheduler=recipe.sampling_scheduler(r["prediction_type"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for extra in ("eval_prompts.json", "sampling.json", "README.md"):
        if (init / extra).is_file() and not (out / extra).exists():
            shutil.copy(init / extra, out / extra)
    if (init / "eval_classifier").is_dir():
        shutil.copytree(init / "eval_classifier", out / "eval_classifier", dirs_exist_ok=True)
    return out


def score(pipeline_dir: Path, count: int, guidance: float, steps: int, device: str, with_fid: bool, grid: Path | None) -> dict:
    """Adherence (eval classifier), blank share and FID (against the first 1000 Fashion-MNIST test images) of ``count`` samples."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    entries = json.loads((pipeline_dir / "eval_prompts.json").read_text())
    chosen = [entries[i % len(entries)] for i in range(count)]
    t0 = time.time()
    imgs = generate(pipe, [e["prompt"] for e in chosen], 0, steps, guidance, 100, device)
    classes = np.array([e["class_index"] for e in chosen])
    out = {"count": count, "guidance": guidance, "steps": steps, "sampler": type(pipe.scheduler).__name__, "seed": 0,
           "sample_seconds": round(time.time() - t0, 1),
           "adherence": prompt_adherence(load_classifier(pipeline_dir / "eval_classifier"), imgs, classes),
           "blank": blank_share(imgs)}
    if with_fid:
        test = load_fashion_mnist("test")
        fx = FeatureExtractor(device=device)
        ref = reference_features(to_rgb_uint8(test.images[:1000], 32), name="fashion-mnist-test-first1000", resolution=32, extractor=fx)
        m = fid_kid(imgs, ref, extractor=fx, kid_subset_size=min(100, count), seed=0)
        out["fid"] = m["fid"]
        out["fid_reference"] = "Fashion-MNIST test images 0..999"
    if grid is not None:
        save_grid(imgs, classes, grid, per_class=min(8, max(1, count // 10)), title=f"{pipeline_dir.name}: PNDM {steps} steps, guidance {guidance:g}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r = recipe_of(args, work)
    device = device_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.startswith("cuda")
    amp_dtype = {"auto": torch.bfloat16 if cuda else None, "float32": None, "bfloat16": torch.bfloat16}[r["dtype"]]
    log = Log(work / "train_log.txt")
    resume = (work / "checkpoint" / "state.json").is_file()
    if not resume:
        log(f"new run in {work}: {json.dumps(r)}")
        prepare(work, r, device, log)
        (work / "settings.json").write_text(json.dumps({"recipe": r, "torch": torch.__version__, "unet_config_from": r["init"]}, indent=1) + "\n")
    ensure_latents(work, r, device, log)
    lat = load_file(str(work / "latents.safetensors"))
    lat_mean, lat_std, labels = lat["mean"].to(device), lat["std"].to(device), lat["labels"].to(device)
    n = len(labels)
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    prompts = all_prompts()
    prompt_ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
    n_templates = len(PROMPT_TEMPLATES)

    text_encoder, unet = build_models(r, work, device)
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval().requires_grad_(False), copy.deepcopy(unet).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    gen = torch.Generator(device=device).manual_seed(r["seed"])
    step = 0
    if resume:
        tensors, meta = load_state(work / "checkpoint", ["unet", "text_encoder", "ema_unet", "ema_text", "rng"], optimizer=opt)
        for m, name in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            m.load_state_dict(tensors[name])
        restore_generators({"gen": gen}, tensors["rng"])
        step = int(meta["step"])
        log(f"resumed {work} at step {step} ({meta['seconds']:.0f}s of training so far)")
    trained_s = meta["seconds"] if resume else 0.0
    images_total = meta["images"] if resume else 0

    def checkpoint(seconds: float) -> None:
        save_state(work / "checkpoint", {
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(), "rng": generator_states({"gen": gen}),
        }, {"step": step, "seconds": seconds, "images": images_total}, optimizer=opt)

    alphas = recipe.training_scheduler(r["prediction_type"]).alphas_cumprod.to(device)
    model = torch.compile(unet) if args.compile else unet
    unet.train()
    text_encoder.train()
    uncond = len(prompts)
    log(f"chunk on {device} ({device_label(device)}), autocast {amp_dtype or 'off'}, compile {args.compile}, "
        f"batch {r['batch']}, from step {step}")
    loss_csv = work / "loss.csv"
    new_csv = not loss_csv.is_file()
    csv_fh = open(loss_csv, "a", newline="")
    writer = csv.writer(csv_fh)
    if new_csv:
        writer.writerow(["step", "loss", "lr", "train_seconds", "images_per_second"])
    t_chunk = time.time()
    t_ckpt, paused = t_chunk, 0.0  # paused: checkpointing time, not counted as training
    start_step = step
    acc, acc_n, t_log = torch.zeros((), device=device), 0, time.time()
    B = r["batch"]
    while True:
        done = step - start_step
        if (args.steps and done >= args.steps) or (args.until_step and step >= args.until_step) or \
                (args.minutes and time.time() - t_chunk - paused >= args.minutes * 60):
            break
        for gp in opt.param_groups:
            gp["lr"] = r["lr"] * lr_factor(step, r["warmup"])
        idx = torch.randint(0, n, (B,), device=device, generator=gen)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_std[idx].shape, device=device, generator=gen)
        tmpl = torch.randint(0, n_templates, (B,), device=device, generator=gen)
        pid = labels[idx] * n_templates + tmpl
        drop = torch.rand(B, device=device, generator=gen) < r["uncond_prob"]
        pid = torch.where(drop, torch.full_like(pid, uncond), pid)
        t = torch.randint(0, len(alphas), (B,), device=device, generator=gen)
        eps = torch.randn(z0.shape, device=device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = eps if r["prediction_type"] == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            cond = text_encoder(prompt_ids)[0][pid]  # the 51 distinct prompts once, then gathered
            pred = model(zt, t, cond).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean((1, 2, 3))
        loss = (per * loss_weights(alphas[t], r["min_snr_gamma"], r["prediction_type"])).mean()
        if not torch.isfinite(loss):
            log(f"non-finite loss at step {step}; the checkpoint holds the last good state")
            return 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema_m, m in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p_ in zip(ema_m.parameters(), m.parameters()):
                    pe.lerp_(p_, 1.0 - r["ema"])
        step += 1
        images_total += B
        acc += loss.detach()
        acc_n += 1
        if step % args.log_every == 0:
            now = time.time()
            ips = acc_n * B / (now - t_log)
            row = [step, round(float(acc) / acc_n, 5), r["lr"] * lr_factor(step - 1, r["warmup"]),
                   round(trained_s + now - t_chunk - paused, 1), round(ips, 1)]
            writer.writerow(row)
            csv_fh.flush()
            if step % (args.log_every * 10) == 0:
                log(f"step {step} loss {row[1]:.4f} {ips:.0f} images/s")
            acc, acc_n, t_log = torch.zeros((), device=device), 0, now
        if time.time() - t_ckpt > args.checkpoint_minutes * 60:
            t0 = time.time()
            checkpoint(trained_s + t0 - t_chunk - paused)
            t_ckpt = time.time()
            paused += t_ckpt - t0
    if cuda:
        torch.cuda.synchronize()
    chunk_s = time.time() - t_chunk - paused
    trained_s += chunk_s
    checkpoint(trained_s)
    csv_fh.close()
    steps_done = step - start_step
    ips = steps_done * B / chunk_s if chunk_s > 0 else 0.0
    summary = {"from_step": start_step, "to_step": step, "train_seconds": round(chunk_s, 1), "images_per_second": round(ips, 1),
               "run_train_seconds": round(trained_s, 1), "run_images": images_total, "device": device_label(device),
               "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "compile": args.compile,
               "batch": B, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"chunk done: steps {start_step}..{step}, {chunk_s:.0f}s, {ips:.1f} images/s")
    out = Path(args.export) if args.export else work / "pipeline"
    if args.export or args.eval_count:
        export(work, out, ema_text, ema_unet, r)
        log(f"exported the moving-average weights to {out}")
    if args.eval_count:
        torch.manual_seed(0)
        summary["eval"] = score(out, args.eval_count, args.eval_guidance, args.eval_steps, device, args.eval_fid, work / "grid.png")
        log(f"eval at step {step}: {json.dumps(summary['eval'])}")
    with open(work / "chunks.jsonl", "a") as fh:
        fh.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
