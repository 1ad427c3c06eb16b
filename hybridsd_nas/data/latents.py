"""Encoded training data on disk: the VAE latents of a source's images (or the teacher's samples of a
prompt file) and the text embeddings of their captions, written in shards and read back memory-mapped,
so that memory stays bounded whatever the data's size.

One cache is a folder ``cache_dir("latents", KEY)``; KEY hashes the teacher, the resolution, the data's
kind, options and fingerprint, the text encoder and, for prompt files, the sampling settings:

- ``shard-00000/latents.npy``: (n, C, h, w) float32, the posterior mode times the VAE's scaling factor;
- ``shard-00000/text_index.npy``, ``labels.npy``: (n,) int64, each example's text row and class (-1: none);
- ``shard-00000/text/NAME.npy``: the text rows first met in this shard, one file per array the text
  encoder returns; ``captions.json`` their captions; ``shard.json`` the counts;
- ``uncond/NAME.npy``: the unconditional row (the empty prompt's encoding, or zeros where the pipeline
  zeroes the negative prompt: SDXL), the last text row;
- ``index.json``: written last (atomic rename); a folder without it is an unfinished encode.

A shard is written under ``shard-K.tmp`` and renamed when complete: an interrupted encode resumes after
its last complete shard, and nothing reads a half-written one. Arrays are ``.npy`` (never pickles).
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import itertools
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.data.sources import DataSpec, Example, iter_examples, parse_data_spec, prepare_image, read_prompt_file
from hybridsd_nas.sources import pipeline_fingerprint
from hybridsd_nas.sources.conditioning import PROMPT, encode_prompts, zeroed_in_unconditional
from hybridsd_nas.sources.teacher import DEFAULT_GUIDANCE, DEFAULT_SAMPLER_STEPS

FORMAT = 1
INDEX = "index.json"
SHARD_SIZE = 1024
DEDUP_LIMIT = 1 << 16  # distinct captions remembered for deduplication; later new ones get rows of their own
MAX_OPEN = 64  # memory-mapped files a Rows keeps open (each holds a file descriptor)
MAP_BUDGET = 1 << 30  # bytes of memory-mapped files a Rows keeps open: bounds the pages reading makes resident

TextEncoder = Callable[..., dict[str, np.ndarray]]  # (pipe, captions) -> named arrays; optionally resolution=


@torch.no_grad()
def encode_text(pipe, captions: list[str], resolution: int | None = None) -> dict[str, np.ndarray]:
    """The pipeline's own text conditioning of ``captions`` as float32 arrays
    (:func:`hybridsd_nas.sources.conditioning.encode_prompts`): SD-1.x/2.x ``{"prompt_embeds": (n, L, D)}``
    (the tokenizer padded to ``model_max_length``, ``text_encoder(ids)[0]``); SDXL adds ``text_embeds``
    (n, P) and ``time_ids`` (n, 6) at ``resolution`` (the encoding's; default the pipeline's). Another
    encoder may return other named arrays; the cache stores whatever it returns, and passes the
    resolution to one that takes a ``resolution`` keyword."""
    return {k: v.float().cpu().numpy() for k, v in encode_prompts(pipe, captions, resolution).items()}


def _takes_resolution(fn: Callable[..., Any]) -> bool:
    try:
        return "resolution" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: call it the plain way
        return False


def encode_rows(text_encoder: TextEncoder, pipe, captions: list[str], resolution: int) -> dict[str, np.ndarray]:
    """``text_encoder``'s named arrays for ``captions`` (with the resolution where it takes one)."""
    if _takes_resolution(text_encoder):
        return text_encoder(pipe, captions, resolution=resolution)
    return text_encoder(pipe, captions)


def unconditional_rows(text_encoder: TextEncoder, pipe, resolution: int) -> dict[str, np.ndarray]:
    """The unconditional row, as the pipeline makes its negative prompt: the empty prompt's encoding,
    with zeros in the arrays the pipeline zeroes (SDXL's ``force_zeros_for_empty_prompt``)."""
    zero = zeroed_in_unconditional(pipe)
    return {k: np.zeros_like(v) if k in zero else v for k, v in encode_rows(text_encoder, pipe, [""], resolution).items()}


def gather_text(data, idx: Any, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents and named text arrays of examples ``idx`` of any training data: its ``gather``, or, for
    data with only ``batch``, its embeddings as ``prompt_embeds``."""
    if hasattr(data, "gather"):
        return data.gather(idx, p_uncond, g)
    lat, emb = data.batch(idx, p_uncond, g) if p_uncond > 0 else data.batch(idx)
    return lat, {PROMPT: emb}


@torch.no_grad()
def encode_images(pipe, images_u8: np.ndarray, batch: int = 64) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> scaled VAE latents (posterior mode: deterministic), float32 on the CPU."""
    vae = pipe.vae
    sf = vae.config.scaling_factor
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(np.ascontiguousarray(images_u8[i : i + batch])).float().div(127.5).sub(1.0)
        out.append(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu() * sf)
    return torch.cat(out)


def pipeline_key(pipe, modules: Iterable[str] = ("text_encoder", "text_encoder_2", "vae")) -> str:
    """What a cache of a pipeline's encodings is keyed by: its directory's content fingerprint, its hub
    id, or (built in memory) a hash of the weights of those of ``modules`` it has."""
    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    if name:
        try:
            return pipeline_fingerprint(name)
        except HybridSDError:  # not a pipeline directory or hub id: key by the weights themselves
            pass
    h = hashlib.sha1()
    for m in modules:
        if getattr(pipe, m, None) is None:
            continue
        for t in getattr(pipe, m).state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    return f"{name or 'in-memory pipeline'}#{h.hexdigest()[:16]}"


# --- the read side -----------------------------------------------------------------------------------

class Rows:
    """The rows of one array kept in parts (in-memory arrays, or ``.npy`` files memory-mapped on demand).
    Of the mapped files at most ``MAX_OPEN``, and ``map_budget`` bytes, stay open (least recently used
    closed first), so that the pages reading makes resident stay bounded. Indexing (an int, a slice, an
    index tensor or array) gathers the rows into a torch tensor: float32 for floating arrays, int64 for integers."""

    def __init__(self, parts: list[Any], lengths: list[int] | None = None, map_budget: int = MAP_BUDGET):
        parts = [p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else p for p in parts]
        lengths = [len(p) for p in parts] if lengths is None else list(lengths)
        keep = [i for i, n in enumerate(lengths) if n]
        self._parts = [parts[i] for i in keep]
        self._lengths = [lengths[i] for i in keep]
        self._starts = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.map_budget = map_budget

    def _part(self, k: int) -> np.ndarray:
        p = self._parts[k]
        if isinstance(p, np.ndarray):
            return p
        a = self._open.pop(k, None)
        if a is None:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
            if len(a) != self._lengths[k]:
                raise HybridSDError(f"{p} holds {len(a)} rows, its index says {self._lengths[k]}; delete the cache to re-encode")
        self._open[k] = a
        while len(self._open) > 1 and (len(self._open) > MAX_OPEN or sum(v.nbytes for v in self._open.values()) > self.map_budget):
            self._open.popitem(last=False)  # the last reference: the file is unmapped
        return a

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._part(0).shape[1:]) if self._parts else (0,)

    def take(self, idx: Any) -> np.ndarray:
        """The rows ``idx`` (1-D integers; negative ones count from the end) as one numpy array."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row {int(idx.max() if idx.max() >= n else idx.min())} out of range for {n} rows")
        first = self._part(0)
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(part):
            m = part == k
            out[m] = self._part(int(k))[idx[m] - self._starts[k]]
        return out

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            rows = self.take(np.arange(*key.indices(len(self))))
        elif isinstance(key, (int, np.integer)):
            rows = self.take([key])[0]
        else:
            rows = self.take(key.cpu().numpy() if isinstance(key, torch.Tensor) else key)
        t = torch.from_numpy(np.ascontiguousarray(rows))
        return t.float() if t.is_floating_point() else t.long()


def _rows(x: Any) -> Rows | None:
    if x is None or isinstance(x, Rows):
        return x
    return Rows(list(x)) if isinstance(x, (list, tuple)) else Rows([x])


class LatentData:
    """Encoded training data: ``latents`` (N, C, h, w), each example's text row ``prompt_index`` (N,), the
    text rows ``text[name]`` (P + 1, ...; the last row is the unconditional one) with
    ``embeddings`` the first of them, the ``prompts`` (P captions), ``labels`` (N,; -1 where none),
    ``source`` (the spec's one-line description) and ``provenance`` (the spec's ``to_dict()``).
    In memory or memory-mapped shards alike; ``batch`` gathers what a training step needs."""

    def __init__(self, latents: Any, prompt_index: Any, embeddings: Any, prompts: list[str] | Callable[[], list[str]],
                 source: str, provenance: dict[str, Any] | None = None, labels: Any = None, path: Path | None = None):
        self.latents = _rows(latents)
        self.prompt_index = _rows(prompt_index)
        text = embeddings if isinstance(embeddings, dict) else {"prompt_embeds": embeddings}
        self.text = {k: _rows(v) for k, v in text.items()}
        self.labels = _rows(labels)
        self._prompts = prompts
        self.source = source
        self.provenance = provenance or {"kind": "in-memory", "source": source}
        self.path = path
        if len(self.prompt_index) != len(self.latents):
            raise ValueError(f"{len(self.prompt_index)} text indices for {len(self.latents)} latents")
        if len({len(v) for v in self.text.values()}) != 1:
            raise ValueError("every text array needs the same number of rows")

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def embeddings(self) -> Rows:
        return next(iter(self.text.values()))

    @property
    def uncond_row(self) -> int:
        return len(self.embeddings) - 1

    @property
    def prompts(self) -> list[str]:
        if callable(self._prompts):
            self._prompts = self._prompts()
        return self._prompts

    def gather(self, idx: Any, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents and every named text array of examples ``idx``; with ``p_uncond`` each example's text
        is the unconditional row with that probability (one draw per example from ``g``)."""
        idx = torch.as_tensor(idx).reshape(-1)
        pi = self.prompt_index[idx]
        if p_uncond > 0:
            drop = torch.rand(len(idx), generator=g) < p_uncond
            pi = torch.where(drop, torch.full_like(pi, self.uncond_row), pi)
        return self.latents[idx], {k: v[pi] for k, v in self.text.items()}

    def batch(self, idx: Any, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, text embeddings)`` of examples ``idx`` as float32 tensors (see :meth:`gather`)."""
        lat, text = self.gather(idx, p_uncond, g)
        return lat, text[next(iter(self.text))]

    def subset(self, start: int, stop: int) -> Subset:
        """Examples ``start..stop-1`` as data of their own (e.g. a held-out tail)."""
        return Subset(self, start, stop)

    @classmethod
    def open(cls, root: str | Path, map_budget: int = MAP_BUDGET) -> LatentData:
        """A finished cache folder (one with ``index.json``), memory-mapped (at most ``map_budget`` bytes
        of each array's files mapped at once)."""
        root = Path(root)
        try:
            index = json.loads((root / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HybridSDError(f"{root}: not a finished latent cache ({type(e).__name__})") from None
        shards = index["shards"]
        names = index["text_names"]

        def files(name: str) -> list[Path]:
            return [root / s["name"] / name for s in shards]

        counts = [s["count"] for s in shards]
        text = {n: Rows([root / s["name"] / "text" / f"{n}.npy" for s in shards] + [root / "uncond" / f"{n}.npy"],
                        [s["text_rows"] for s in shards] + [1], map_budget) for n in names}

        def captions() -> list[str]:
            return [c for s in shards for c in json.loads((root / s["name"] / "captions.json").read_text())]

        return cls(Rows(files("latents.npy"), counts, map_budget), Rows(files("text_index.npy"), counts, map_budget), text,
                   captions, index["source"], index["provenance"], Rows(files("labels.npy"), counts, map_budget), root)


class Subset:
    """A contiguous range of a :class:`LatentData`'s examples, used as data of its own (training and
    scoring call only ``len``, ``gather`` and ``batch``)."""

    def __init__(self, data: LatentData, start: int, stop: int):
        if not 0 <= start < stop <= len(data):
            raise ValueError(f"examples {start}..{stop - 1} are not within the data's {len(data)}")
        self.data, self.start, self.stop = data, start, stop
        self.source = f"{data.source}, examples {start}..{stop - 1}"
        self.provenance = {**data.provenance, "examples": [start, stop]}
        self.text = data.text

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def prompts(self) -> list[str]:
        return self.data.prompts

    def gather(self, idx: Any, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.data.gather(torch.as_tensor(idx).reshape(-1) + self.start, p_uncond, g)

    def batch(self, idx: Any, p_uncond: float = 0.0, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(torch.as_tensor(idx).reshape(-1) + self.start, p_uncond, g)


# --- the write side ----------------------------------------------------------------------------------

class _ShardWriter:
    """One shard being written under ``path`` (``shard-K.tmp``) into preallocated memory-mapped files."""

    def __init__(self, path: Path, capacity: int, text_dtype: str):
        shutil.rmtree(path, ignore_errors=True)
        (path / "text").mkdir(parents=True)
        self.path, self.capacity, self.text_dtype = path, capacity, np.dtype(text_dtype)
        self.arrays: dict[str, np.memmap] = {}
        self.texts: dict[str, np.memmap] = {}
        self.count = self.text_count = 0
        self.captions: list[str] = []

    def _array(self, store: dict, name: str, file: Path, dtype: Any, row_shape: tuple[int, ...]) -> np.memmap:
        if name not in store:
            store[name] = open_memmap(file, mode="w+", dtype=dtype, shape=(self.capacity, *row_shape))
        return store[name]

    def add(self, latents: np.ndarray, rows: np.ndarray, labels: np.ndarray, text: dict[str, np.ndarray], captions: list[str]) -> None:
        a, b = self.count, self.count + len(latents)
        for name, arr, dtype in (("latents", latents, np.float32), ("text_index", rows, np.int64), ("labels", labels, np.int64)):
            self._array(self.arrays, name, self.path / f"{name}.npy", dtype, arr.shape[1:])[a:b] = arr
        t = self.text_count
        for name, arr in text.items():
            if len(arr) != len(captions):
                raise HybridSDError(f"the text encoder returned {len(arr)} rows of {name!r} for {len(captions)} captions")
            self._array(self.texts, name, self.path / "text" / f"{name}.npy", self.text_dtype, arr.shape[1:])[t : t + len(arr)] = arr
        self.count, self.text_count = b, t + len(captions)
        self.captions += captions

    def finish(self, final: Path) -> dict[str, Any]:
        """Trim the files to what was written, write the captions and counts, and rename to ``final``."""
        for store, n in ((self.arrays, self.count), (self.texts, self.text_count)):
            names = {k: Path(v.filename) for k, v in store.items()}
            for v in store.values():
                v.flush()
            store.clear()
            for path in names.values():
                _trim(path, n)
        (self.path / "captions.json").write_text(json.dumps(self.captions))
        meta = {"name": final.name, "count": self.count, "text_rows": self.text_count}
        (self.path / "shard.json").write_text(json.dumps(meta))
        os.replace(self.path, final)
        return meta

    def discard(self) -> None:
        self.arrays.clear()
        self.texts.clear()
        shutil.rmtree(self.path, ignore_errors=True)


def _trim(path: Path, n: int, chunk: int = 256) -> None:
    """Keep the first ``n`` rows of a ``.npy`` file (copied in chunks: bounded memory)."""
    src = np.load(path, mmap_mode="r", allow_pickle=False)
    if len(src) == n:
        return
    tmp = path.with_name(path.stem + ".trim.npy")
    dst = open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(n, *src.shape[1:]))
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        dst[i:j] = src[i:j]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def _finished_shards(root: Path) -> list[dict[str, Any]]:
    """The complete shards of an interrupted encode, in order (renamed folders with their counts)."""
    out = []
    for k in itertools.count():
        meta = root / f"shard-{k:05d}" / "shard.json"
        if not meta.is_file():
            break
        out.append(json.loads(meta.read_text()))
    for stale in root.glob("shard-*"):  # a .tmp one, or one after a gap
        if stale.name not in {m["name"] for m in out}:
            shutil.rmtree(stale, ignore_errors=True)
    return out


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One process encodes a cache at a time; the others wait and then read it."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def default_batch_size(resolution: int) -> int:
    """Images per VAE batch: about 2 Mpixel, 1 to 256 images."""
    return max(1, min(256, (1 << 21) // (resolution * resolution)))


def _with_defaults(spec: DataSpec, seed: int, sampling: tuple[int, float] | None) -> DataSpec:
    if spec.kind == "fashion-mnist":
        return spec.with_defaults(seed=seed)
    if spec.kind == "prompts":
        steps, guidance = sampling or (DEFAULT_SAMPLER_STEPS, DEFAULT_GUIDANCE)
        return spec.with_defaults(count=len(read_prompt_file(spec.location)), steps=steps, guidance=guidance, seed=seed)
    return spec


def cache_key(spec: DataSpec, pipe, resolution: int, text_encoder: TextEncoder = encode_text,
              text_dtype: str = "float32") -> dict[str, Any]:
    """What a cache is keyed by: the teacher (its U-Net and scheduler too for sampled data), the
    resolution, the data's kind, options and fingerprint (not its location), the text encoding."""
    sampled = spec.kind == "prompts"
    data = {k: v for k, v in spec.to_dict().items() if k != "location"}
    mods = ("text_encoder", "text_encoder_2", "vae")
    key = {"format": FORMAT, "teacher": pipeline_key(pipe, (*mods, "unet") if sampled else mods),
           "dtype": str(pipe.vae.dtype), "resolution": resolution, "data": data,
           "text_encoder": f"{text_encoder.__module__}.{text_encoder.__qualname__}", "text_dtype": str(np.dtype(text_dtype))}
    if sampled:
        key["sampler"] = {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config), "unet": str(pipe.unet.dtype)}
    return key


def encode_source(spec: DataSpec | str, pipe, resolution: int | None = None, *, seed: int = 0,
                  sampling: tuple[int, float] | None = None, text_encoder: TextEncoder = encode_text,
                  shard_size: int = SHARD_SIZE, batch_size: int | None = None, text_dtype: str = "float32",
                  cache_root: str | Path | None = None, map_budget: int = MAP_BUDGET, progress: bool = False) -> LatentData:
    """Encode a source through ``pipe`` into the on-disk cache (once: a second call reads it) and return
    it memory-mapped. ``resolution`` defaults to the VAE's ``sample_size``; ``seed`` is the default of
    Fashion-MNIST's draw and of a prompt file's sampling seeds (sample ``i`` uses ``seed + i``);
    ``sampling`` = (steps, guidance) the default for a prompt file; ``map_budget``: see :class:`Rows`."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    res = int(resolution or pipe.vae.config.sample_size)
    spec = _with_defaults(spec, seed, sampling)
    key = cache_key(spec, pipe, res, text_encoder, text_dtype)
    root = Path(cache_root or cache_dir("latents")) / hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    with _locked(root):
        if not (root / INDEX).is_file():
            _encode(root, key, spec, pipe, res, text_encoder, text_dtype, shard_size, batch_size or default_batch_size(res), progress)
        return LatentData.open(root, map_budget)


def _prompt_examples(spec: DataSpec) -> Iterator[Example]:
    prompts = read_prompt_file(spec.location)
    n = spec.option("count")
    for i in range(min(n, spec.limit or n)):
        p, lab = prompts[i % len(prompts)]
        yield Example(f"{spec.location} sample {i}", p, lab)


def _latents_of(spec: DataSpec, pipe, res: int, exs: list[Example], start: int) -> np.ndarray:
    if spec.kind != "prompts":
        images = np.stack([prepare_image(e.load(), res, spec.resize, e.name) for e in exs])
        return encode_images(pipe, images, batch=len(images)).numpy()
    seed = spec.option("seed")
    gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(exs))]
    out = pipe([e.caption for e in exs], num_inference_steps=spec.option("steps"), guidance_scale=spec.option("guidance"),
               generator=gens, height=res, width=res, output_type="latent")
    return out.images.float().cpu().numpy()


def _encode(root: Path, key: dict, spec: DataSpec, pipe, res: int, text_encoder: TextEncoder, text_dtype: str,
            shard_size: int, batch: int, progress: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    done = _finished_shards(root)
    table: dict[str, int] = {}
    text_rows = 0
    for meta in done:
        for cap in json.loads((root / meta["name"] / "captions.json").read_text()):
            if len(table) < DEDUP_LIMIT:
                table.setdefault(cap, text_rows)
            text_rows += 1
    start = sum(m["count"] for m in done)
    examples = _prompt_examples(spec) if spec.kind == "prompts" else iter_examples(spec, res)
    it = itertools.islice(examples, start, None)
    bar = tqdm(desc="encode data", unit="img", initial=start, disable=not progress, leave=False)
    shards = list(done)
    while True:
        writer = _ShardWriter(root / f"shard-{len(shards):05d}.tmp", shard_size, text_dtype)
        while writer.count < shard_size:
            exs = list(itertools.islice(it, min(batch, shard_size - writer.count)))
            if not exs:
                break
            lat = _latents_of(spec, pipe, res, exs, start)
            rows, new = [], []
            for e in exs:
                r = table.get(e.caption)
                if r is None:
                    r = text_rows + len(new)
                    new.append(e.caption)
                    if len(table) < DEDUP_LIMIT:
                        table[e.caption] = r
                rows.append(r)
            text = encode_rows(text_encoder, pipe, new, res) if new else {}
            writer.add(lat, np.asarray(rows, dtype=np.int64), np.asarray([e.label for e in exs], dtype=np.int64), text, new)
            text_rows += len(new)
            start += len(exs)
            bar.update(len(exs))
        if writer.count == 0:
            writer.discard()
            break
        full = writer.count == shard_size
        shards.append(writer.finish(root / f"shard-{len(shards):05d}"))
        if not full:
            break
    bar.close()
    if not shards:
        raise ConfigError(f"{spec.describe()}: no examples")
    uncond = unconditional_rows(text_encoder, pipe, res)
    tmp = root / "uncond.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arr in uncond.items():
        np.save(tmp / f"{name}.npy", np.asarray(arr, dtype=text_dtype), allow_pickle=False)
    shutil.rmtree(root / "uncond", ignore_errors=True)
    os.replace(tmp, root / "uncond")
    first = np.load(root / shards[0]["name"] / "latents.npy", mmap_mode="r", allow_pickle=False)
    _write_json_atomic(root / INDEX, {
        "format": FORMAT, "key": key, "source": spec.describe(), "provenance": spec.to_dict(), "resolution": res,
        "count": start, "text_rows": text_rows, "latent_shape": list(first.shape[1:]), "text_names": list(uncond),
        "shards": shards})
