"""Evaluation sets: the fixed prompts (with optional class labels) that samples are scored on, for any teacher.

An evaluation set is a prompt file the user names (``--eval-prompts FILE``, ``eval_prompts:`` in a
study), or the one a teacher directory ships beside its components: ``evaluation.json`` naming its
prompt file, an adherence classifier and a real-image reference, or a bare ``eval_prompts.json``.
Prompt files:

- ``.txt``: one prompt per line (blank lines and lines starting with ``#`` skipped);
- ``.jsonl``: one object per line with ``prompt`` and an optional ``label`` (or ``class_index``);
- ``.json``: a list of such objects.

The reference every sampled score compares against is the teacher's own samples on the same prompts
and seeds; an adherence classifier and real reference images are optional extras.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.data.sources import read_prompt_file
from hybridsd_nas.sources import Teacher

EVAL_FILE = "evaluation.json"


@dataclass(frozen=True)
class EvalSet:
    """Fixed evaluation prompts, their labels (None where unlabelled), and the optional extras."""

    prompts: tuple[str, ...]
    labels: tuple[int | None, ...]
    source: str
    fingerprint: str
    classifier: str | None = None  # directory of an adherence classifier (hybridsd_nas.metrics.load_classifier)
    real_reference: str | None = None  # "fashion-mnist:test" or a folder of real images

    def __post_init__(self):
        if not self.prompts:
            raise ConfigError(f"{self.source}: no prompts; an evaluation set needs at least one")
        if len(self.labels) != len(self.prompts):
            raise ValueError("one label (or None) per prompt")

    @property
    def labelled(self) -> bool:
        return all(lab is not None for lab in self.labels)

    def rows(self, n: int | None = None) -> list[dict[str, Any]]:
        """``n`` rows (the prompts cycled; each once when ``n`` is None): prompt, label, sample index."""
        k = len(self.prompts) if n is None else n
        return [{"prompt": self.prompts[i % len(self.prompts)], "label": self.labels[i % len(self.prompts)], "sample": i}
                for i in range(k)]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "fingerprint": self.fingerprint, "prompts": len(self.prompts),
                "labelled": self.labelled, "classifier": self.classifier, "real_reference": self.real_reference}


def load_eval_set(path: str | Path, classifier: str | Path | None = None, real_reference: str | None = None) -> EvalSet:
    """The evaluation set of a prompt file (``.txt``, ``.jsonl`` or ``.json``); ``classifier``: an
    adherence classifier directory (its labels are the prompt labels)."""
    p = Path(path)
    rows = [(prompt, None if lab < 0 else lab) for prompt, lab in read_prompt_file(p)]
    if classifier is not None:
        if not Path(classifier).is_dir():
            raise ConfigError(f"adherence classifier {str(classifier)!r} is not a directory")
        if any(lab is None for _, lab in rows):
            first = next(i for i, (_, lab) in enumerate(rows, 1) if lab is None)
            raise ConfigError(f"{p}: entry {first} has no label; adherence with a classifier needs a label on every prompt")
    digest = hashlib.sha1(p.read_bytes()).hexdigest()[:16]
    return EvalSet(tuple(r for r, _ in rows), tuple(lab for _, lab in rows), str(p), digest,
                   str(classifier) if classifier is not None else None, real_reference)


def teacher_assets(teacher: Teacher) -> dict[str, Any]:
    """The teacher directory's ``evaluation.json`` (prompts, classifier, real_reference, data), or {}."""
    d = teacher.local_dir
    if d is None or not (d / EVAL_FILE).is_file():
        return {}
    try:
        spec = json.loads((d / EVAL_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{d / EVAL_FILE}: not JSON ({e.msg})") from None
    if not isinstance(spec, dict) or "prompts" not in spec:
        raise ConfigError(f"{d / EVAL_FILE}: needs \"prompts\" (a prompt file beside it)")
    return spec


def teacher_default_data(teacher: Teacher) -> str | None:
    """The training data a teacher directory names as its own (``data`` in ``evaluation.json``), or None."""
    return teacher_assets(teacher).get("data")


def teacher_eval_set(teacher: Teacher) -> EvalSet | None:
    """The evaluation set a teacher directory ships (``evaluation.json``, else ``eval_prompts.json`` with
    ``eval_classifier/`` when present), or None where it ships none."""
    d = teacher.local_dir
    if d is None:
        return None
    spec = teacher_assets(teacher)
    if spec:
        clf = spec.get("classifier")
        return load_eval_set(d / spec["prompts"], classifier=d / clf if clf else None, real_reference=spec.get("real_reference"))
    if (d / "eval_prompts.json").is_file():
        clf = d / "eval_classifier"
        return load_eval_set(d / "eval_prompts.json", classifier=clf if clf.is_dir() else None)
    return None


def resolve_eval_set(teacher: Teacher, path: str | Path | None = None, classifier: str | Path | None = None) -> EvalSet:
    """The evaluation set a run uses: the file the user named, else the teacher's own; a one-line
    ConfigError when there is neither."""
    if path is not None:
        return load_eval_set(path, classifier=classifier)
    own = teacher_eval_set(teacher)
    if own is None:
        raise ConfigError(f"teacher {teacher.spec!r} ships no evaluation prompts; name a prompt file "
                          "(--eval-prompts FILE on the CLI, eval_prompts: in a study; .txt, .jsonl or .json)")
    return own
