"""How the embedded ``tiny`` teacher is built: a CLIP-style tokenizer, and the component configs.

Everything here is stock diffusers / transformers: the shipped directory loads with
``StableDiffusionPipeline.from_pretrained(path)`` and no hybridsd_nas code. The training itself
is in ``experiments/research/tiny_teacher/train_tiny_teacher.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import regex
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py), applied to lower-cased text.
_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # SD-1.x text length

# The U-Net: exactly the SD-1.x block topology, scaled down in channels (SD-1.x: 320, 640, 1280, 1280).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 96, 96],
    "layers_per_block": 2,
    "attention_head_dim": 8,  # diffusers' name for the number of heads in SD-1.x configs
    "cross_attention_dim": 128,
    "norm_num_groups": 32,
}

# The VAE: 32x32 RGB <-> 16x16x4 latents (one downsampling; SD-1.x has three).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}

# The text encoder: a CLIP text transformer, small (SD-1.x: 768 wide, 12 layers).
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 128,
}

# SD-1.x's scheduler settings (PNDM, scaled-linear betas), as shipped with SD-1.5.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_random_pipeline(out: str | Path, captions: Iterable[str], *, unet: dict[str, Any] | None = None,
                          text_hidden: int = 64, seed: int = 1, scheduler: str = "ddim") -> Path:
    """Write a random-weight SD-1.x-topology pipeline to ``out/pipeline`` (a stand-in for a user's own
    checkpoint in tests and benchmarks): the tiny U-Net with ``unet`` overrides (default other widths
    than the embedded teacher's), a CLIP text encoder ``text_hidden`` wide, the tiny VAE, a tokenizer
    learnt from ``captions``, and a DDIM (or PNDM) scheduler with SD-1.5's betas."""
    out = Path(out)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "tokenizer-source", captions))
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                                        projection_dim=text_hidden, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    cfg = {**UNET_CONFIG, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": 2, **(unet or {}),
           "cross_attention_dim": text_hidden}
    sched = DDIMScheduler.from_config(training_scheduler().config) if scheduler == "ddim" else sampling_scheduler()
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE_CONFIG), text_encoder=text, tokenizer=tok,
                                   unet=UNet2DConditionModel(**cfg), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return out / "pipeline"


def sampling_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """The shipped sampler: PNDM with SD-1.5's settings. Its config also says ``clip_sample: false``
    (as SD-1.5's does): PNDM ignores it, but DDIM and others made ``from_config`` of it read it, and
    their default (True) clips the predicted clean latents to [-1, 1], cutting off latents of std 1."""
    sched = PNDMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    sched.register_to_config(clip_sample=False)
    return sched


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The noise schedule training uses: the sampler's betas and timesteps, as a DDPM scheduler."""
    keep = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    return DDPMScheduler(**{**keep, "prediction_type": prediction_type, "clip_sample": False})


@torch.no_grad()
def normalise_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel affine map into ``vae`` so that its scaled latents have per-channel ``mean``
    0 and ``std`` 1: ``z' = (z * scaling_factor - mean) / std``.

    ``mean`` and ``std`` are per-channel statistics of the scaled latents (``z * scaling_factor``).
    The encoder's ``quant_conv`` (which outputs the posterior's mean and log-variance) absorbs the map,
    the decoder's ``post_quant_conv`` its inverse, and ``scaling_factor`` becomes 1: encoding then
    decoding is unchanged, and a stock ``StableDiffusionPipeline`` (which only divides by the scaling
    factor) samples in the normalised space.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("normalise_latents needs a VAE with quant_conv and post_quant_conv (use_quant_conv=True)")
    c = vae.config.latent_channels
    sigma = float(vae.config.scaling_factor)
    mean, std = mean.double().flatten(), std.double().flatten()
    if mean.numel() != c or std.numel() != c or bool((std <= 0).any()):
        raise ValueError(f"need {c} per-channel means and positive stds, got {mean.tolist()} and {std.tolist()}")
    gain = sigma / std  # raw posterior mean -> normalised
    q = vae.quant_conv
    w, b = q.weight.double(), q.bias.double()
    w[:c] *= gain.view(-1, 1, 1, 1)
    b[:c] = b[:c] * gain - mean / std
    b[c:] += 2 * torch.log(gain)  # log-variance of the scaled posterior
    q.weight.copy_(w)
    q.bias.copy_(b)
    p = vae.post_quant_conv
    w, b = p.weight.double(), p.bias.double()
    b += (w[:, :, 0, 0] @ (mean / sigma))  # the raw latent is (std * z' + mean) / sigma
    w *= (std / sigma).view(1, -1, 1, 1)
    p.weight.copy_(w)
    p.bias.copy_(b)
    vae.register_to_config(scaling_factor=1.0)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _words(texts: Iterable[str]) -> Counter:
    b2u = bytes_to_unicode()
    counts: Counter = Counter()
    for t in texts:
        for w in _PAT.findall(" ".join(t.lower().split())):
            counts["".join(b2u[b] for b in w.encode("utf-8"))] += 1
    return counts


def learn_bpe(texts: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, learnt CLIP-style (end-of-word marked ``</w>``), until every word of ``texts`` is one token.

    Deterministic: the most frequent pair wins, ties broken by the pair's text.
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in _words(texts).items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for sym, c in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += c
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for sym, c in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new


def write_clip_tokenizer(out_dir: str | Path, texts: Iterable[str], max_length: int = MAX_LENGTH) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) whose BPE covers ``texts`` word by word.

    The vocabulary is laid out as CLIP's: 256 byte characters, the same with ``</w>``, one entry per
    merge, then the start and end tokens; any other text still tokenizes (into byte pieces).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(texts)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for v in vocab_list:  # a merge can recreate a base symbol; keep the first id
        vocab.setdefault(v, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def vocab_size(tokenizer_dir: str | Path) -> int:
    return len(json.loads((Path(tokenizer_dir) / "vocab.json").read_text()))
