"""Several U-Nets over one denoising run of a diffusers text-to-image pipeline
(``StableDiffusionPipeline`` for SD-1.x/2.x, ``StableDiffusionXLPipeline`` for SDXL).

U-Net ``i`` runs the next ``steps[i]`` denoising steps. The wrapped pipeline's own loop does all
the work (text encoding, SDXL's added conditions, classifier-free guidance, v-prediction in the
scheduler): the U-Net it reads (``self.unet``, read at every step) is swapped inside
``callback_on_step_end`` when the next step belongs to another model, so one scheduler object, and
with it any multistep solver history (PNDM's PLMS buffer, DPM-Solver's model outputs), crosses the
switch untouched, as in Hybrid SD. The pipeline's U-Net and VAE are restored afterwards, on error too.

A *step* is one timestep of the schedule: a run of equal consecutive entries of
``scheduler.timesteps`` counts once, so PNDM's warm-up evaluation and the second evaluation of a
second-order solver (Heun) belong to the step of their timestep, and the steps of a run add up to
``num_inference_steps`` for every scheduler diffusers ships.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderTiny
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from torch import nn

from hybridsd_nas.arch import describe, list_candidate_presets, plan, resolve_candidate
from hybridsd_nas.build import build_student
from hybridsd_nas.core.errors import HybridSDError
from hybridsd_nas.core.runtime import quiet
from hybridsd_nas.cost.pipeline import pipeline_cost
from hybridsd_nas.export import load_unet
from hybridsd_nas.sources import load_pretrained_unet


class HybridScheduleError(HybridSDError, ValueError):
    """A step schedule that does not fit the run (wrong sum, negative counts, lengths that differ)."""


class HybridModelError(HybridSDError, ValueError):
    """A U-Net or VAE argument that cannot be resolved or does not fit the pipeline."""


LOCATIONS = ("cloud", "edge")


@dataclass
class HybridModel:
    """One U-Net of a hybrid run: the module, a display name, where it runs, and how it was made."""

    unet: nn.Module
    name: str
    location: str = "cloud"
    origin: str = "module"  # module | pipeline | zoo | directory | export | candidate preset (weight inheritance)
    info: dict[str, Any] = field(default_factory=dict)


def _default_locations(n: int) -> list[str]:
    return ["cloud"] + ["edge"] * (n - 1) if n > 1 else ["cloud"]


def _check_steps(steps: Sequence[int], n_models: int) -> list[int]:
    try:
        ks = [int(k) for k in steps]
    except (TypeError, ValueError):
        raise HybridScheduleError(f"steps must be integers, got {list(steps)!r}") from None
    if any(k != s for k, s in zip(ks, steps)):
        raise HybridScheduleError(f"steps must be integers, got {list(steps)!r}")
    if len(ks) != n_models:
        raise HybridScheduleError(f"{len(ks)} step counts for {n_models} U-Nets; give one count per U-Net")
    if any(k < 0 for k in ks):
        raise HybridScheduleError(f"step counts must be >= 0, got {ks}")
    if sum(ks) == 0:
        raise HybridScheduleError("step counts add up to 0; at least one U-Net must run a step")
    return ks


def parse_steps(text: str) -> list[int]:
    """``"10,15"`` -> ``[10, 15]`` (one line error otherwise)."""
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise HybridScheduleError(f"--steps must be comma-separated integers such as 10,15, got {text!r}") from None


def step_groups(timesteps: Sequence[Any]) -> list[int]:
    """Step index of every denoising iteration: equal consecutive timesteps share one step."""
    out: list[int] = []
    prev = object()
    for t in timesteps:
        v = float(t)
        if out and v == prev:
            out.append(out[-1])
        else:
            out.append(out[-1] + 1 if out else 0)
        prev = v
    return out


def _model_index(steps: Sequence[int], step: int) -> int:
    """Which model runs step ``step`` (0-based) of the schedule."""
    acc = 0
    for i, k in enumerate(steps):
        acc += k
        if step < acc:
            return i
    return len(steps) - 1


class HybridPipeline:
    """Run a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with several U-Nets over one denoising run.

    Build with :meth:`from_pipeline`; call with the same arguments as the wrapped pipeline. The
    ``steps`` must add up to the run's step count (``num_inference_steps``, or the length of
    ``timesteps`` / ``sigmas`` when those are given).
    """

    def __init__(self, pipe: Any, models: list[HybridModel], steps: list[int], vae: nn.Module | None = None,
                 vae_name: str | None = None):
        self.pipe = pipe
        self.models = models
        self.steps = _check_steps(steps, len(models))
        self.vae = vae
        self.vae_name = vae_name or ("teacher VAE" if vae is None else type(vae).__name__)
        self.last_trace: list[int] = []  # model index of every U-Net evaluation of the last call

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipe: Any, unets: Sequence[Any], steps: Sequence[int], locations: Sequence[str] | None = None,
                      vae: Any = None, names: Sequence[str] | None = None, teacher: str | None = None,
                      device: str | torch.device | None = None) -> HybridPipeline:
        """Wrap ``pipe``; ``unets`` are modules or specs (zoo name, model or pipeline directory, export
        directory, candidate preset built from the teacher by weight inheritance), ``locations``
        ``cloud`` / ``edge`` per U-Net (default: the first on the cloud, the others on the edge),
        ``vae`` ``None`` (the teacher's), a module, or a spec (directory, ``"tiny-random"``)."""
        if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler") or not callable(pipe):
            raise HybridModelError(f"expected a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, "
                                   f"got {type(pipe).__name__}")
        unets = list(unets)
        if not unets:
            raise HybridModelError("give at least one U-Net")
        ks = _check_steps(steps, len(unets))
        locs = list(locations) if locations is not None else _default_locations(len(unets))
        if len(locs) != len(unets):
            raise HybridModelError(f"{len(locs)} locations for {len(unets)} U-Nets; give one per U-Net")
        for loc in locs:
            if loc not in LOCATIONS:
                raise HybridModelError(f"unknown location {loc!r}; known: {', '.join(LOCATIONS)}")
        if names is not None and len(names) != len(unets):
            raise HybridModelError(f"{len(names)} names for {len(unets)} U-Nets")
        dev = device if device is not None else pipe.unet.device
        dtype = pipe.unet.dtype
        models = []
        for i, (u, loc) in enumerate(zip(unets, locs)):
            m = resolve_unet(u, pipe=pipe, teacher=teacher, device=dev, dtype=dtype)
            m.location = loc
            if names is not None:
                m.name = names[i]
            models.append(m)
        _check_compatible(pipe, models)
        vae_mod, vae_name = resolve_vae(vae, pipe)
        return cls(pipe, models, ks, vae=vae_mod, vae_name=vae_name)

    # -- running --------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def schedule(self) -> list[dict[str, Any]]:
        """The segments of the run: ``[{"model", "location", "steps", "first_step"}]`` (zero-step models left out)."""
        out, first = [], 0
        for m, k in zip(self.models, self.steps):
            if k > 0:
                out.append({"model": m.name, "location": m.location, "steps": k, "first_step": first})
            first += k
        return out

    def _expected_steps(self, kwargs: dict[str, Any]) -> int:
        for key in ("timesteps", "sigmas"):
            if kwargs.get(key) is not None:
                return len(kwargs[key])
        if "num_inference_steps" in kwargs:
            return int(kwargs["num_inference_steps"])
        default = inspect.signature(type(self.pipe).__call__).parameters.get("num_inference_steps")
        return int(default.default) if default is not None and default.default is not inspect.Parameter.empty else 50

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # prompt positionally, like the pipeline
            kwargs = {**dict(zip(["prompt"], args[:1])), **kwargs}
            if len(args) > 1:
                raise HybridSDError("pass arguments after the prompt by keyword")
        n = self._expected_steps(kwargs)
        if n != self.total_steps:
            raise HybridScheduleError(
                f"steps {self.steps} add up to {self.total_steps}, but the run has {n} denoising steps; "
                f"make them add up to {n}")
        pipe = self.pipe
        user_cb = kwargs.pop("callback_on_step_end", None)
        user_inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", ["latents"]))

        if isinstance(user_cb, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(user_cb.tensor_inputs)
        steps = self.steps
        first = next(i for i, k in enumerate(steps) if k > 0)
        trace: list[int] = [first]
        state: dict[str, Any] = {"groups": None, "current": first}

        def on_step_end(p: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            out = user_cb(p, i, t, cb_kwargs) if user_cb is not None else {}
            if state["groups"] is None:
                groups = step_groups(p.scheduler.timesteps)
                n_steps = groups[-1] + 1 if groups else 0
                if n_steps != self.total_steps:
                    raise HybridScheduleError(
                        f"the scheduler {type(p.scheduler).__name__} made {n_steps} steps, but steps {steps} add up to "
                        f"{self.total_steps}")
                state["groups"] = groups
            groups = state["groups"]
            if i + 1 < len(groups):
                j = _model_index(steps, groups[i + 1])
                if j != state["current"]:
                    p.unet = self.models[j].unet
                    state["current"] = j
                trace.append(j)
            return out if out is not None else {}

        old_unet, old_vae = pipe.unet, pipe.vae
        try:
            pipe.unet = self.models[first].unet
            if self.vae is not None:
                pipe.vae = self.vae
            result = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=user_inputs)
        finally:
            pipe.unet = old_unet
            pipe.vae = old_vae
            self.last_trace = trace
        return result

    def cost(self, **kwargs: Any) -> dict[str, Any]:
        """Cost summary of one request (see :func:`hybridsd_nas.hybrid.pipeline_cost` for the arguments)."""

        return pipeline_cost(self, **kwargs)


# -- resolving U-Nets and VAEs ------------------------------------------------------------------------


def _check_compatible(pipe: Any, models: list[HybridModel]) -> None:
    ref = pipe.unet.config
    for m in models:
        c = m.unet.config
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                    "projection_class_embeddings_input_dim"):
            if getattr(c, key, None) != getattr(ref, key, None):
                raise HybridModelError(
                    f"U-Net {m.name!r} has {key}={getattr(c, key, None)}, the pipeline's U-Net {getattr(ref, key, None)}: "
                    "they cannot share latents and text conditioning")


def _preset_names() -> set[str]:
    return set(list_candidate_presets())


def resolve_unet(spec: Any, pipe: Any = None, teacher: str | None = None, device: Any = "cpu",
                 dtype: torch.dtype | None = None) -> HybridModel:
    """A U-Net module from a module or a spec.

    Specs: ``"teacher"`` (the pipeline's own U-Net); a candidate preset (``bk-sdm-base``, ...) or
    candidate JSON/YAML file, built from the pipeline's U-Net by weight inheritance (not distilled);
    an export directory (``hybridsd_nas.json`` inside: :func:`hybridsd_nas.load_unet`); a zoo
    name, model or pipeline directory, or hub id (:func:`hybridsd_nas.arch.load_pretrained_unet`).
    """
    if isinstance(spec, HybridModel):
        return spec
    if isinstance(spec, nn.Module):
        name = getattr(spec, "hybridsd_name", None) or type(spec).__name__
        cand = getattr(spec, "hybridsd_candidate", None)
        if cand is not None and getattr(cand, "name", None):
            name = cand.name
        return HybridModel(spec, name, origin="module")
    if not isinstance(spec, (str, Path)):
        raise HybridModelError(f"a U-Net must be a module or a spec string, got {type(spec).__name__}")
    s = str(spec)
    if s == "teacher":
        if pipe is None:
            raise HybridModelError("'teacher' needs a pipeline")
        return HybridModel(pipe.unet, "teacher", origin="pipeline", info={"teacher": teacher})
    p = Path(s)
    if p.is_dir() and (p / "hybridsd_nas.json").is_file():
        m = load_unet(p, device=device, dtype=dtype)
        return HybridModel(m, p.name, origin="export", info={"path": str(p)})
    is_cand_file = p.is_file() and p.suffix in (".json", ".yaml", ".yml")
    if s in _preset_names() or is_cand_file:
        if pipe is None:
            raise HybridModelError(f"candidate {s!r} is built from the teacher: give a pipeline")

        arch = describe({k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")})
        cand = resolve_candidate(s, arch)
        pl = plan(arch, cand)
        m = build_student(pl, teacher=pipe.unet, device=device)
        if dtype is not None and m.dtype != dtype:
            m = m.to(dtype=dtype)
        m.eval()
        name = f"{s} (weight inheritance, not distilled)" if not is_cand_file else f"{p.stem} (weight inheritance, not distilled)"
        return HybridModel(m, name, origin="candidate preset (weight inheritance)",
                           info={"candidate": cand.to_dict(), "teacher": teacher, "distilled": False})

    m = load_pretrained_unet(s, device=str(device) if device is not None else "cpu", dtype=dtype)
    return HybridModel(m, s, origin="directory" if p.exists() else "zoo or hub", info={"path": s})


def tiny_random_vae(latent_channels: int = 4, upsample: int = 8, seed: int = 0, width: int = 16) -> nn.Module:
    """A randomly initialised ``AutoencoderTiny`` (TAESD layout, narrow) with ``latent_channels`` and
    an ``upsample`` factor (a power of two): a stand-in for an edge decoder in tests and cost figures."""

    n_up = int(upsample).bit_length() - 1
    if upsample < 1 or 2 ** n_up != upsample:
        raise HybridModelError(f"upsample must be a power of two, got {upsample}")
    blocks = n_up + 1
    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(width,) * blocks, decoder_block_out_channels=(width,) * blocks,
        num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels, upsampling_scaling_factor=2,
    )
    return vae.eval()


def resolve_vae(spec: Any, pipe: Any) -> tuple[nn.Module | None, str]:
    """``None``/``"teacher"`` -> the pipeline's VAE; a module; ``"tiny-random"``; a diffusers VAE directory."""
    if spec is None or spec == "teacher":
        return None, "teacher VAE"
    lat = getattr(pipe.vae.config, "latent_channels", 4)
    if isinstance(spec, nn.Module):
        vae = spec
        name = type(spec).__name__
    elif spec == "tiny-random":
        vae = tiny_random_vae(lat, upsample=getattr(pipe, "vae_scale_factor", 8))
        name = "AutoencoderTiny (random weights)"
    else:
        p = Path(str(spec))
        if not p.is_dir() or not (p / "config.json").is_file():
            raise HybridModelError(f"VAE {spec!r}: give 'teacher', 'tiny-random' or a diffusers VAE directory (config.json)")

        cls_name = json.loads((p / "config.json").read_text()).get("_class_name", "AutoencoderKL")

        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise HybridModelError(f"{p}: unknown VAE class {cls_name!r}")
        vae = cls.from_pretrained(p, use_safetensors=True).eval()
        name = f"{cls_name} ({p.name})"
    if getattr(vae.config, "latent_channels", lat) != lat:
        raise HybridModelError(f"VAE {name} has {vae.config.latent_channels} latent channels, the pipeline's U-Nets {lat}")
    if vae.device != pipe.vae.device or vae.dtype != pipe.vae.dtype:
        with quiet():
            vae = vae.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    return vae, name
