"""Train the embedded ``tiny`` teacher: a complete StableDiffusionPipeline on Fashion-MNIST.

Phases, all from scratch on the real Fashion-MNIST training images (32x32, zero-padded, RGB):
  1. a CLIP-style BPE tokenizer learnt from the prompt templates;
  2. the VAE (32x32x3 <-> 16x16x4), reconstruction MSE + a small KL term; optionally (--decoder-steps)
     the decoder alone fine-tuned to reconstruct the image from noisy latents, which makes it robust to
     the small latent errors of a sampled U-Net output (the encoder, hence the latent space, is unchanged);
  3. the text encoder and U-Net (SD-1.x block topology), written untrained (or as --resume has them);
     ``train_unet.py --init DIR --from-scratch`` trains them, in chunks that resume exactly;
  4. the prompt-adherence classifier (a small CNN on the real training images).
Writes the pipeline directory (default: hybridsd_nas/zoo/tiny) and settings.json, loss.csv,
loss.png and train_log.txt to --results (default results/tiny_teacher/).

Runs on CPU or CUDA (``--device``); the saved pipeline is float32 and runs on CPU.
  python -m experiments.research.tiny_teacher.train_tiny_teacher --device cuda --out runs/new-teacher
  python -m experiments.research.tiny_teacher.train_unet --work runs/new-teacher-unet --init runs/new-teacher --from-scratch
(The teachers v1-v3 were trained by this script's own U-Net phase, as of commit 6cd081b.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]  # the repository

from hybridsd_nas.data import CLASS_NAMES, PROMPT_TEMPLATES, eval_prompts, load_fashion_mnist, prompt_for_label, to_rgb_uint8  # noqa: E402
from hybridsd_nas.zoo import recipe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "hybridsd_nas" / "zoo" / "tiny"), help="pipeline directory to write")
    p.add_argument("--results", default=str(ROOT / "results" / "tiny_teacher"), help="where settings, loss curve and log go")
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: the Debian path)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="continue from this pipeline directory (its tokenizer, VAE, text encoder, U-Net)")
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (0 with --resume: keep the resumed VAE)")
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-minutes", type=float, default=0.0, help="also stop the VAE phase after this many minutes (0: no limit)")
    p.add_argument("--vae-kl", type=float, default=1e-6, help="weight of the KL term")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="then fine-tune the VAE decoder alone on noisy latents (encoder frozen: the latent space and a "
                        "U-Net trained on it stay valid); 0 skips")
    p.add_argument("--decoder-noise", type=float, default=0.2,
                   help="decoder fine-tuning: latent noise std drawn uniformly from [0, this] per image (scaled latent units)")
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--decoder-batch", type=int, default=128)
    p.add_argument("--decoder-minutes", type=float, default=0.0, help="also stop the decoder phase after this many minutes (0: no limit)")
    p.add_argument("--classifier-epochs", type=int, default=6, help="0 skips the classifier")
    p.add_argument("--limit-images", type=int, default=0, help="train on the first N images only (smoke tests)")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def log(msg: str, fh) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def end_of_step(phase: str, step: int, total: int, mse: float, extra: str, deadline: float, minutes: float, args, curve, fh) -> bool:
    """Record a VAE/decoder step's MSE every --log-every steps (and print every tenth record);
    True when the phase's time limit is reached."""
    if step % args.log_every == 0 or step == total:
        curve.append((f"{phase}_mse", step, mse))
        if step % (args.log_every * 10) == 0 or step == total:
            log(f"{phase} step {step}/{total} mse {mse:.5f} {extra}", fh)
    if time.time() > deadline:
        log(f"{phase}: time limit of {minutes} min reached at step {step}", fh)
        return True
    return False


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 arithmetic, as on CPU
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out, res = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    fh = open(res / "train_log.txt", "w")
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    log(f"device {device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}", fh)
    t_all = time.time()
    timings: dict[str, float] = {}
    curve: list[tuple[str, int, float]] = []

    train = load_fashion_mnist("train", args.data_root)
    test = load_fashion_mnist("test", args.data_root)
    imgs_u8, labels = train.images, train.labels
    if args.limit_images:
        imgs_u8, labels = imgs_u8[: args.limit_images], labels[: args.limit_images]
    x_all = torch.from_numpy(to_rgb_uint8(imgs_u8, 32)).float().div(127.5).sub(1.0).to(device)
    n = len(x_all)
    log(f"Fashion-MNIST train: {n} images, 32x32 RGB in [-1, 1]", fh)

    # 1. tokenizer
    all_prompts = [prompt_for_label(c, template=t) for c in range(len(CLASS_NAMES)) for t in range(len(PROMPT_TEMPLATES))]
    if args.resume:
        import shutil

        src = Path(args.resume)
        if src.resolve() != out.resolve():
            shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
            if (src / "eval_classifier").is_dir() and args.classifier_epochs == 0:
                shutil.copytree(src / "eval_classifier", out / "eval_classifier", dirs_exist_ok=True)
        log(f"resuming from {src}", fh)
    else:
        recipe.write_clip_tokenizer(out / "tokenizer", all_prompts)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    log(f"tokenizer: {len(tokenizer)} tokens; {len(all_prompts)} prompts", fh)

    # 2. VAE
    t0 = time.time()
    vae = (AutoencoderKL.from_pretrained(Path(args.resume) / "vae") if args.resume else AutoencoderKL(**recipe.VAE_CONFIG)).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae_warm = max(1, args.vae_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / vae_warm, 0.5 * (1 + math.cos(math.pi * min(s / max(args.vae_steps, 1), 1.0)))))
    vae.train()
    vae_deadline = time.time() + args.vae_minutes * 60 if args.vae_minutes > 0 else math.inf
    step = 0
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, n, (args.vae_batch,), device=device)
        xb = x_all[idx]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, xb)
        kl = post.kl().mean() / xb[0].numel()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if end_of_step("vae", step, args.vae_steps, mse.item(), f"kl {kl.item():.3f}", vae_deadline, args.vae_minutes, args, curve, fh):
            break
    vae_steps_done = step if args.vae_steps > 0 else 0
    vae.eval()
    if args.vae_steps > 0 or not args.resume:  # a new VAE: scale its latents to unit std
        with torch.no_grad():
            means, stds = [], []
            for i in range(0, n, 1024):
                d = vae.encode(x_all[i : i + 1024]).latent_dist
                means.append(d.mean)
                stds.append(d.std)
            lat_mean, lat_std = torch.cat(means), torch.cat(stds)
            scaling = float(1.0 / (lat_mean + lat_std * torch.randn_like(lat_std)).std())
        vae.register_to_config(scaling_factor=scaling)
    else:
        scaling = float(vae.config.scaling_factor)

    # 2b. decoder fine-tuning on noisy latents (encoder frozen)
    dec_steps_done = 0
    if args.decoder_steps > 0:
        t_dec = time.time()
        train_params = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
        opt = torch.optim.AdamW(train_params, lr=args.decoder_lr, weight_decay=0.0)
        dec_deadline = time.time() + args.decoder_minutes * 60 if args.decoder_minutes > 0 else math.inf
        vae.decoder.train()
        for step in range(1, args.decoder_steps + 1):
            xb = x_all[torch.randint(0, n, (args.decoder_batch,), device=device)]
            with torch.no_grad():
                z = vae.encode(xb).latent_dist.sample() * scaling
            sig = torch.rand(len(z), 1, 1, 1, device=device) * args.decoder_noise
            rec = vae.decode((z + sig * torch.randn_like(z)) / scaling).sample
            mse = F.mse_loss(rec, xb)
            opt.zero_grad(set_to_none=True)
            mse.backward()
            torch.nn.utils.clip_grad_norm_(train_params, 1.0)
            opt.step()
            dec_steps_done = step
            if end_of_step("decoder", step, args.decoder_steps, mse.item(), f"({time.time() - t_dec:.0f}s)", dec_deadline,
                           args.decoder_minutes, args, curve, fh):
                break
        vae.eval()
        timings["decoder_s"] = time.time() - t_dec
        log(f"decoder fine-tuning: {dec_steps_done} steps in {timings['decoder_s']:.1f}s (latent noise std U[0, {args.decoder_noise}])", fh)
    with torch.no_grad():
        held = torch.from_numpy(to_rgb_uint8(test.images[:1000], 32)).float().div(127.5).sub(1.0).to(device)
        rec_test = F.mse_loss(vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1), held).item()
    timings["vae_s"] = time.time() - t0
    log(f"vae done in {timings['vae_s']:.1f}s; latent scaling_factor {scaling:.4f}; test reconstruction MSE {rec_test:.5f} ([-1,1] scale)", fh)

    # 3. text encoder + U-Net: fresh weights (or --resume's) here; train_unet.py trains them
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **recipe.TEXT_CONFIG)
    if args.resume:
        text_encoder = CLIPTextModel.from_pretrained(Path(args.resume) / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(Path(args.resume) / "unet")
    else:
        text_encoder = CLIPTextModel(text_cfg)
        unet = UNet2DConditionModel(**recipe.UNET_CONFIG)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(f"U-Net {n_unet / 1e6:.3f}M params, text encoder {n_text / 1e6:.3f}M params"
        f"{' (from --resume)' if args.resume else ' (untrained: train them with train_unet.py --init ' + str(out) + ' --from-scratch)'}", fh)

    # save the pipeline, float32
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=recipe.sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "eval_prompts.json").write_text(json.dumps(eval_prompts(per_class=2), indent=1) + "\n")

    # 4. classifier
    clf_report = None
    if args.classifier_epochs > 0:
        from hybridsd_nas.metrics.adherence import save_classifier, train_classifier

        t0 = time.time()
        clf, clf_report = train_classifier(
            to_rgb_uint8(imgs_u8, 32), labels, to_rgb_uint8(test.images, 32), test.labels,
            epochs=args.classifier_epochs, device=device, seed=args.seed,
        )
        save_classifier(clf, out / "eval_classifier", extra={
            "trained_on": f"Fashion-MNIST train ({len(labels)} images), 32x32 zero-padded, grey",
            "test_accuracy": clf_report.test_accuracy, "test_images": len(test.labels),
            "epochs": clf_report.epochs, "device": dev_name, "seed": args.seed,
        })
        timings["classifier_s"] = time.time() - t0
        log(f"classifier: test accuracy {clf_report.test_accuracy:.4f} on {len(test.labels)} real test images ({timings['classifier_s']:.1f}s)", fh)

    timings["total_s"] = time.time() - t_all
    settings = {
        "args": vars(args),
        "device": device, "device_name": dev_name, "dtype": "float32 (TF32 off)",
        "torch": torch.__version__, "train_images": n, "resolution": 32, "latent": "16x16x4",
        "unet_config": recipe.UNET_CONFIG, "vae_config": recipe.VAE_CONFIG, "text_config": recipe.TEXT_CONFIG,
        "unet_params": n_unet, "text_encoder_params": n_text, "vae_params": sum(p.numel() for p in vae.parameters()),
        "vocab_size": len(tokenizer), "vae_scaling_factor": scaling, "vae_test_recon_mse": rec_test,
        "vae_steps_done": vae_steps_done, "decoder_steps_done": dec_steps_done,
        "wall_seconds": timings, "classifier": clf_report.as_dict() if clf_report else None,
    }
    (res / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n")
    with open(res / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "step", "loss"])
        w.writerows(curve)
    try:
        plot_curve(curve, res / "loss.png", f"{device} ({dev_name})")
    except Exception as e:  # plotting is optional on a bare machine
        log(f"no loss.png: {e}", fh)
    log(f"all done in {timings['total_s']:.1f}s; pipeline in {out}", fh)
    fh.close()
    return 0


def plot_curve(curve, path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("vae_mse", "VAE reconstruction MSE"), ("decoder_mse", "decoder MSE from noisy latents")]
    phases = [(k, t) for k, t in phases if any(p == k for p, _, _ in curve)] or phases[:1]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.6), squeeze=False)
    for ax, (phase, title) in zip(axes[0], phases):
        pts = [(s, v) for p, s, v in curve if p == phase]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"tiny teacher training on Fashion-MNIST, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
