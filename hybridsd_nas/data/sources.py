"""Where training data comes from: one spec string names an image-caption source or a prompt file.

Spec strings (``?key=value&...`` options after any of them, e.g. ``hf:DIR?image=img&text=caption&limit=500``):

- ``fashion-mnist``: the embedded teacher's image set, class prompts with random templates
  (options ``split``, ``seed``, ``limit``);
- ``DIR`` or ``folder:DIR``: an image-text folder in the Hugging Face ``imagefolder`` convention;
- ``hf:DIR``: a ``datasets`` dataset saved with ``save_to_disk``; ``parquet:GLOB``: parquet files;
- ``wds:PATTERN``: webdataset tar shards (brace patterns such as ``shards/{000..003}.tar``);
- ``prompts:FILE``: prompts the teacher samples once (data-free distillation).

:func:`validate_source` checks a source before any model is loaded; :func:`iter_examples` streams its
image-caption pairs; :func:`prepare_image` crops and scales one image to the training resolution.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from hybridsd_nas.core.errors import ConfigError, HybridSDError
from hybridsd_nas.core.paths import cache_dir
from hybridsd_nas.data.fashion_mnist import data_dir, load_fashion_mnist, to_rgb_uint8
from hybridsd_nas.data.prompts import prompt_for_label

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
LEGACY_CAPTIONS = ("captions.jsonl", "captions.json")
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# kind -> the form a user writes and the options it takes (``limit`` is common to all)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fashion-mnist": ("fashion-mnist", ("split", "seed")),
    "folder": ("DIR or folder:DIR", ("text",)),
    "hf": ("hf:DIR", ("image", "text", "split")),
    "parquet": ("parquet:GLOB", ("image", "text")),
    "wds": ("wds:PATTERN", ("image", "text")),
    "prompts": ("prompts:FILE", ("count", "steps", "guidance", "seed")),
}
SPEC_FORMS = tuple(form for form, _ in KINDS.values())
INT_OPTIONS = ("limit", "seed", "count", "steps")
_QUERY = re.compile(r"^[a-z_]+=[^&=]*(&[a-z_]+=[^&=]*)*$")
_PREFIX = re.compile(r"^([A-Za-z][\w.+-]*):(.*)$", re.S)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source: its kind, location (an absolute path, glob or shard pattern; empty for
    Fashion-MNIST), options as sorted ``(key, value)`` pairs, and whether small images may be upscaled."""

    kind: str
    location: str = ""
    options: tuple[tuple[str, str], ...] = ()
    resize: bool = False

    def option(self, key: str, default: Any = None) -> Any:
        """One option, converted (ints for limit/seed/count/steps, a float for guidance), else ``default``."""
        v = dict(self.options).get(key)
        if v is None:
            return default
        return int(v) if key in INT_OPTIONS else float(v) if key == "guidance" else v

    @property
    def limit(self) -> int | None:
        return self.option("limit")

    def with_options(self, **values: Any) -> DataSpec:
        """The spec with ``values`` set (a value of None removes the option)."""
        opts = dict(self.options)
        for k, v in values.items():
            if v is None:
                opts.pop(k, None)
            else:
                opts[k] = str(v)
        return dataclasses.replace(self, options=_check_options(self.kind, opts))

    def with_defaults(self, **values: Any) -> DataSpec:
        """The spec with ``values`` for the options it does not set."""
        have = dict(self.options)
        return self.with_options(**{k: v for k, v in values.items() if k not in have and v is not None})

    def describe(self) -> str:
        """A readable one-liner."""
        o = dict(self.options)
        first = f", first {o['limit']}" if "limit" in o and self.kind != "fashion-mnist" else ""
        if self.kind == "fashion-mnist":
            n = f", {o['limit']} images" if "limit" in o else ""
            return f"Fashion-MNIST {o.get('split', 'train')}{n} (seed {o.get('seed', 0)})"
        if self.kind == "prompts":
            settings = ", ".join(f"{k} {o[k]}" for k in ("count", "steps", "guidance", "seed") if k in o)
            return f"teacher samples of the prompts in {self.location}" + (f" ({settings})" if settings else "") + first
        cols = ", ".join(f"{k}={o[k]}" for k in ("image", "text", "split") if k in o)
        name = {"folder": "image folder", "hf": "datasets dataset", "parquet": "parquet files", "wds": "webdataset shards"}[self.kind]
        return f"{name} {self.location}" + (f" ({cols})" if cols else "") + first

    def fingerprint(self) -> str:
        """A cheap content hash: file names, sizes and modification times (a prompt file's bytes)."""
        h = hashlib.sha1(self.kind.encode())
        if self.kind == "prompts":
            h.update(_existing(self, Path(self.location)).read_bytes())
        else:
            for rel, st in _content_files(self):
                h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Kind, location, options and fingerprint, for provenance records."""
        return {"kind": self.kind, "location": self.location, "options": dict(self.options), "fingerprint": self.fingerprint()}

    def __str__(self) -> str:
        return self.describe()


def _valid_kinds() -> str:
    return ", ".join(SPEC_FORMS)


def _check_options(kind: str, opts: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The options checked and written one way (``guidance=4`` and ``4.0`` alike), sorted."""
    allowed = ("limit", *KINDS[kind][1])
    opts = dict(opts)
    for k, v in opts.items():
        if k not in allowed:
            raise ConfigError(f"data option {k!r} does not apply to {kind}; valid: {', '.join(allowed)}")
        if k in INT_OPTIONS:
            if not re.fullmatch(r"\s*-?\d+\s*", v) or (k != "seed" and int(v) < 1):
                raise ConfigError(f"data option {k}={v!r} is not a {'whole number' if k == 'seed' else 'positive whole number'}")
            opts[k] = str(int(v))
        elif k == "guidance":
            try:
                opts[k] = repr(float(v))
            except ValueError:
                raise ConfigError(f"data option guidance={v!r} is not a number") from None
        elif k == "split" and kind == "fashion-mnist" and v not in ("train", "test"):
            raise ConfigError(f"unknown Fashion-MNIST split {v!r}; valid: train, test")
        elif not v:
            raise ConfigError(f"data option {k}= is empty")
    return tuple(sorted(opts.items()))


def parse_data_spec(text: str, resize: bool = False) -> DataSpec:
    """Parse a spec string (see the module's docstring); a one-line ConfigError names what is wrong."""
    s = str(text).strip()
    if not s:
        raise ConfigError(f"empty data spec; valid: {_valid_kinds()}")
    opts: dict[str, str] = {}
    head, sep, query = s.rpartition("?")
    if sep and _QUERY.match(query) and not Path(s).exists():
        s = head
        opts = dict(pair.split("=", 1) for pair in query.split("&"))
    m = _PREFIX.match(s)
    if s in ("fashion-mnist", "default"):
        kind, loc = "fashion-mnist", ""
    elif m and m.group(1) == "fashion-mnist":
        raise ConfigError("fashion-mnist takes no location; options go after '?', e.g. fashion-mnist?split=test&limit=1000")
    elif m and m.group(1) in KINDS and not Path(s).exists():
        kind, loc = m.group(1), m.group(2)
        if not loc:
            raise ConfigError(f"data spec {text!r} names no location; write {KINDS[kind][0]}")
    elif m and len(m.group(1)) > 1 and not Path(s).exists():
        raise ConfigError(f"unknown data source kind {m.group(1)!r} in {text!r}; valid: {_valid_kinds()}")
    else:
        kind, loc = "folder", s
        p = Path(s).expanduser()
        if not p.exists():
            raise ConfigError(f"data folder {s!r} does not exist; valid data specs: {_valid_kinds()}")
        if not p.is_dir():
            raise ConfigError(f"data spec {s!r} is a file, not a folder; name its kind: prompts:{s}, parquet:{s} or wds:{s}")
    if kind in ("folder", "hf", "prompts"):
        loc = os.path.abspath(os.path.expanduser(loc))
    elif kind in ("parquet", "wds"):
        loc = os.path.expanduser(loc)
        loc = loc if os.path.isabs(loc) else os.path.join(os.getcwd(), loc)
    return DataSpec(kind, loc, _check_options(kind, opts), bool(resize))


# --- what is where -----------------------------------------------------------------------------------

def _existing(spec: DataSpec, p: Path) -> Path:
    if not p.exists():
        what = {"folder": "data folder", "hf": "datasets directory", "prompts": "prompt file"}.get(spec.kind, "data path")
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    return p


def _parquet_files(spec: DataSpec) -> list[str]:
    files = sorted(glob.glob(spec.location, recursive=True))
    if not files:
        raise ConfigError(f"parquet:{spec.location} matches no files")
    return files


def _wds_urls(spec: DataSpec) -> list[str]:
    urls = expand_urls(spec.location)
    for u in urls:
        if not Path(u).is_file():
            raise ConfigError(f"webdataset shard {u!r} does not exist (from wds:{spec.location})")
    return urls


def _content_files(spec: DataSpec) -> list[tuple[str, os.stat_result]]:
    """The files a source's content lives in, as (name, stat) in a fixed order."""
    if spec.kind == "fashion-mnist":
        stem = "train" if spec.option("split", "train") == "train" else "t10k"
        d = data_dir()
        return [(f.name, f.stat()) for f in sorted(d.glob(f"{stem}-*-ubyte*"))]
    if spec.kind == "parquet":
        return [(f, os.stat(f)) for f in _parquet_files(spec)]
    if spec.kind == "wds":
        return [(u, os.stat(u)) for u in _wds_urls(spec)]
    root = _existing(spec, Path(spec.location))
    keep = set(METADATA_FILES + LEGACY_CAPTIONS)
    files = [f for f in root.rglob("*") if f.is_file()]
    if spec.kind == "folder":
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTS + (".txt",) or f.name in keep]
    return sorted((f.relative_to(root).as_posix(), f.stat()) for f in files)


# --- examples ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One training example: a name for messages, its caption, a class label (-1: none) and ``load()``,
    which decodes the image (a PIL image, or a (3, R, R) uint8 array already at the resolution)."""

    name: str
    caption: str
    label: int = -1
    load: Callable[[], Any] | None = None


def _decode(data: bytes | str | Path, name: str) -> Image.Image:
    """Open and fully load an image (``load()`` finds truncated files); a ConfigError names it."""
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        im.load()
        return im
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise ConfigError(f"{name}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from None


def prepare_image(image: Any, resolution: int, resize: bool = False, name: str = "image") -> np.ndarray:
    """An image as (3, R, R) uint8: scaled so that its short side is ``resolution`` (upscaling only
    with ``resize``) and centre-cropped. An array already (3, R, R) passes through."""
    if isinstance(image, np.ndarray):
        if image.shape == (3, resolution, resolution):
            return image
        image = Image.fromarray(image)
    im = image.convert("RGB")
    w, h = im.size
    short = min(w, h)
    if not resize:
        _check_size(im, resolution, name)
    if short != resolution:
        sw, sh = max(resolution, round(w * resolution / short)), max(resolution, round(h * resolution / short))
        im = im.resize((sw, sh), Image.BICUBIC)
        w, h = sw, sh
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{i}: not a JSON object")
        yield i, row


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    with open(path, newline="", encoding="utf-8") as f:
        yield from enumerate(csv.DictReader(f), 2)


def folder_items(spec: DataSpec) -> list[tuple[Path, str]]:
    """A folder's images (sorted, recursive) with their captions: ``metadata.jsonl``/``metadata.csv``
    rows (``file_name`` relative to the metadata file, the caption in ``text`` or the ``text=`` option),
    the older ``captions.jsonl``/``captions.json``, or a ``NAME.txt`` beside the image."""
    root = _existing(spec, Path(spec.location))
    if not root.is_dir():
        raise ConfigError(f"data folder {str(root)!r} is not a directory")
    col = spec.option("text", "text")
    captions: dict[str, str] = {}
    for meta in sorted(p for name in METADATA_FILES for p in root.rglob(name)):
        base = meta.parent.relative_to(root)
        for i, row in _metadata_rows(meta):
            if "file_name" not in row or col not in row:
                missing = "file_name" if "file_name" not in row else col
                raise ConfigError(f"{meta}:{i}: no column {missing!r}; columns: {', '.join(map(str, row)) or '(none)'}")
            rel = (base / str(row["file_name"])).as_posix()
            if not (root / rel).is_file():
                raise ConfigError(f"{meta}:{i}: file_name {row['file_name']!r} does not exist")
            captions[rel] = str(row[col])
    if (root / "captions.jsonl").is_file():
        for i, row in _read_jsonl(root / "captions.jsonl"):
            if "file_name" not in row or "text" not in row:
                raise ConfigError(f"{root / 'captions.jsonl'}:{i}: needs file_name and text")
            captions.setdefault(str(row["file_name"]), str(row["text"]))
    elif (root / "captions.json").is_file():
        try:
            legacy = json.loads((root / "captions.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{root / 'captions.json'}: not JSON ({e.msg})") from None
        if not isinstance(legacy, dict):
            raise ConfigError(f"{root / 'captions.json'}: must map file names to captions")
        for k, v in legacy.items():
            captions.setdefault(str(k), str(v))
    files = sorted((f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()),
                   key=lambda f: f.relative_to(root).as_posix())
    if not files:
        hint = "; it looks like a saved datasets dataset: use hf:" + str(root) if (root / "state.json").is_file() or (
            root / "dataset_dict.json").is_file() else ""
        raise ConfigError(f"{root}: no images ({', '.join(IMAGE_EXTS)}){hint}")
    files = files[: spec.limit] if spec.limit else files
    out = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        cap = captions.get(rel)
        if cap is None and f.with_suffix(".txt").is_file():
            cap = f.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if cap is None:
            raise ConfigError(f"{f}: no caption; add {f.with_suffix('.txt').name} beside it or a row in metadata.jsonl "
                              "(file_name, text)")
        out.append((f, cap))
    return out


def read_prompt_file(path: str | Path) -> list[tuple[str, int]]:
    """Prompts and labels (-1: none) of a ``.txt`` (one a line, ``#`` comments), ``.jsonl`` (objects
    with ``prompt`` and an optional ``label`` or ``class_index``) or ``.json`` (a list of those or of strings)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    if p.suffix not in PROMPT_SUFFIXES:
        raise ConfigError(f"{p}: a prompt file is {', '.join(PROMPT_SUFFIXES)}, not {p.suffix or 'a file without suffix'}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".txt":
        rows: list[Any] = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    elif p.suffix == ".jsonl":
        rows = [row for _, row in _read_jsonl(p)]
    else:
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise ConfigError(f"{p}: a .json prompt file is a list of prompts or {{\"prompt\": ...}} objects")
    out = []
    for i, row in enumerate(rows, 1):
        row = {"prompt": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ConfigError(f"{p}: entry {i} has no \"prompt\" text")
        lab = row.get("label", row.get("class_index", -1))
        if not isinstance(lab, int) or isinstance(lab, bool):
            raise ConfigError(f"{p}: entry {i}: label must be an integer, got {lab!r}")
        out.append((row["prompt"].strip(), lab))
    if not out:
        raise ConfigError(f"{p}: the prompt file is empty; give at least one prompt")
    return out


def _columns(spec: DataSpec, columns: list[str], where: str) -> tuple[str, str]:
    image, text = spec.option("image", "image"), spec.option("text", "text")
    for key, col in (("image", image), ("text", text)):
        if col not in columns:
            raise ConfigError(f"{where}: no column {col!r} (the {key} column); columns: {', '.join(columns)}; "
                              f"name another with ?{key}=COLUMN")
    return image, text


def _hf_dataset(spec: DataSpec) -> datasets.Dataset:
    root = _existing(spec, Path(spec.location))
    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # not a save_to_disk directory, or an incompatible one
        raise ConfigError(f"{root}: not a dataset saved with save_to_disk ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = spec.option("split") or ("train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise ConfigError(f"{root}: no split {split!r}; splits: {', '.join(ds)}; name one with ?split=NAME")
        ds = ds[split]
    elif spec.option("split"):
        raise ConfigError(f"{root}: a single dataset has no splits; drop ?split=")
    return ds


def _tabular(spec: DataSpec) -> tuple[Any, str, str, str]:
    """A datasets dataset (hf) or stream (parquet) with its image column undecoded, and its columns."""
    if spec.kind == "hf":
        ds = _hf_dataset(spec)
        where = spec.location
        if spec.limit:
            ds = ds.select(range(min(spec.limit, len(ds))))
    else:
        files = _parquet_files(spec)
        where = f"parquet:{spec.location}"
        try:
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        except Exception as e:  # not parquet, unreadable
            raise ConfigError(f"{where}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        if spec.limit:
            ds = ds.take(spec.limit)
    columns = list(ds.column_names or (ds.features or {}))
    image, text = _columns(spec, columns, where)
    if isinstance((ds.features or {}).get(image), datasets.Image):
        ds = ds.cast_column(image, datasets.Image(decode=False))
    return ds, image, text, where


def _image_value(value: Any, name: str, base: Path | None) -> Callable[[], Any]:
    def load():
        v = value
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, np.ndarray):
            return Image.fromarray(v)
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str) and base is not None and not os.path.isabs(v):
            v = str(base / v)
        if not isinstance(v, (bytes, str)):
            raise ConfigError(f"{name}: not an image (a {type(value).__name__})")
        return _decode(v, name)
    return load


def _tabular_examples(spec: DataSpec) -> Iterator[Example]:
    ds, image, text, where = _tabular(spec)
    base = Path(spec.location) if spec.kind == "hf" else None
    for i, row in enumerate(ds):
        name = f"{where} row {i}"
        cap = row[text]
        if not isinstance(cap, str):
            raise ConfigError(f"{name}: column {text!r} holds no caption ({cap!r})")
        yield Example(name, cap, -1, _image_value(row[image], f"{name} column {image!r}", base))


def _wds_examples(spec: DataSpec) -> Iterator[Example]:
    urls = _wds_urls(spec)
    want_image, want_text = spec.option("image"), spec.option("text")
    n = 0
    for url in urls:
        try:
            for sample in tarfile_samples([{"url": url}]):
                key = sample.get("__key__", "?")
                name = f"{url} sample {key}"
                ik = want_image or next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                if ik is None or ik not in sample:
                    keys = ", ".join(k for k in sample if not k.startswith("__"))
                    raise ConfigError(f"{name}: no image ({want_image or '/'.join(WDS_IMAGE_KEYS)}); keys: {keys}")
                cap = _wds_caption(sample, want_text, name)
                yield Example(name, cap, -1, _image_value(sample[ik], name, None))
                n += 1
                if spec.limit and n >= spec.limit:
                    return
        except (ConfigError, GeneratorExit):
            raise
        except Exception as e:  # a corrupt or truncated tar
            raise ConfigError(f"{url}: unreadable webdataset shard ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _wds_caption(sample: dict, want: str | None, name: str) -> str:
    keys = [want] if want else ["txt", "json"]
    for k in keys:
        if k not in sample:
            continue
        raw = sample[k].decode("utf-8") if isinstance(sample[k], bytes) else str(sample[k])
        if k.endswith("json"):
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"{name}: {k} is not JSON") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                return obj["text"]
            continue
        return raw.strip()
    have = ", ".join(k for k in sample if not k.startswith("__"))
    raise ConfigError(f"{name}: no caption ({' or '.join(k + (' with a text field' if k.endswith('json') else '') for k in keys)}); "
                      f"keys: {have}")


def _fashion_examples(spec: DataSpec, resolution: int) -> Iterator[Example]:
    split, seed = spec.option("split", "train"), spec.option("seed", 0)
    ds = load_fashion_mnist(split)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=min(spec.limit or len(ds), len(ds)), replace=False)
    captions = [prompt_for_label(int(lab), rng) for lab in ds.labels[idx]]  # drawn up front: the order of the draws
    for i, c in zip(idx, captions):
        img = ds.images[i]
        yield Example(f"Fashion-MNIST {split} #{int(i)}", c, int(ds.labels[i]), lambda img=img: to_rgb_uint8(img[None], resolution)[0])


def iter_examples(spec: DataSpec, resolution: int) -> Iterator[Example]:
    """Stream a source's examples in a fixed order (images decoded only by ``Example.load``)."""
    if spec.kind == "fashion-mnist":
        if resolution < 28:
            raise ConfigError(f"resolution {resolution} is smaller than Fashion-MNIST's 28x28 images; valid: >= 28")
        return _fashion_examples(spec, resolution)
    if spec.kind == "folder":
        return (Example(str(f), cap, -1, lambda f=f: _decode(f, str(f))) for f, cap in folder_items(spec))
    if spec.kind in ("hf", "parquet"):
        return _tabular_examples(spec)
    if spec.kind == "wds":
        return _wds_examples(spec)
    if spec.kind == "prompts":
        raise ConfigError(f"{spec.location}: a prompt file holds no images; the teacher samples them (encode_source)")
    raise ConfigError(f"unknown data source kind {spec.kind!r}; valid: {_valid_kinds()}")


def _check_marker(spec: DataSpec, resolution: int | None, resize: bool) -> Path:
    key = json.dumps({"spec": dataclasses.asdict(spec) | {"resize": resize}, "fingerprint": spec.fingerprint(),
                      "resolution": resolution}, sort_keys=True)
    return cache_dir("data", "checked", hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")


def validate_source(spec: DataSpec | str, resolution: int | None, resize: bool = False) -> int:
    """Check a source before any model is loaded and return its number of examples: the paths exist, a
    folder has images and a caption for each, every image opens and loads fully and is at least
    ``resolution`` on its short side (unless ``resize``; None skips that check), columns exist, a prompt
    file has prompts. Streams (one image in memory at a time); a source checked before with the same
    content is not read again. Each failure is a one-line ConfigError naming the file or key."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    resize = resize or spec.resize
    if spec.kind == "prompts":
        n = spec.option("count", len(read_prompt_file(spec.location)))
        return min(n, spec.limit or n)
    if spec.kind == "fashion-mnist":
        try:
            n = len(load_fashion_mnist(spec.option("split", "train")))
        except HybridSDError as e:
            raise ConfigError(str(e)) from None
        if resolution is not None and resolution < 28:
            raise ConfigError(f"resolution {resolution} is smaller than Fashion-MNIST's 28x28 images; valid: >= 28")
        return min(n, spec.limit or n)
    marker = _check_marker(spec, resolution, resize)
    if marker.is_file():
        return int(json.loads(marker.read_text())["count"])
    n = 0
    for ex in iter_examples(spec, resolution or 1):
        image = ex.load()
        if resolution is not None and not resize:
            _check_size(image, resolution, ex.name)
        n += 1
    if n == 0:
        raise ConfigError(f"{spec.describe()}: no examples")
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"count": n, "spec": spec.to_dict()}))
    os.replace(tmp, marker)
    return n


def _check_size(image: Any, resolution: int, name: str) -> None:
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    if min(w, h) < resolution:
        raise ConfigError(f"{name}: {w}x{h} is smaller than the training resolution {resolution} on its short side; "
                          "use larger images, or --resize to upscale them")


__all__ = [
    "DataSpec",
    "Example",
    "IMAGE_EXTS",
    "KINDS",
    "SPEC_FORMS",
    "folder_items",
    "iter_examples",
    "parse_data_spec",
    "prepare_image",
    "read_prompt_file",
    "validate_source",
]
