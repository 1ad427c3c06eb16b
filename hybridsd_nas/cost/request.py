"""One text-to-image request on a device: the whole pipeline's latency and its peak memory.

A request (:class:`Request`) is ``steps`` denoising steps at guidance scale ``guidance`` for
``images`` images of ``resolution`` px. With classifier-free guidance (``guidance > 1``, as
diffusers decides) the prompt and the empty prompt are both encoded, and every denoising step is
one U-Net forward on ``2 * images`` latents: the guidance batch.

``pipeline_latency_ms`` = text encoder + U-Net steps + VAE decoder, where

- text encoder: one call of every text encoder (SDXL: both) on ``images`` prompts, twice with
  guidance;
- U-Net steps: steps x one forward at the guidance batch, from a latency mode (measured, or the
  prediction of a lookup table built for the guidance batch); a hybrid schedule counts each U-Net
  for its own steps, all on this one device (the transfers of a cloud/edge split are not part of it:
  :func:`hybridsd_nas.cost.pipeline.pipeline_cost` accounts them);
- VAE decoder: one decode of ``images`` latents.

The text encoder and the decoder are timed on the device with random weights (latency does not
depend on their values), or read from a lookup table that holds them (its optional
``components``, written by ``hybridsd-nas lut build --pipeline``).

``peak_memory_mb`` (MB = 2**20 bytes), predicted weight-free: the weights, at the dtype, of the text
encoder(s), every U-Net that runs and the VAE decoder (``post_quant_conv`` and decoder: a
text-to-image request never runs the VAE encoder), plus the activation peak: the request run once on
the meta device, every op's outputs counted from that op until the last reference to their storage
goes, and the most bytes alive at once taken. Attention counts as a fused kernel (its output only:
PyTorch's scaled-dot-product attention on CUDA and CPU does not keep the attention matrix); allocator
rounding, cuDNN/oneDNN workspaces and the CUDA context are not counted. Measured: the same models
materialised on the device with random weights and the request run once, after a warm-up run: the
increase of ``torch.cuda.max_memory_allocated`` on CUDA; on a CPU the increase of the process's
peak resident set (Linux: the high-water mark reset through ``/proc/self/clear_refs``; elsewhere
``getrusage``'s peak, which sees only a new peak of the process).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib
import json
import resource
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hybridsd_nas.arch import Candidate, UNetArch, describe, plan
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.core.runtime import quiet
from hybridsd_nas.cost.engine import estimate_cost
from hybridsd_nas.cost.inputs import latent_size, unet_inputs
from hybridsd_nas.cost.latency import check_device, device_label, dtype_name, materialize, parse_dtype, synchronize, time_fn
from hybridsd_nas.cost.lut import LatencyTable, default_resolution, open_table
from hybridsd_nas.cost.pipeline import TextEncoders
from hybridsd_nas.sources import Teacher, resolve_teacher, vae_scale_factor

MB = 2**20
MEMORY_MODES = ("predict", "measure")
PIPELINE_METRICS = ("pipeline_latency_ms", "peak_memory_mb")
# config keys that say nothing about a component's structure (versions, the dtype it was saved in)
_NOT_STRUCTURE = ("transformers_version", "dtype", "torch_dtype", "architectures")


@dataclass(frozen=True)
class Request:
    """One text-to-image request: ``steps`` at ``guidance`` for ``images`` images of ``resolution`` px."""

    steps: int
    guidance: float
    resolution: int
    images: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images < 1 or self.resolution < 8 or self.guidance < 0:
            raise HybridSDError(f"a request needs steps >= 1, images >= 1, resolution >= 8 and guidance >= 0; got steps "
                                f"{self.steps}, images {self.images}, resolution {self.resolution}, guidance {self.guidance:g}")

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: diffusers runs it when the scale exceeds 1."""
        return self.guidance > 1

    @property
    def unet_batch(self) -> int:
        """Latents per U-Net forward: the guidance batch."""
        return self.images * (2 if self.cfg else 1)

    @property
    def text_calls(self) -> int:
        """Calls of the text encoder(s): the prompt, and the empty prompt with guidance."""
        return 2 if self.cfg else 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unet_batch": self.unet_batch, "classifier_free_guidance": self.cfg}


def default_request(teacher: str | Teacher, steps: int | None = None, guidance: float | None = None,
                    resolution: int | None = None, images: int = 1) -> Request:
    """A request with what is not given taken from the teacher: its sampling defaults (``sampling.json``,
    else 20 steps at 5.0) and its sampling height, else its U-Net's default resolution."""
    t = resolve_teacher(teacher)
    steps, guidance = t.sampling_settings(steps, guidance)
    res = resolution or int(t.sampling.get("height") or default_resolution(t.spec))
    return Request(int(steps), float(guidance), int(res), int(images))


def _structure(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_STRUCTURE}


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class PipelineParts:
    """A teacher pipeline's parts beside the U-Net, weight-free: its text encoder(s) and VAE decoder
    built from their configs (on the meta device unless materialised)."""

    def __init__(self, teacher: str | Teacher, arch: UNetArch | None = None):
        self.teacher = resolve_teacher(teacher)
        self.spec = self.teacher.spec
        root = Path(self.teacher.path)
        vae_cfg = root / "vae" / "config.json"
        if not vae_cfg.is_file():
            raise ConfigError(f"{self.teacher.path}: no vae/config.json; the whole pipeline's cost needs the teacher's VAE")
        self.text = TextEncoders.of(root)
        self.vae_config: dict[str, Any] = json.loads(vae_cfg.read_text())
        self.arch = arch or describe(self.spec)
        self.vae_scale = vae_scale_factor(self.teacher)
        self.latent_channels = int(self.arch.config.get("in_channels", 4))

    def text_encoders(self, dtype: torch.dtype) -> list[nn.Module]:
        out = []
        for cfg, proj in zip(self.text.configs, self.text.projection):
            with torch.device("meta"), quiet():
                out.append((CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg)).to(dtype).eval())
        return out

    def decoder(self, dtype: torch.dtype) -> nn.Module:
        """The VAE without its encoder (``decode`` runs ``post_quant_conv`` and the decoder only)."""
        cls = getattr(diffusers, self.vae_config.get("_class_name") or "AutoencoderKL")
        with torch.device("meta"), quiet():
            vae = cls.from_config({k: v for k, v in self.vae_config.items() if not k.startswith("_")})
            vae.encoder = None
            if getattr(vae, "quant_conv", None) is not None:
                vae.quant_conv = None
            return vae.to(dtype).eval()

    def unet(self, candidate: Candidate, dtype: torch.dtype) -> nn.Module:
        model = build_student(plan(self.arch, candidate))
        with quiet():  # diffusers warns about casting a loaded model; this one holds no weights
            return model.to(dtype).eval()

    def key(self, part: str, batch: int, resolution: int) -> str:
        """The key of a component's timing in a lookup table: what it is, its structure and its inputs."""
        if part == "text_encoder":
            blob, shape = [_structure(c) for c in self.text.configs], f"{self.text.tokens}"
        else:
            blob, shape = _structure(self.vae_config), "x".join(map(str, self.latent(1, resolution)[1:]))
        digest = hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{part}:{digest}:b{batch}:{shape}"

    def latent(self, batch: int, resolution: int) -> tuple[int, int, int, int]:
        """The shape of ``batch`` latents of an image of ``resolution`` px."""
        h = latent_size(resolution, self.vae_scale)
        return (batch, self.latent_channels, h, h)


def _tensor(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if str(device) == "meta":
        return torch.empty(*shape, device="meta", dtype=dtype)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def run_request(parts: PipelineParts, request: Request, encoders: Sequence[nn.Module], unets: Sequence[nn.Module],
                decoder: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """The request's computations once, in order: text encoding (kept), one forward of each U-Net at the
    guidance batch (a step's activations are the same at every step), one decode."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ids = torch.zeros(request.images, parts.text.tokens, dtype=torch.long, device=device)
        embeddings = [te(ids)[0] for _ in range(request.text_calls) for te in encoders]
        for u in unets:
            x = unet_inputs(parts.arch.config, request.resolution, request.unet_batch, parts.text.tokens, parts.vae_scale,
                            device=device, dtype=dtype)
            u(**x, return_dict=False)
            del x
        z = _tensor(parts.latent(request.images, request.resolution), device, dtype, g)
        decoder.decode(z, return_dict=False)
        del embeddings


# ops that hold a scratch buffer while they run, on a device type: on a CPU, oneDNN's convolution holds one
# the size of its output (a 3x3 convolution making 8 MB peaks 15.9 MB above its input, on 2.13+cpu)
WORKSPACE_OPS = {"cpu": ("aten.conv2d.", "aten.convolution.")}


class LiveBytes(TorchDispatchMode):
    """Bytes of op outputs alive, and their peak: each storage counted from the op that made it until the
    last reference to it goes (views share their base's storage, so they are not counted again); with
    ``device_type``, the scratch buffer of :data:`WORKSPACE_OPS` counted while its op runs. The storages
    of ``known`` tensors (the weights) are never counted: a view of a weight (a linear layer's
    transpose) allocates nothing."""

    def __init__(self, device_type: str | None = None, known: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known = [t.untyped_storage() for t in known]  # held, so that their ids stay theirs
        self._seen: set[int] = {id(s) for s in self._known}
        self._workspace = WORKSPACE_OPS.get(device_type or "", ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if self._workspace and str(func).startswith(self._workspace):
            scratch = sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor))
            self.peak = max(self.peak, self.live + 2 * scratch)  # the output and the scratch buffer, both alive
        for t in outs:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if id(s) in self._seen:
                    continue
                n = s.nbytes()
                self._seen.add(id(s))
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, id(s), n)
        return out

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # its default, which glibc otherwise raises as large blocks are freed


def _trim(pin: bool = False) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that reusing them shows in
    RSS; with ``pin``, fix glibc's mmap threshold at its default for the rest of the process: blocks
    above it are mapped and unmapped one by one, so that the resident set follows the bytes alive (with
    glibc's dynamic threshold a 128 px request measured 62, 64, then 68 MB; pinned 52.7, 52.9, 52.7)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if pin:
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """The peak memory increase (bytes) of what runs inside, on ``device``: filled in on exit."""
    out: dict[str, Any] = {}
    _trim(pin=device.type == "cpu")
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        synchronize(device)
        out.update(bytes=torch.cuda.max_memory_allocated(device) - base, how="torch.cuda.max_memory_allocated increase")
        return
    if device.type != "cpu":
        raise HybridSDError(f"peak memory is measured on cpu or cuda, not {device.type}")
    try:  # Linux: reset the high-water mark of the resident set to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        base, how = _status_bytes("VmRSS"), "peak RSS increase (VmHWM reset through /proc/self/clear_refs)"
    except OSError:
        base, how = None, "getrusage peak RSS increase (sees only a new peak of the process)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    yield out
    if base is not None:
        out.update(bytes=_status_bytes("VmHWM") - base, how=how)
    else:
        out.update(bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before, how=how)


def _on_device(meta: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # materialised at the dtype directly: a float32 copy converted afterwards would add its own bytes to the peak
    model = materialize(copy.deepcopy(meta), device, dtype)
    with torch.no_grad():  # integer buffers come out of the meta device uninitialised; CLIP's position ids index a table
        for name, b in model.named_buffers():
            if not b.is_floating_point():
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b) if name.endswith("position_ids") else torch.zeros_like(b))
    return model


class PipelineCost:
    """The whole-request figures of one teacher's candidates for one :class:`Request` (see the module
    docstring): ``pipeline_latency_ms`` with a latency mode (``measure``, or ``lut`` with ``table``: a
    :class:`LatencyTable` or a table file built for the request's resolution and guidance batch), and
    ``peak_memory_mb``, predicted weight-free or measured on ``device`` (``memory``)."""

    def __init__(self, teacher: str | Teacher, request: Request, latency: str = "off", device: str = "cpu",
                 dtype: str | torch.dtype | None = None, table: LatencyTable | str | Path | None = None,
                 memory: str = "predict", repeats: int = 10, arch: UNetArch | None = None):
        if memory not in MEMORY_MODES:
            raise HybridSDError(f"memory mode {memory!r} is not one of {', '.join(MEMORY_MODES)}")
        self.parts = PipelineParts(teacher, arch)
        latent_size(request.resolution, self.parts.vae_scale)
        self.request, self.mode, self.device, self.memory_mode, self.repeats = request, latency, device, memory, repeats
        dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if latency == "lut" and table is not None:
            if not isinstance(table, LatencyTable):
                table = open_table(table, resolution=request.resolution, dtype=dt, batch=request.unet_batch)
            else:
                table.check(request.resolution, dt, request.unet_batch)
            dt = dt or table.dtype
        self.table = table if latency == "lut" else None
        self.dtype = dt or (torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.float32)
        self._unet_ms: dict[str, float] = {}
        self._components: dict[str, Any] | None = None

    # -- latency ---------------------------------------------------------------------------------
    def unet_ms(self, candidate: Candidate) -> float:
        """One U-Net forward of ``candidate`` at the guidance batch, in ms (cached per candidate)."""
        if self.mode == "off":
            raise ConfigError("pipeline_latency_ms needs a latency mode: lut (a table) or measure")
        if candidate.key not in self._unet_ms:
            r = estimate_cost(self.parts.spec, candidate, resolution=self.request.resolution, batch=self.request.unet_batch,
                              latency=self.mode, device=self.device, dtype=self.dtype, lut=self.table, repeats=self.repeats,
                              arch=self.parts.arch)
            self._unet_ms[candidate.key] = float(r.latency_ms)
        return self._unet_ms[candidate.key]

    def components(self) -> dict[str, Any]:
        """The text encoder's and decoder's times: from the lookup table where it holds them, else timed on
        the device (and added to a table being built here)."""
        if self._components is not None:
            return self._components
        b, res = self.request.images, self.request.resolution
        keys = {p: self.parts.key(p, b, res) for p in ("text_encoder", "decoder")}
        have = self.table.components if self.table is not None else {}
        if all(k in have for k in keys.values()):
            figs, source = {p: have[k] for p, k in keys.items()}, f"lookup table {self.table.path}"
        else:
            if self.table is not None and self.table.portable:  # timed here only on the hardware the table was built on
                try:
                    here = device_label(check_device(self.device))
                except HybridSDError:
                    here = None
                if here != self.table.meta.get("device"):
                    raise ConfigError(f"latency table {self.table.path} has no text-encoder and decoder timings for {b} image(s) "
                                      f"at {res} px, and they cannot be timed here ({self.device} is not "
                                      f"{self.table.meta.get('device')}); add them there: {self.table.build_command()} --pipeline")
            figs = time_components(self.parts, self.request, self.device, self.dtype, repeats=self.repeats)
            source = f"measured on {self.device} ({dtype_name(self.dtype)})"
            if self.table is not None and not self.table.portable:
                self.table.add_components({keys[p]: f for p, f in figs.items()})
        stat = "ms" if self.mode == "lut" else "median"  # a table's statistic (the minimum), or a measurement's median
        call = float(figs["text_encoder"][stat])
        self._components = {"text_encoder_call_ms": call, "text_encoder_ms": call * self.request.text_calls,
                            "decoder_ms": float(figs["decoder"][stat]), "source": source}
        return self._components

    def latency(self, runs: Sequence[tuple[int, Candidate]], known: dict[str, float] | None = None) -> dict[str, Any]:
        """``pipeline_latency_ms`` of the U-Nets in ``runs`` (steps, candidate) and its parts; ``known``:
        ms per forward at the guidance batch already measured, by candidate key."""
        known = known or {}
        rows = []
        for steps, cand in runs:
            if steps <= 0:
                continue
            ms = known.get(cand.key)
            ms = float(ms) if ms is not None else self.unet_ms(cand)
            rows.append({"candidate_key": cand.key, "steps": int(steps), "ms_per_step": ms, "ms": ms * steps})
        comp = self.components()
        unet = sum(r["ms"] for r in rows)
        total = comp["text_encoder_ms"] + unet + comp["decoder_ms"]
        return {"pipeline_latency_ms": total, "text_encoder_ms": comp["text_encoder_ms"], "unet_ms": unet,
                "decoder_ms": comp["decoder_ms"], "unets": rows, "components_from": comp["source"],
                "unet_from": f"{self.mode}" + (f" ({self.table.path})" if self.table is not None else f" on {self.device}")}

    # -- memory ----------------------------------------------------------------------------------
    def _models(self, candidates: Sequence[Candidate]) -> tuple[list[nn.Module], list[nn.Module], nn.Module]:
        seen: dict[str, Candidate] = {}
        for c in candidates:
            seen.setdefault(c.key, c)
        return (self.parts.text_encoders(self.dtype), [self.parts.unet(c, self.dtype) for c in seen.values()],
                self.parts.decoder(self.dtype))

    def predict_memory(self, candidates: Sequence[Candidate]) -> dict[str, Any]:
        """Predicted ``peak_memory_mb`` of a request running the U-Nets of ``candidates``: weights + activation peak."""
        encoders, unets, dec = self._models(candidates)
        weights = {"text_encoder": sum(map(_nbytes, encoders)), "unet": sum(map(_nbytes, unets)), "decoder": _nbytes(dec)}
        held = [t for m in (*encoders, *unets, dec) for t in (*m.parameters(), *m.buffers())]
        live = LiveBytes(torch.device(self.device or "cpu").type, known=held)
        with live:
            run_request(self.parts, self.request, encoders, unets, dec, "meta", self.dtype)
        total = sum(weights.values()) + live.peak
        return {"peak_memory_mb": total / MB, "weights_mb": {k: v / MB for k, v in weights.items()},
                "activation_peak_mb": live.peak / MB, "dtype": dtype_name(self.dtype),
                "method": "predicted: weights at the dtype + activation peak of the request traced on the meta device"}

    def measure_memory(self, candidates: Sequence[Candidate]) -> dict[str, Any]:
        """Measured ``peak_memory_mb``: the models materialised on the device and the request run once (after a
        warm-up run that loads kernels and thread pools)."""
        dev = check_device(self.device)
        metas = self._models(candidates)

        def load_and_run() -> None:
            encoders = [_on_device(m, dev, self.dtype) for m in metas[0]]
            unets = [_on_device(m, dev, self.dtype) for m in metas[1]]
            dec = _on_device(metas[2], dev, self.dtype)
            run_request(self.parts, self.request, encoders, unets, dec, dev, self.dtype)
            synchronize(dev)

        load_and_run()
        with peak_memory(dev) as peak:
            load_and_run()
        return {"peak_memory_mb": peak["bytes"] / MB, "dtype": dtype_name(self.dtype), "device": str(dev),
                "method": f"measured: {peak['how']}, models with random weights, one request after a warm-up run"}

    def memory(self, candidates: Sequence[Candidate]) -> dict[str, Any]:
        return self.measure_memory(candidates) if self.memory_mode == "measure" else self.predict_memory(candidates)

    # -- both ------------------------------------------------------------------------------------
    def figures(self, runs: Sequence[tuple[int, Candidate]], metrics: Sequence[str] = PIPELINE_METRICS,
                known: dict[str, float] | None = None) -> dict[str, Any]:
        """The ``metrics`` of a request whose U-Nets run as ``runs`` (steps, candidate), and under ``record``
        how each was found: the request, the latency's parts, the memory's parts."""
        out: dict[str, Any] = {}
        record: dict[str, Any] = {"request": self.request.to_dict(), "dtype": dtype_name(self.dtype)}
        if "pipeline_latency_ms" in metrics:
            lat = self.latency(runs, known)
            out["pipeline_latency_ms"] = lat["pipeline_latency_ms"]
            record["latency"] = {k: v for k, v in lat.items() if k != "pipeline_latency_ms"}
        if "peak_memory_mb" in metrics:
            mem = self.memory([c for k, c in runs if k > 0])
            out["peak_memory_mb"] = mem["peak_memory_mb"]
            record["memory"] = {k: v for k, v in mem.items() if k != "peak_memory_mb"}
        out["record"] = record
        return out


def time_components(parts: PipelineParts, request: Request, device: str, dtype: torch.dtype,
                    warmup: int = 3, repeats: int = 10) -> dict[str, dict[str, Any]]:
    """One call of the text encoder(s) on ``request.images`` prompts and one decode of as many latents,
    timed on ``device`` with random weights: minimum (``ms``), median, p10 and p90 of ``repeats``."""
    dev = check_device(device)
    g = torch.Generator().manual_seed(0)
    encoders = [_on_device(m, dev, dtype) for m in parts.text_encoders(dtype)]
    ids = torch.zeros(request.images, parts.text.tokens, dtype=torch.long, device=dev)

    def encode() -> None:
        for te in encoders:
            te(ids)

    dec = _on_device(parts.decoder(dtype), dev, dtype)
    z = _tensor(parts.latent(request.images, request.resolution), dev, dtype, g)
    out = {}
    for part, fn, desc in (("text_encoder", encode, f"{len(encoders)} text encoder(s), {request.images} x {parts.text.tokens} tokens"),
                           ("decoder", lambda: dec.decode(z, return_dict=False), f"VAE decoder, latents {list(z.shape)}")):
        st = time_fn(fn, dev, warmup, repeats, dtype_name(dtype))
        out[part] = {"ms": st.min_ms, "median": st.median_ms, "p10": st.p10_ms, "p90": st.p90_ms, "desc": desc}
    return out


def schedule_runs(candidate: Candidate, schedule: dict[str, Any] | None, steps: int) -> list[tuple[int, Candidate]]:
    """The U-Nets a request runs: ``candidate`` for every step, or for a hybrid schedule (``models``
    ``large``/``small`` with their ``steps``) the teacher for the large model's steps and
    ``candidate`` for the small one's."""
    if not schedule:
        return [(steps, candidate)]
    return [(int(k), Candidate() if m == "large" else candidate) for m, k in zip(schedule["models"], schedule["steps"])]


__all__ = ["MB", "MEMORY_MODES", "PIPELINE_METRICS", "LiveBytes", "PipelineCost", "PipelineParts", "Request",
           "default_request", "peak_memory", "run_request", "schedule_runs", "time_components"]
