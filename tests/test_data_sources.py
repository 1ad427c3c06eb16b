"""Data sources named by one spec string, their checks, and the sharded, memory-mapped latent cache."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import webdataset
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import hybridsd_nas.data.sources as data_sources
import hybridsd_nas.distill.final as final
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.data import (
    DataSpec,
    LatentData,
    Rows,
    encode_images,
    encode_source,
    encode_text,
    iter_examples,
    parse_data_spec,
    prepare_image,
    read_prompt_file,
    validate_source,
)
from hybridsd_nas.zoo.recipe import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, sampling_scheduler, vocab_size, write_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RES = 32
CAPTIONS = ["a photo of a dress", "a coat", "a red sandal", "a blue bag"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and much faster than on several of a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_tiny_pipe(tok_dir: Path) -> StableDiffusionPipeline:
    """A random-weight SD-1.x pipeline with the zoo recipe's text encoder and U-Net and a narrower VAE
    (32 px images, 16x16x4 latents)."""
    write_clip_tokenizer(tok_dir, CAPTIONS)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=vocab_size(tok_dir))).eval()
    vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": [8, 16], "norm_num_groups": 8}).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=UNet2DConditionModel(**UNET_CONFIG).eval(), scheduler=sampling_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipe(tmp_path_factory.mktemp("tok"))


def _img(seed: int, w: int = 40, h: int = 36) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _pairs(spec, res=RES):
    """(caption, image as (3, R, R) uint8) of every example."""
    return [(e.caption, prepare_image(e.load(), res, name=e.name)) for e in iter_examples(spec, res)]


def _same_images(pairs, images):
    assert len(pairs) == len(images)
    for (_, got), im in zip(pairs, images):
        np.testing.assert_array_equal(got, prepare_image(im, RES))


def _counting(monkeypatch, module, name="forward"):
    calls = []
    orig = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    return calls


# --- parsing -----------------------------------------------------------------------------------------

def test_every_kind_parses_with_its_options(tmp_path):
    s = parse_data_spec("fashion-mnist?split=test&limit=7&seed=3")
    assert (s.kind, s.location, s.limit, s.option("seed"), s.option("split")) == ("fashion-mnist", "", 7, 3, "test")
    assert s.describe() == "Fashion-MNIST test, 7 images (seed 3)"
    assert parse_data_spec("default") == DataSpec("fashion-mnist")
    (tmp_path / "d").mkdir()
    assert parse_data_spec(str(tmp_path / "d")) == parse_data_spec(f"folder:{tmp_path / 'd'}") == DataSpec("folder", str(tmp_path / "d"))
    h = parse_data_spec(f"hf:{tmp_path}/x?image=img&text=caption&limit=5", resize=True)
    assert (h.kind, h.location, h.option("image"), h.option("text"), h.limit, h.resize) == ("hf", f"{tmp_path}/x", "img", "caption", 5, True)
    assert h.describe() == f"datasets dataset {tmp_path}/x (image=img, text=caption), first 5"
    p = parse_data_spec(f"parquet:{tmp_path}/train-?????.parquet")  # a glob's "?" is no query
    assert (p.kind, p.location, p.options) == ("parquet", f"{tmp_path}/train-?????.parquet", ())
    w = parse_data_spec(f"wds:{tmp_path}/{{000..003}}.tar?text=caption")
    assert (w.kind, w.location, w.option("text")) == ("wds", f"{tmp_path}/{{000..003}}.tar", "caption")
    q = parse_data_spec(f"prompts:{tmp_path}/p.txt?count=9&steps=4&guidance=3.5")
    assert (q.kind, q.option("count"), q.option("steps"), q.option("guidance")) == ("prompts", 9, 4, 3.5)
    assert q.with_defaults(steps=20, seed=1).options == (("count", "9"), ("guidance", "3.5"), ("seed", "1"), ("steps", "4"))
    assert parse_data_spec("prompts:p.txt?guidance=4").options == q.with_options(guidance=4.0, count=None, steps=None).options == (("guidance", "4.0"),)


@pytest.mark.parametrize("text, needle", [
    ("s3:bucket/x", "unknown data source kind 's3' in 's3:bucket/x'; valid: fashion-mnist, DIR or folder:DIR, hf:DIR, parquet:GLOB, wds:PATTERN, prompts:FILE"),
    ("no/such/dir", "data folder 'no/such/dir' does not exist; valid data specs: fashion-mnist"),
    ("fashion-mnist?splt=test", "data option 'splt' does not apply to fashion-mnist; valid: limit, split, seed"),
    ("fashion-mnist?split=validation", "unknown Fashion-MNIST split 'validation'; valid: train, test"),
    ("hf:x?limit=0", "limit='0' is not a positive whole number"),
    ("prompts:p.txt?guidance=high", "guidance='high' is not a number"),
    ("hf:", "names no location; write hf:DIR"),
])
def test_bad_specs_name_what_is_wrong(text, needle):
    with pytest.raises(ConfigError) as e:
        parse_data_spec(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


# --- each kind yields its image-caption pairs ------------------------------------------------------------

def test_imagefolder_with_metadata_jsonl_recursive(tmp_path):
    images = [_img(i) for i in range(3)]
    (tmp_path / "sub").mkdir()
    images[0].save(tmp_path / "b.png")
    images[1].save(tmp_path / "sub" / "a.jpg", quality=100)
    images[2].save(tmp_path / "c.webp", lossless=True)
    images[1] = Image.open(tmp_path / "sub/a.jpg").convert("RGB")  # JPEG is lossy: compare with what is on disk
    rows = [{"file_name": "b.png", "text": "a coat"}, {"file_name": "c.webp", "text": "a red sandal"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a blue bag"}) + "\n")
    pairs = _pairs(parse_data_spec(str(tmp_path)))
    assert [c for c, _ in pairs] == ["a coat", "a red sandal", "a blue bag"]  # b.png, c.webp, sub/a.jpg
    _same_images(pairs, [images[0], images[2], images[1]])
    assert len(_pairs(parse_data_spec(f"folder:{tmp_path}?limit=2"))) == 2


def test_imagefolder_with_csv_metadata_and_another_text_column(tmp_path):
    for i in range(2):
        _img(i).save(tmp_path / f"{i}.png")
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "caption"], ["0.png", "a coat"], ["1.png", "a dress"]])
    assert [c for c, _ in _pairs(parse_data_spec(f"{tmp_path}?text=caption"))] == ["a coat", "a dress"]
    with pytest.raises(ConfigError, match=r"metadata.csv:2: no column 'text'; columns: file_name, caption"):
        validate_source(parse_data_spec(str(tmp_path)), RES)


def test_folder_with_txt_captions_and_the_older_captions_jsonl(tmp_path):
    a, b = tmp_path / "txt", tmp_path / "legacy"
    a.mkdir(), b.mkdir()
    for i in range(2):
        _img(i).save(a / f"{i}.png")
        (a / f"{i}.txt").write_text(f" {CAPTIONS[i]}\n")
        _img(i).save(b / f"{i}.png")
    (b / "captions.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}) + "\n" + json.dumps({"file_name": "1.png", "text": "y"}))
    pa = _pairs(parse_data_spec(str(a)))
    assert [c for c, _ in pa] == CAPTIONS[:2]
    _same_images(pa, [_img(0), _img(1)])
    assert [c for c, _ in _pairs(parse_data_spec(str(b)))] == ["x", "y"]
    assert validate_source(parse_data_spec(str(a)), RES) == 2


def test_saved_datasets_dataset_with_named_columns_and_splits(tmp_path):
    images = [_img(i) for i in range(3)]
    feats = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": images, "caption": CAPTIONS[:3]}, features=feats)
    ds.save_to_disk(str(tmp_path / "ds"))
    pairs = _pairs(parse_data_spec(f"hf:{tmp_path / 'ds'}?image=img&text=caption"))
    assert [c for c, _ in pairs] == CAPTIONS[:3]
    _same_images(pairs, images)
    assert len(_pairs(parse_data_spec(f"hf:{tmp_path / 'ds'}?image=img&text=caption&limit=2"))) == 2
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert [c for c, _ in _pairs(parse_data_spec(f"hf:{tmp_path / 'dd'}?image=img&text=caption&split=test"))] == [CAPTIONS[2]]
    with pytest.raises(ConfigError, match=r"no column 'image' \(the image column\); columns: img, caption; name another with \?image=COLUMN"):
        validate_source(parse_data_spec(f"hf:{tmp_path / 'ds'}?text=caption"), RES)
    with pytest.raises(ConfigError, match=r"no split 'val'; splits: train, test"):
        validate_source(parse_data_spec(f"hf:{tmp_path / 'dd'}?image=img&text=caption&split=val"), RES)


def test_parquet_files_by_glob(tmp_path):
    images = [_img(i) for i in range(4)]
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for k in range(2):
        datasets.Dataset.from_dict({"image": images[2 * k : 2 * k + 2], "text": CAPTIONS[2 * k : 2 * k + 2]},
                                   features=feats).to_parquet(str(tmp_path / f"train-{k:05d}.parquet"))
    pairs = _pairs(parse_data_spec(f"parquet:{tmp_path}/train-*.parquet"))
    assert [c for c, _ in pairs] == CAPTIONS
    _same_images(pairs, images)
    with pytest.raises(ConfigError, match=r"no column 'caption' \(the text column\); columns: image, text"):
        validate_source(parse_data_spec(f"parquet:{tmp_path}/train-*.parquet?text=caption"), RES)


def _write_shards(tmp_path, images, captions, per_shard=2):
    for k in range(0, len(images), per_shard):
        with webdataset.TarWriter(str(tmp_path / f"{k // per_shard:03d}.tar")) as w:
            for i in range(k, min(k + per_shard, len(images))):
                sample = {"__key__": f"s{i:04d}", "png" if i % 2 else "jpg": _png_bytes(images[i], "PNG" if i % 2 else "JPEG")}
                sample.update({"json": json.dumps({"text": captions[i]}).encode()} if i == 3 else {"txt": captions[i]})
                w.write(sample)


def test_webdataset_two_shards_with_brace_pattern(tmp_path):
    images = [_img(i) for i in range(4)]
    _write_shards(tmp_path, images, CAPTIONS)
    spec = parse_data_spec(f"wds:{tmp_path}/{{000..001}}.tar")
    pairs = _pairs(spec)
    assert [c for c, _ in pairs] == CAPTIONS  # the last caption from json's "text"
    on_disk = [Image.open(io.BytesIO(_png_bytes(im, "PNG" if i % 2 else "JPEG"))).convert("RGB") for i, im in enumerate(images)]
    _same_images(pairs, on_disk)
    assert validate_source(spec, RES) == 4
    assert len(_pairs(parse_data_spec(f"wds:{tmp_path}/{{000..001}}.tar?limit=3"))) == 3
    with pytest.raises(ConfigError, match=r"002.tar' does not exist"):
        validate_source(parse_data_spec(f"wds:{tmp_path}/{{000..003}}.tar"), RES)


def test_prompt_files_txt_jsonl_json(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na coat\n\n a dress \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a coat", "label": 4}\n{"prompt": "a bag"}\n')
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a coat", "class_index": 4}, "a bag"]))
    assert read_prompt_file(tmp_path / "p.txt") == [("a coat", -1), ("a dress", -1)]
    assert read_prompt_file(tmp_path / "p.jsonl") == read_prompt_file(tmp_path / "p.json") == [("a coat", 4), ("a bag", -1)]
    assert validate_source(parse_data_spec(f"prompts:{tmp_path / 'p.jsonl'}"), RES) == 2


# --- each bad input: one line naming the file or key -----------------------------------------------------

def _bad_folder(tmp_path, what):
    d = tmp_path / what
    d.mkdir()
    for i in range(3):
        _img(i).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(CAPTIONS[i])
    if what == "no-images":
        for f in d.glob("*.png"):
            f.unlink()
    elif what == "no-caption":
        (d / "1.txt").unlink()
        (d / "2.txt").unlink()
    elif what == "truncated":
        data = (d / "1.png").read_bytes()
        (d / "1.png").write_bytes(data[: len(data) // 2])
    elif what == "not-an-image":
        (d / "2.png").write_text("hello")
    elif what == "small":
        _img(5, 40, 20).save(d / "2.png")
    elif what == "bad-metadata":
        (d / "metadata.jsonl").write_text(json.dumps({"file_name": "9.png", "text": "x"}) + "\n")
    return d


@pytest.mark.parametrize("what, needle", [
    ("no-images", r"no-images: no images \(.png, .jpg"),
    ("no-caption", r"no-caption/1.png: no caption; add 1.txt beside it or a row in metadata.jsonl"),
    ("truncated", r"truncated/1.png: unreadable image \(OSError: image file is truncated"),
    ("not-an-image", r"not-an-image/2.png: unreadable image \(UnidentifiedImageError"),
    ("small", r"small/2.png: 40x20 is smaller than the training resolution 32 on its short side; use larger images, or --resize"),
    ("bad-metadata", r"metadata.jsonl:1: file_name '9.png' does not exist"),
])
def test_bad_folder_is_one_line_naming_the_file(tmp_path, what, needle):
    d = _bad_folder(tmp_path, what)
    with pytest.raises(ConfigError, match=needle) as e:
        validate_source(parse_data_spec(str(d)), RES)
    assert "\n" not in str(e.value)


def test_small_images_pass_with_resize_and_are_upscaled(tmp_path):
    d = _bad_folder(tmp_path, "small")
    assert validate_source(parse_data_spec(str(d)), RES, resize=True) == 3
    assert validate_source(parse_data_spec(str(d), resize=True), RES) == 3
    im = prepare_image(_img(5, 40, 20), RES, resize=True)
    assert im.shape == (3, RES, RES) and im.dtype == np.uint8
    np.testing.assert_array_equal(prepare_image(_img(1, 32, 32), RES), np.asarray(_img(1, 32, 32)).transpose(2, 0, 1))


@pytest.mark.parametrize("spec, needle", [
    ("hf:{d}/none", r"datasets directory '.*/none' does not exist"),
    ("parquet:{d}/*.parquet", r"parquet:.*\*.parquet matches no files"),
    ("wds:{d}/{{0..1}}.tar", r"webdataset shard '.*/0.tar' does not exist"),
    ("prompts:{d}/none.txt", r"prompt file '.*/none.txt' does not exist"),
    ("prompts:{d}/empty.txt", r"empty.txt: the prompt file is empty; give at least one prompt"),
    ("prompts:{d}/bad.jsonl", r"bad.jsonl:2: not JSON"),
    ("hf:{d}", r"not a dataset saved with save_to_disk"),
])
def test_other_bad_inputs_name_the_path(tmp_path, spec, needle):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{prompt\n')
    with pytest.raises(ConfigError, match=needle) as e:
        validate_source(parse_data_spec(spec.format(d=tmp_path)), RES)
    assert "\n" not in str(e.value)


def test_fingerprint_follows_content_not_location(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    _img(0).save(d / "0.png")
    (d / "0.txt").write_text("a coat")
    spec = parse_data_spec(str(d))
    fp = spec.fingerprint()
    assert spec.fingerprint() == fp and spec.to_dict() == {"kind": "folder", "location": str(d), "options": {}, "fingerprint": fp}
    d.rename(tmp_path / "b")
    assert parse_data_spec(str(tmp_path / "b")).fingerprint() == fp
    (tmp_path / "b" / "0.txt").write_text("a red coat")
    assert parse_data_spec(str(tmp_path / "b")).fingerprint() != fp
    (tmp_path / "p.txt").write_text("a coat\n")
    q = parse_data_spec(f"prompts:{tmp_path / 'p.txt'}")
    fq = q.fingerprint()
    (tmp_path / "p.txt").write_text("a cost\n")
    assert q.fingerprint() != fq


def test_validation_is_cached_by_content(tmp_path, monkeypatch):
    d = _bad_folder(tmp_path, "ok")
    spec = parse_data_spec(str(d))
    opened = _counting(monkeypatch, data_sources, "_decode")
    assert validate_source(spec, RES) == 3 and len(opened) == 3
    assert validate_source(spec, RES) == 3 and len(opened) == 3  # same content: not read again
    data = (d / "1.png").read_bytes()
    (d / "1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="1.png: unreadable image"):
        validate_source(spec, RES)


# --- the latent cache --------------------------------------------------------------------------------------

def _folder(tmp_path, n, captions=CAPTIONS, size=(40, 36)):
    d = tmp_path / f"imgs{n}"
    d.mkdir(parents=True)
    rows = []
    for i in range(n):
        _img(i, *size).save(d / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": captions[i % len(captions)]})
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_encode_writes_shards_reads_them_back_and_hits_the_cache(tmp_path, pipe, monkeypatch):
    d = _folder(tmp_path, 10)
    enc = _counting(monkeypatch, pipe.vae, "encode")
    data = encode_source(str(d), pipe, RES, shard_size=4, batch_size=3, cache_root=tmp_path / "c")
    assert len(data) == 10 and len(enc) == 5  # shards of 4, 4, 2 in batches of 3, 1 / 3, 1 / 2
    n_enc = len(enc)
    assert sorted(p.name for p in data.path.iterdir()) == ["index.json", "shard-00000", "shard-00001", "shard-00002", "uncond"]
    assert data.prompts == CAPTIONS and len(data.embeddings) == 5  # deduplicated, then the empty prompt
    images = np.stack([prepare_image(Image.open(d / f"{i:05d}.png"), RES) for i in range(10)])
    want = encode_images(pipe, images)
    lat, emb = data.batch(torch.tensor([9, 0, 5]))
    assert lat.dtype == emb.dtype == torch.float32 and lat.shape == (3, 4, 16, 16)
    torch.testing.assert_close(lat, want[[9, 0, 5]], rtol=1e-5, atol=1e-5)
    text = torch.from_numpy(encode_text(pipe, [CAPTIONS[1], CAPTIONS[0], CAPTIONS[1], ""])["prompt_embeds"])
    torch.testing.assert_close(emb, text[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.embeddings[data.uncond_row], text[3], rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    _, dropped = data.batch(torch.zeros(64, dtype=torch.long), p_uncond=0.5, g=g)
    n_uncond = int(torch.isclose(dropped, text[3]).flatten(1).all(1).sum())
    assert 16 < n_uncond < 48  # about half
    assert data.source == f"image folder {d}" and data.provenance == parse_data_spec(str(d)).to_dict()
    assert data.labels[0].item() == -1 and data.latents[2:4].shape == (2, 4, 16, 16)

    again = encode_source(str(d), pipe, RES, shard_size=4, batch_size=3, cache_root=tmp_path / "c")
    assert len(enc) == n_enc + 1 and again.path == data.path  # a second encode reads the cache (1: the check above)
    torch.testing.assert_close(again.batch(torch.arange(10))[0], data.batch(torch.arange(10))[0])
    (d / "00003.png").unlink()
    rows = [json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines() if "00003" not in x]
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(encode_source(str(d), pipe, RES, cache_root=tmp_path / "c")) == 9 and len(enc) > n_enc + 1  # new content: encoded anew


def test_an_interrupted_encode_resumes_after_its_last_complete_shard(tmp_path, pipe, monkeypatch):
    d = _folder(tmp_path, 10, captions=[f"caption {i}" for i in range(10)])
    clean = encode_source(str(d), pipe, RES, shard_size=4, batch_size=2, cache_root=tmp_path / "clean")
    enc = []
    orig = pipe.vae.encode

    def failing(*a, **k):
        enc.append(1)
        if len(enc) == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(pipe.vae, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        encode_source(str(d), pipe, RES, shard_size=4, batch_size=2, cache_root=tmp_path / "c")
    root = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert not (root / "index.json").exists() and sorted(p.name for p in root.iterdir()) == ["shard-00000", "shard-00001.tmp"]
    with pytest.raises(Exception, match="not a finished latent cache"):
        LatentData.open(root)
    enc.clear()
    data = encode_source(str(d), pipe, RES, shard_size=4, batch_size=2, cache_root=tmp_path / "c")
    assert len(enc) == 3  # shards 1 and 2 only (2 + 1 batches), shard 0 kept
    assert data.prompts == clean.prompts and len(data.embeddings) == 11
    for a, b in ((data.latents, clean.latents), (data.prompt_index, clean.prompt_index), (data.embeddings, clean.embeddings)):
        torch.testing.assert_close(a[:], b[:])


def test_rows_gather_across_parts_within_a_small_map_budget(tmp_path):
    parts = [np.arange(n * 6, dtype=np.float16).reshape(n, 2, 3) + 100 * k for k, n in enumerate([3, 0, 5, 2])]
    for k, p in enumerate(parts):
        np.save(tmp_path / f"{k}.npy", p)
    rows = Rows([tmp_path / f"{k}.npy" for k in range(4)], [3, 0, 5, 2], map_budget=1)
    whole = np.concatenate(parts)
    idx = np.array([9, 0, 4, 3, 9, -1, 7])
    got = rows[torch.from_numpy(idx)]
    assert got.dtype == torch.float32 and len(rows) == 10 and rows.shape == (10, 2, 3)
    np.testing.assert_array_equal(got.numpy(), whole[idx].astype(np.float32))
    np.testing.assert_array_equal(rows[2:6].numpy(), whole[2:6])
    with pytest.raises(IndexError):
        rows[torch.tensor([10])]


def test_prompt_file_is_sampled_once_with_a_seed_per_sample(tmp_path, pipe, monkeypatch):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a coat", "label": 4}\n{"prompt": "a dress", "label": 3}\n')
    spec = f"prompts:{tmp_path / 'p.jsonl'}?count=3&steps=2&guidance=3"
    assert validate_source(parse_data_spec(spec), RES) == 3 and validate_source(parse_data_spec(spec + "&limit=2"), RES) == 2
    unet = _counting(monkeypatch, pipe.unet)
    data = encode_source(spec, pipe, RES, seed=7, batch_size=2, cache_root=tmp_path / "c")
    assert len(data) == 3 and data.prompts == ["a coat", "a dress"] and data.labels[:].tolist() == [4, 3, 4]
    assert data.prompt_index[:].tolist() == [0, 1, 0] and len(unet) == 6  # 2 batches x 3 U-Net calls (PNDM's 2 steps)
    assert "seed 7" in data.source and data.provenance["options"]["seed"] == "7"
    n = len(unet)
    again = encode_source(spec, pipe, RES, seed=7, batch_size=2, cache_root=tmp_path / "c")
    assert len(unet) == n and again.path == data.path  # cached: nothing sampled
    one = pipe(["a coat"], num_inference_steps=2, guidance_scale=3.0, generator=[torch.Generator().manual_seed(7 + 2)],
               height=RES, width=RES, output_type="latent").images
    torch.testing.assert_close(data.latents[2], one[0].float(), rtol=1e-4, atol=1e-4)
    other = encode_source(spec, pipe, RES, seed=8, batch_size=2, cache_root=tmp_path / "c")
    assert other.path != data.path and len(unet) > n  # another seed is other data


# --- memory ------------------------------------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from hybridsd_nas.data import encode_source
from tests.test_data_sources import build_tiny_pipe

folder, warm, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(1)
pipe = build_tiny_pipe(work / "tok")
encode_source(warm, pipe, 32, batch_size=16, cache_root=work / "warm").batch(torch.arange(8), 0.1)  # one-time set-up


def status():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM, ru_maxrss) to the current RSS
base, _ = status()
data = encode_source(folder, pipe, 32, shard_size=64, batch_size=16, cache_root=work / "cache", map_budget=1 << 20)
g = torch.Generator().manual_seed(0)
for _ in range(40):
    lat, emb = data.batch(torch.randint(0, len(data), (32,), generator=g), 0.1, g)
_, peak = status()
print(json.dumps({"n": len(data), "base": base, "peak": peak, "shards": len(list((data.path).glob("shard-*")))}))
"""


@pytest.mark.slow
def test_memory_stays_bounded_at_8x_the_data(tmp_path):
    """Peak RSS (VmHWM, what ru_maxrss reports, reset after set-up) while encoding a folder and then
    reading random batches: 512 images (8 shards) peak within 10% of 64 images (1 shard), and the rise
    over the RSS before encoding within 10% + 12 MiB (run-to-run noise is about 3 MiB). Each image is
    128x128 on disk with its own caption: holding every example's latents and text embedding in memory
    rises about 20 MiB more at 8x than at 1x (measured); holding the decoded images would add 21 MiB more."""
    warm = _folder(tmp_path / "warm", 16, captions=["warm-up"], size=(128, 128))
    out = {}
    for n in (64, 512):
        d = _folder(tmp_path, n, captions=[f"caption number {i}" for i in range(n)], size=(128, 128))
        p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(d), str(warm), str(tmp_path / f"w{n}")], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "HYBRIDSD_NAS_CACHE": str(tmp_path)})
        assert p.returncode == 0, p.stderr[-3000:]
        out[n] = json.loads(p.stdout.strip().splitlines()[-1])
    one, eight = out[64], out[512]
    assert (one["n"], eight["n"], one["shards"], eight["shards"]) == (64, 512, 1, 8)
    assert eight["peak"] <= 1.10 * one["peak"], out
    rise1, rise8 = one["peak"] - one["base"], eight["peak"] - eight["base"]
    assert rise8 <= 1.10 * rise1 + (12 << 20), out


# --- the CLI ---------------------------------------------------------------------------------------------

def test_distill_with_a_bad_folder_exits_2_with_one_line_before_loading_the_teacher(tmp_path, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(final, "student_of", lambda *a, **k: loaded.append(1) or pytest.fail("the teacher was loaded"))
    d = _bad_folder(tmp_path, "no-caption")
    argv = ["distill", "--teacher", "tiny", "--candidate", "bk-sdm-tiny", "--steps", "1", "--out", str(tmp_path / "out"), "--data"]
    assert main(argv + [str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridsd-nas: error: ") and f"{d}/1.png: no caption" in err[0]
    assert main(argv + ["s3:bucket"]) == 2 and "unknown data source kind 's3'" in capsys.readouterr().err
    small = _bad_folder(tmp_path, "small")
    assert main(argv + [str(small)]) == 2 and "2.png: 40x20 is smaller than the training resolution 32" in capsys.readouterr().err
    assert not loaded

    class Loaded(Exception):
        pass

    def stop(*a, **k):
        raise Loaded

    monkeypatch.setattr(final, "student_of", stop)
    with pytest.raises(Loaded):  # with --resize the same folder passes the checks and the teacher is loaded
        main(argv + [str(small), "--resize"])
