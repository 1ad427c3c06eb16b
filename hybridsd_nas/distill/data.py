"""Training data for distillation: VAE latents of images with the text embeddings of their captions.

Sources: the embedded teacher's image set (Fashion-MNIST with class prompts) by default; any folder
of images with captions (``captions.jsonl``/``captions.json`` mapping file name to caption, or a
``.txt`` beside each image); or the teacher's own samples when no data is given. Encoded latents
are cached on disk by content (teacher, source, count, seed) as safetensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.core.paths import cache_dir as root
from hybridsd_nas.data import load_fashion_mnist, prompt_for_label, to_rgb_uint8
from hybridsd_nas.sources import pipeline_fingerprint

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DistillData:
    latents: torch.Tensor  # (N, C, h, w), already multiplied by the VAE's scaling factor
    prompt_index: torch.Tensor  # (N,) index into ``embeddings``
    embeddings: torch.Tensor  # (P + 1, L, D); the last row is the empty prompt (unconditional)
    prompts: list[str]
    source: str

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, idx: torch.Tensor, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pi = self.prompt_index[idx]
        if p_uncond > 0:
            drop = torch.rand(len(idx), generator=g) < p_uncond
            pi = torch.where(drop, torch.full_like(pi, len(self.prompts)), pi)
        return self.latents[idx], self.embeddings[pi]


def cache_dir() -> Path:
    return root() / "distill_data"


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch: int = 64) -> torch.Tensor:
    tok, enc = pipe.tokenizer, pipe.text_encoder
    out = []
    allp = list(prompts) + [""]
    for i in range(0, len(allp), batch):
        ids = tok(allp[i : i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out.append(enc(ids.to(enc.device))[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(pipe, images_u8: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> scaled VAE latents (posterior mode: deterministic)."""
    vae = pipe.vae
    sf = vae.config.scaling_factor
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(np.ascontiguousarray(images_u8[i : i + batch])).float().div(127.5).sub(1.0)
        out.append(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu() * sf)
    return torch.cat(out)


def _cached(key: dict[str, Any], build) -> DistillData:
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    d = cache_dir() / h
    if (d / "data.safetensors").is_file() and (d / "meta.json").is_file():
        t = load_file(str(d / "data.safetensors"))
        meta = json.loads((d / "meta.json").read_text())
        return DistillData(t["latents"], t["prompt_index"], t["embeddings"], meta["prompts"], meta["source"])
    data = build()
    d.mkdir(parents=True, exist_ok=True)
    save_file({"latents": data.latents.contiguous(), "prompt_index": data.prompt_index.contiguous(),
               "embeddings": data.embeddings.contiguous()}, str(d / "data.safetensors"))
    (d / "meta.json").write_text(json.dumps({"prompts": data.prompts, "source": data.source, "key": key}))
    return data


def _pipe_key(pipe) -> str:
    """The cache key of the latents and embeddings a pipeline makes: its directory's content
    fingerprint, its hub id, or (built in memory) a hash of its text encoder's and VAE's weights."""

    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    if name:
        try:
            return pipeline_fingerprint(name)
        except HybridSDError:  # not a pipeline directory or hub id: key by the weights themselves
            pass
    h = hashlib.sha1()
    for module in (pipe.text_encoder, pipe.vae):
        for t in module.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    return f"{name or 'in-memory pipeline'}#{h.hexdigest()[:16]}"


def fashion_mnist_data(pipe, n: int = 2048, seed: int = 0, resolution: int | None = None,
                       split: str = "train") -> DistillData:
    """``n`` Fashion-MNIST images of ``split`` (``train``; ``test`` for held-out scores) with prompts
    from the class names (random templates)."""

    if split not in ("train", "test"):
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
    res = resolution or pipe.vae.config.sample_size
    key = {"source": f"fashion-mnist-{split}", "n": n, "seed": seed, "res": res, "teacher": _pipe_key(pipe)}

    def build() -> DistillData:
        ds = load_fashion_mnist(split)
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(ds), size=min(n, len(ds)), replace=False)
        prompts, pindex, table = [], [], {}
        for lab in ds.labels[idx]:
            p = prompt_for_label(int(lab), rng)
            if p not in table:
                table[p] = len(prompts)
                prompts.append(p)
            pindex.append(table[p])
        lat = encode_images(pipe, to_rgb_uint8(ds.images[idx], res))
        return DistillData(lat, torch.tensor(pindex), encode_prompts(pipe, prompts), prompts,
                           f"Fashion-MNIST {split}, {len(idx)} images (seed {seed}), {res}px")

    return _cached(key, build)


def folder_data(pipe, folder: str | Path, resolution: int | None = None) -> DistillData:
    """Image-caption pairs from a folder: captions.jsonl / captions.json, or a .txt beside each image."""

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ConfigError(f"{root}: no images ({', '.join(IMAGE_EXTS)})")
    captions: dict[str, str] = {}
    if (root / "captions.jsonl").is_file():
        for line in (root / "captions.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                captions[row["file_name"]] = row["text"]
    elif (root / "captions.json").is_file():
        captions = json.loads((root / "captions.json").read_text())
    res = resolution or pipe.vae.config.sample_size
    key = {"source": str(root.resolve()), "files": [f.name for f in files], "mtime": max(f.stat().st_mtime for f in files),
           "res": res, "teacher": _pipe_key(pipe)}

    def build() -> DistillData:
        imgs, prompts, pindex, table = [], [], [], {}
        for f in files:
            cap = captions.get(f.name)
            if cap is None and f.with_suffix(".txt").is_file():
                cap = f.with_suffix(".txt").read_text().strip()
            if cap is None:
                raise ConfigError(f"{f}: no caption (add {f.with_suffix('.txt').name} or an entry in captions.jsonl)")
            im = Image.open(f).convert("RGB").resize((res, res), Image.BICUBIC)
            imgs.append(np.asarray(im).transpose(2, 0, 1))
            if cap not in table:
                table[cap] = len(prompts)
                prompts.append(cap)
            pindex.append(table[cap])
        lat = encode_images(pipe, np.stack(imgs))
        return DistillData(lat, torch.tensor(pindex), encode_prompts(pipe, prompts), prompts, f"folder {root}, {len(files)} images")

    return _cached(key, build)


def teacher_sample_data(pipe, prompts: list[str], n: int = 256, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> DistillData:
    """The teacher's own samples as data, when no image set is given."""
    if not prompts:
        raise HybridSDError("teacher-sample data needs at least one prompt")
    key = {"source": "teacher-samples", "prompts": prompts, "n": n, "steps": steps, "guidance": guidance, "seed": seed,
           "teacher": _pipe_key(pipe)}

    def build() -> DistillData:
        g = torch.Generator().manual_seed(seed)
        lats, pindex = [], []
        for i in range(0, n, 16):
            k = min(16, n - i)
            ps = [prompts[(i + j) % len(prompts)] for j in range(k)]
            out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="latent")
            lats.append(out.images.float().cpu())
            pindex += [(i + j) % len(prompts) for j in range(k)]
        return DistillData(torch.cat(lats), torch.tensor(pindex), encode_prompts(pipe, prompts), list(prompts),
                           f"teacher samples, {n} images, {steps} steps, guidance {guidance}, seed {seed}")

    return _cached(key, build)
