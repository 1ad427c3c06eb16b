"""Cost accounting of a hybrid run: per model and location, steps, MACs, latency, the bytes that
cross the network, end-to-end latency over a link, and the cloud's share against all-cloud.

The model of a request (the user sits at the edge):

1. the prompt goes up to the text encoder's location (its UTF-8 bytes) when that is the cloud;
2. the text embeddings (cond + uncond with classifier-free guidance) go to each other location
   the first time a U-Net runs there;
3. at every switch of location between U-Net segments the latents cross once (the initial noise
   is drawn from the seed wherever the first segment runs, so it does not travel);
4. the latents go to the decoder's location when it differs from the last segment's;
5. the decoded image (uint8 RGB) comes back down when the decoder ran on the cloud.

A transfer takes ``rtt_ms / 2 + 8 * bytes / bandwidth``. One denoising step with classifier-free
guidance is one U-Net forward on a batch of ``2 * batch`` latents, so its MACs are twice the
batch-1 forward's (MACs are linear in batch).

The all-cloud reference runs the reference U-Net (the teacher) for every step, the text encoder
and the reference decoder on the cloud. Cloud shares are given three ways: by steps, by U-Net
MACs alone, and by MACs of everything the cloud runs (text encoder and decoder included).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.runtime import quiet
from hybridsd_nas.cost.engine import estimate_cost
from hybridsd_nas.cost.latency import time_fn
from hybridsd_nas.sources import vae_scale_factor

# Published component configs of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 vae/ and
# text_encoder/config.json), for weight-free MAC counts of the text encoder and decoder.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408,
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Link:
    """The network between edge and cloud."""

    bandwidth_mbps: float = 100.0
    rtt_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.bandwidth_mbps <= 0 or self.rtt_ms < 0:
            raise HybridSDError(f"bandwidth must be > 0 and RTT >= 0, got {self.bandwidth_mbps} Mbit/s, {self.rtt_ms} ms")

    def transfer_ms(self, nbytes: int) -> float:
        """One-way transfer: half a round trip plus serialisation at the bandwidth."""
        return self.rtt_ms / 2 + nbytes * 8 / (self.bandwidth_mbps * 1e6) * 1e3


@dataclass
class Segment:
    """A U-Net running ``steps`` consecutive steps at ``location``; MACs of one batch-1 forward."""

    model: str
    location: str
    steps: int
    macs_per_forward: int
    ms_per_step: float | None = None  # one step as run (CFG batch included), on that location's device


@dataclass
class Component:
    """The text encoder or the decoder: MACs of one call (batch 1) and where it runs."""

    name: str
    location: str
    macs: int
    ms: float | None = None


def _flop_macs(fn, *args) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops() // 2)


def text_encoder_macs(config: Mapping[str, Any] | Any, text_len: int = 77, projection: bool | None = None) -> int:
    """MACs of one CLIP text-encoder call on ``text_len`` tokens, counted on the meta device; with
    ``projection`` (default: the config's ``architectures`` say ``CLIPTextModelWithProjection``, as
    SDXL's ``text_encoder_2``) the pooled embedding's projection too."""

    cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig(**dict(config))
    if projection is None:
        projection = "CLIPTextModelWithProjection" in (getattr(cfg, "architectures", None) or [])
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    ids = torch.zeros(1, text_len, dtype=torch.long, device="meta")
    return _flop_macs(lambda x: model(input_ids=x), ids)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # a pipeline's text encoders, in the order their outputs are joined
SIZE_CONDITIONS = 6  # SDXL's time ids: original size, crop top-left, target size


@dataclass(frozen=True)
class TextEncoders:
    """A pipeline's text side, weight-free: its encoders' configs (SD-1.x/2.x one, SDXL two, the second
    with a projection) and what the U-Net receives per prompt: ``tokens`` x ``width`` embeddings (SDXL:
    both encoders' hidden states side by side) plus ``added`` elements of added conditions (SDXL: the
    pooled embedding and the size conditions). Build it with :meth:`of`."""

    configs: tuple[dict[str, Any], ...]
    projection: tuple[bool, ...]
    added: int = 0

    @classmethod
    def of(cls, source: Any) -> TextEncoders:
        """From a loaded pipeline or a pipeline directory (``text_encoder/``, ``text_encoder_2/``)."""
        configs, proj, added = [], [], 0
        if isinstance(source, (str, Path)):
            root = Path(source)
            index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
            for name in TEXT_ENCODERS:
                f = root / name / "config.json"
                if f.is_file():
                    cfg = json.loads(f.read_text())
                    configs.append(cfg)
                    entry = index.get(name) or [None, None]
                    proj.append("WithProjection" in str(entry[-1]) or "CLIPTextModelWithProjection" in cfg.get("architectures", []))
            unet = root / "unet" / "config.json"
            text_time = unet.is_file() and json.loads(unet.read_text()).get("addition_embed_type") == "text_time"
        else:
            for name in TEXT_ENCODERS:
                m = getattr(source, name, None)
                if m is not None:
                    configs.append({k: v for k, v in m.config.to_dict().items() if not k.startswith("_")})
                    proj.append(isinstance(m, CLIPTextModelWithProjection))
            text_time = getattr(source.unet.config, "addition_embed_type", None) == "text_time"
        if not configs:
            raise HybridSDError(f"{source}: no text encoder (text_encoder/config.json) to count")
        if text_time:
            last = configs[-1]
            added = int(last.get("projection_dim") or last["hidden_size"]) + SIZE_CONDITIONS
        return cls(tuple(configs), tuple(proj), added)

    @property
    def tokens(self) -> int:
        return int(self.configs[0].get("max_position_embeddings", 77))

    @property
    def width(self) -> int:
        return sum(int(c["hidden_size"]) for c in self.configs)

    def text_shape(self, text_len: int | None = None) -> tuple[int, int]:
        return (text_len or self.tokens, self.width)

    def macs(self, text_len: int | None = None) -> int:
        """MACs of encoding one prompt with every encoder."""
        return sum(text_encoder_macs(c, text_len or self.tokens, p) for c, p in zip(self.configs, self.projection))


def decoder_macs(vae: nn.Module | Mapping[str, Any], latent_hw: tuple[int, int]) -> int:
    """MACs of decoding one latent of ``latent_hw`` with a diffusers VAE (a module or an AutoencoderKL config)."""

    if isinstance(vae, nn.Module):
        cls, cfg = type(vae), {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    else:
        cls, cfg = AutoencoderKL, dict(vae)

    with torch.device("meta"), quiet():
        model = cls.from_config(cfg)
    ch = cfg.get("latent_channels", 4)
    z = torch.empty(1, ch, *latent_hw, device="meta")
    return _flop_macs(lambda x: model.decode(x, return_dict=False), z)


@dataclass
class Payload:
    """What one request moves: latents (C, h, w), text embeddings (tokens, width) and ``text_added``
    elements of added conditions per prompt (SDXL's pooled embedding and size conditions), the image
    (H, W, 3), for ``batch`` images, with or without classifier-free guidance, at ``dtype_bytes`` per element."""

    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    image_shape: tuple[int, int, int]
    batch: int = 1
    cfg: bool = True
    dtype_bytes: int = 2
    prompt_bytes: int = 0
    text_added: int = 0


@dataclass
class Baseline:
    """The all-cloud reference: its U-Net's batch-1 forward MACs, a step's time if known, its decoder."""

    macs_per_forward: int
    ms_per_step: float | None = None
    decoder: Component | None = None


def account(
    segments: Sequence[Segment],
    baseline: Baseline,
    payload: Payload,
    text_encoder: Component | None = None,
    decoder: Component | None = None,
    link: Link | None = None,
) -> dict[str, Any]:
    """The cost summary of a schedule of ``segments`` (see the module docstring for the model)."""
    latent_shape, text_shape, image_shape = payload.latent_shape, payload.text_shape, payload.image_shape
    batch, cfg, dtype_bytes, prompt_bytes = payload.batch, payload.cfg, payload.dtype_bytes, payload.prompt_bytes
    baseline_macs_per_forward, baseline_ms_per_step, baseline_decoder = baseline.macs_per_forward, baseline.ms_per_step, baseline.decoder
    link = link or Link()
    segs = [s for s in segments if s.steps > 0]
    if not segs:
        raise HybridSDError("no U-Net runs a step")
    for s in segs:
        if s.location not in ("cloud", "edge"):
            raise HybridSDError(f"unknown location {s.location!r}; known: cloud, edge")
    total_steps = sum(s.steps for s in segs)
    fwd = batch * (2 if cfg else 1)  # batch of one U-Net forward per step
    te_loc = text_encoder.location if text_encoder else segs[0].location
    dec_loc = decoder.location if decoder else segs[-1].location

    c, h, w = latent_shape
    latent_bytes = batch * c * h * w * dtype_bytes
    emb_bytes = (2 if cfg else 1) * batch * (text_shape[0] * text_shape[1] + payload.text_added) * dtype_bytes
    image_bytes = batch * image_shape[0] * image_shape[1] * image_shape[2]

    transfers: list[dict[str, Any]] = []

    def send(what: str, nbytes: int, src: str, dst: str) -> None:
        transfers.append({"what": what, "from": src, "to": dst, "bytes": int(nbytes), "ms": link.transfer_ms(nbytes)})

    if te_loc != "edge":
        send("prompt", prompt_bytes, "edge", te_loc)
    have_emb = {te_loc}
    prev = None
    for s in segs:
        where = prev.location if prev is not None else te_loc
        if s.location != where:
            parts, nbytes = [], 0
            if prev is not None:
                parts.append("latents")
                nbytes += latent_bytes
            if s.location not in have_emb:
                parts.append("text embeddings")
                nbytes += emb_bytes
                have_emb.add(s.location)
            send(" + ".join(parts), nbytes, where, s.location)
        prev = s
    if dec_loc != segs[-1].location:
        send("latents", latent_bytes, segs[-1].location, dec_loc)
    if dec_loc != "edge":
        send("image", image_bytes, dec_loc, "edge")

    rows: list[dict[str, Any]] = []
    for s in segs:
        macs_step = s.macs_per_forward * fwd
        rows.append({"model": s.model, "location": s.location, "steps": s.steps,
                     "macs_per_step": macs_step, "macs_total": macs_step * s.steps,
                     "ms_per_step": s.ms_per_step,
                     "ms_total": None if s.ms_per_step is None else s.ms_per_step * s.steps})
    per_location: dict[str, dict[str, Any]] = {}
    for loc in ("cloud", "edge"):
        rs = [r for r in rows if r["location"] == loc]
        comp = [x for x in (text_encoder, decoder) if x is not None and x.location == loc]
        comp_macs = sum(x.macs * batch for x in comp)
        unet_ms = [r["ms_total"] for r in rs]
        comp_ms = [x.ms for x in comp]
        per_location[loc] = {
            "steps": sum(r["steps"] for r in rs),
            "unet_macs": sum(r["macs_total"] for r in rs),
            "component_macs": comp_macs,
            "components": [x.name for x in comp],
            "unet_ms": None if None in unet_ms else sum(unet_ms),
            "ms": None if None in unet_ms + comp_ms else sum(unet_ms) + sum(comp_ms),
        }

    base_unet = baseline_macs_per_forward * fwd * total_steps
    base_te = text_encoder.macs * batch if text_encoder else 0
    bdec = baseline_decoder or decoder
    base_dec = bdec.macs * batch if bdec else 0
    cloud = per_location["cloud"]
    share = {
        "steps": cloud["steps"] / total_steps,
        "unet_macs": cloud["unet_macs"] / base_unet,
        "all_macs": (cloud["unet_macs"] + cloud["component_macs"]) / (base_unet + base_te + base_dec),
    }
    if baseline_ms_per_step is not None and cloud["ms"] is not None:
        base_ms = baseline_ms_per_step * total_steps
        comp_ms = [x.ms for x in (text_encoder, bdec) if x is not None]
        share["unet_ms"] = (cloud["unet_ms"] or 0.0) / base_ms
        if None not in comp_ms:
            share["all_ms"] = cloud["ms"] / (base_ms + sum(comp_ms))
    compute_ms = [r["ms_total"] for r in rows] + [x.ms for x in (text_encoder, decoder) if x is not None]
    transfer_ms = sum(t["ms"] for t in transfers)
    return {
        "total_steps": total_steps,
        "batch": batch,
        "classifier_free_guidance": cfg,
        "dtype_bytes": dtype_bytes,
        "segments": rows,
        "text_encoder": asdict(text_encoder) if text_encoder else None,
        "decoder": asdict(decoder) if decoder else None,
        "per_location": per_location,
        "payload_bytes": {"latents": latent_bytes, "text_embeddings": emb_bytes, "image": image_bytes},
        "bytes_sent": sum(t["bytes"] for t in transfers),
        "transfers": transfers,
        "link": asdict(link),
        "transfer_ms": transfer_ms,
        "end_to_end_ms": None if None in compute_ms else sum(compute_ms) + transfer_ms,
        "baseline": {"unet_macs": base_unet, "text_encoder_macs": base_te, "decoder_macs": base_dec,
                     "ms_per_step": baseline_ms_per_step},
        "cloud_share": share,
        "cloud_reduction": {k: 1 - v for k, v in share.items()},
        "method": ("MACs from the cost engine (weight-free, meta device); one step = one U-Net forward on "
                   f"{fwd} latents; transfer = rtt/2 + 8*bytes/bandwidth"),
    }


def unet_macs(module: nn.Module, base_config: Mapping[str, Any], resolution: int, vae_scale: int,
              text_len: int = 77, latency: str = "off", device: str = "cpu", batch: int = 1,
              dtype: torch.dtype | None = None, lut: Any = None) -> dict[str, Any]:
    """Cost-engine figures of one U-Net module: a student built by ``build_student`` (its
    ``.hybridsd_candidate`` on ``base_config``), an export (``.hybridsd_metadata``), else its own config."""
    meta = getattr(module, "hybridsd_metadata", None)
    cand = getattr(module, "hybridsd_candidate", None)
    if meta is not None and "base_config" in meta:
        spec, cand, how = meta["base_config"], meta.get("candidate"), "export metadata (base_config + candidate)"
    elif cand is not None:
        spec, how = dict(base_config), "candidate on the teacher's config"
    else:
        spec, cand, how = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}, None, "module config"
    spec = {k: v for k, v in dict(spec).items() if not k.startswith("_")}
    r = estimate_cost(spec, cand, resolution=resolution, vae_scale=vae_scale, text_len=text_len, batch=batch,
                      latency=latency, device=device, dtype=dtype, lut=lut)
    out = {"params": r.params, "macs": r.macs, "macs_conv_linear": r.macs_conv_linear, "source": how}
    if batch != 1:  # MACs are linear in batch; report the batch-1 forward
        out["macs"] //= batch
        out["macs_conv_linear"] //= batch
    if r.latency is not None:
        out["latency_ms"] = r.latency_ms
        out["latency"] = r.latency
    return out


def decoder_scale(vae: nn.Module) -> int:
    """Upsampling factor of a diffusers decoder (AutoencoderKL or AutoencoderTiny)."""
    c = vae.config
    if getattr(c, "decoder_block_out_channels", None) is not None:
        return int(c.upsampling_scaling_factor) ** (len(c.decoder_block_out_channels) - 1)
    return 2 ** (len(c.block_out_channels) - 1)


def _time_text_encoder(pipe: Any, text_len: int, calls: int) -> float:
    encoders = [m for m in (getattr(pipe, n, None) for n in TEXT_ENCODERS) if m is not None]
    dev = encoders[0].device
    ids = torch.zeros(1, text_len, dtype=torch.long, device=dev)

    def run() -> None:
        for te in encoders:
            te(ids)

    return calls * time_fn(run, dev, warmup=2, repeats=10).median_ms


def _time_decoder(vae: nn.Module, latent_shape: tuple[int, int, int], batch: int) -> float:
    p = next(vae.parameters())
    z = torch.randn(batch, *latent_shape, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    return time_fn(lambda: vae.decode(z, return_dict=False), p.device, warmup=2, repeats=10).median_ms


def pipeline_cost(
    hp: Any,
    resolution: int | None = None,
    batch: int = 1,
    guidance: bool = True,
    text_len: int = 77,
    latency: str | Mapping[str, float] = "off",
    device: str = "cpu",
    link: Link | None = None,
    text_encoder_location: str = "cloud",
    decoder_location: str = "edge",
    dtype_bytes: int | None = None,
    prompt: str = "",
    lut: Any = None,
) -> dict[str, Any]:
    """Cost summary of a :class:`HybridPipeline` ``hp`` for one request.

    ``latency``: ``"off"``; ``"measure"`` or ``"lut"`` (this machine's ``device`` for every
    location: the figures then say so); or a mapping of ms per step given per model name (as run
    on that model's device), with optional keys ``"text_encoder"``, ``"decoder"`` and ``"baseline"``.
    """
    pipe = hp.pipe
    vs = vae_scale_factor(pipe)
    res = resolution or int(pipe.unet.config.sample_size) * vs
    base_cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    fwd = batch * (2 if guidance else 1)
    mode = latency if isinstance(latency, str) else "off"
    given = dict(latency) if isinstance(latency, Mapping) else {}
    seen: dict[int, dict[str, Any]] = {}

    def fig(module: nn.Module) -> dict[str, Any]:
        if id(module) not in seen:
            seen[id(module)] = unet_macs(module, base_cfg, res, vs, text_len, latency=mode, device=device, batch=fwd,
                                         lut=lut)
        return seen[id(module)]

    segments, models = [], []
    for m, k in zip(hp.models, hp.steps):
        f = fig(m.unet)
        ms = given.get(m.name, f.get("latency_ms"))
        models.append({"name": m.name, "location": m.location, "origin": m.origin, "steps": k, **f, **m.info})
        segments.append(Segment(m.name, m.location, k, f["macs"], ms))
    base = fig(pipe.unet)
    text = TextEncoders.of(pipe)
    te_macs = text.macs(text_len)
    h = res // vs
    dec = hp.vae if hp.vae is not None else pipe.vae
    dec_macs = decoder_macs(dec, (h, h))
    base_dec_macs = decoder_macs(pipe.vae, (h, h)) if hp.vae is not None else dec_macs
    if mode == "measure":
        given.setdefault("text_encoder", _time_text_encoder(pipe, text_len, 2 if guidance else 1))
        given.setdefault("decoder", _time_decoder(dec, (int(pipe.unet.config.in_channels), h, h), batch))
        given.setdefault("baseline_decoder", _time_decoder(pipe.vae, (int(pipe.unet.config.in_channels), h, h), batch)
                         if hp.vae is not None else given["decoder"])
    te = Component("text encoder", text_encoder_location, te_macs * (2 if guidance else 1), given.get("text_encoder"))
    de = Component(hp.vae_name, decoder_location, dec_macs, given.get("decoder"))
    bde = Component("teacher VAE", "cloud", base_dec_macs, given.get("baseline_decoder", given.get("decoder")))
    if dtype_bytes is None:
        dtype_bytes = DTYPE_BYTES.get(str(pipe.unet.dtype).replace("torch.", ""), 4)
    out_hw = h * decoder_scale(dec)
    summary = account(
        segments,
        Baseline(base["macs"], given.get("baseline", base.get("latency_ms")), bde),
        Payload((int(pipe.unet.config.in_channels), h, h), text.text_shape(text_len),
                (out_hw, out_hw, 3), batch=batch, cfg=guidance, dtype_bytes=dtype_bytes,
                prompt_bytes=len(prompt.encode("utf-8")) * batch, text_added=text.added),
        text_encoder=te, decoder=de, link=link,
    )
    summary["models"] = models
    summary["resolution"] = res
    summary["latency_mode"] = mode if not given else "given per model"
    if mode != "off":
        summary["latency_note"] = (f"{mode} on this machine ({device}) for every location and the baseline, one "
                                   f"U-Net forward on {fwd} latents per step"
                                   + ("; text encoder and decoder measured (median of 10)" if mode == "measure" else
                                      "; text encoder and decoder not timed"))
    return summary


def cloud_share_table(unet_macs_per_forward: int, text_encoder_macs_per_call: int, decoder_macs_per_image: int,
                      totals: Sequence[int] = (25, 50), cfg: bool = True) -> list[dict[str, Any]]:
    """Cloud share of a large-first hybrid run (cloud: text encoder + the first ``k`` steps of the
    large U-Net; edge: the rest and the decoder) against all-cloud (every step, text encoder and
    decoder on the cloud), for every ``k`` of every total in ``totals``, counted four ways:

    - ``steps``: k / N;
    - ``unet_macs``: U-Net MACs only (equals ``steps`` when the cloud U-Net is the reference);
    - ``macs_te_vae``: text encoder and decoder counted, decoder moved to the edge;
    - ``macs_te_vae_cloud_decode``: text encoder and decoder counted, decoder left on the cloud.
    """
    f = 2 if cfg else 1
    u = unet_macs_per_forward * f
    te = text_encoder_macs_per_call * f
    rows = []
    for n in totals:
        base = n * u + te + decoder_macs_per_image
        for k in range(n + 1):
            r = {"total_steps": n, "cloud_steps": k, "steps": k / n, "unet_macs": k * u / (n * u),
                 "macs_te_vae": (k * u + te) / base, "macs_te_vae_cloud_decode": (k * u + te + decoder_macs_per_image) / base}
            rows.append(r)
    return rows
