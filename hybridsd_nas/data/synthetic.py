"""A small synthetic image-text folder (the imagefolder convention) for tests, benchmarks and smoke runs
of a workflow on a machine without data: each image is a coloured square on a dark ground, its colour
named by the caption's second word (``a red square``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240)}


def shapes_folder(out: str | Path, n: int, captions: Sequence[str], size: int = 32, unique_captions: bool = False,
                  seed: int = 0) -> Path:
    """Write ``n`` images of ``size`` px with captions cycling through ``captions`` (each caption's second
    word one of ``COLOURS``) and their ``metadata.jsonl``; ``unique_captions`` numbers every caption."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    side = max(2, size * 3 // 8)
    rows = []
    for i in range(n):
        cap = captions[i % len(captions)]
        img = np.full((size, size, 3), rng.integers(0, 40), np.uint8)
        x, y = rng.integers(size // 8, size - side - size // 8 + 1, 2)
        img[y : y + side, x : x + side] = COLOURS[cap.split()[1]]
        Image.fromarray(img).save(out / f"{i:05d}.png")
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": f"{cap}, number {i}" if unique_captions else cap}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out
