"""Loading spaces from ``search_spaces/*.yaml``, validated; errors name the file, key and choices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownNameError
from .base import SearchSpace
from .kinds import SPACE_KINDS

_TOP_KEYS = ("name", "version", "kind", "description", "options")


def spaces_dir() -> Path:
    """``$HYBRIDSD_NAS_SPACES``, else the repository's ``search_spaces/``, else ``./search_spaces``."""
    env = os.environ.get("HYBRIDSD_NAS_SPACES")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "search_spaces"
    return repo if repo.is_dir() else Path.cwd() / "search_spaces"


def list_spaces() -> list[str]:
    d = spaces_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def space_from_dict(data: Any, source: str) -> SearchSpace:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a space must be a YAML mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(_TOP_KEYS)}")
    for key in ("name", "version", "kind"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}")
    if data["kind"] not in SPACE_KINDS:
        raise ConfigError(f"{source}: kind {data['kind']!r} is unknown; allowed: {', '.join(SPACE_KINDS)}")
    if not isinstance(data["version"], int) or data["version"] < 1:
        raise ConfigError(f"{source}: version must be a positive integer, got {data['version']!r}")
    if not isinstance(data["name"], str) or not data["name"]:
        raise ConfigError(f"{source}: name must be a non-empty string")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: options must be a mapping, got {type(options).__name__}")
    return SPACE_KINDS[data["kind"]](data["name"], data["version"], data.get("description", ""), options, source)


def load_space(spec: str | Path) -> SearchSpace:
    """A space by name (``search_spaces/NAME.yaml``) or by path to a YAML file."""
    p = Path(spec)
    if not p.suffix:
        p = spaces_dir() / f"{spec}.yaml"
        if not p.is_file():
            raise UnknownNameError("search space", str(spec), list_spaces())
    if not p.is_file():
        raise ConfigError(f"space file {str(spec)!r} does not exist")
    return space_from_dict(read_yaml(p), str(p))


def read_yaml(p: Path) -> Any:
    """The content of YAML file ``p`` (safe loader); malformed YAML is a one-line ConfigError with the line."""
    import yaml

    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: malformed YAML{where} ({getattr(e, 'problem', None) or e})") from None
