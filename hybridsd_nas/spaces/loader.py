"""Loading spaces from ``search_spaces/*.yaml``, validated; errors name the file, key and choices."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from hybridsd_nas.core.errors import ConfigError, UnknownNameError
from hybridsd_nas.core.registry import Registry
from hybridsd_nas.spaces.base import SearchSpace
from hybridsd_nas.spaces.kinds import SPACE_KINDS

_TOP_KEYS = ("name", "version", "kind", "description", "options")


def spaces_dir() -> Path:
    """``$HYBRIDSD_NAS_SPACES``, else the spaces shipped with the package (the repository's
    ``search_spaces/``, installed as the package data ``hybridsd_nas.search_spaces``)."""
    env = os.environ.get("HYBRIDSD_NAS_SPACES")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "search_spaces"
    if repo.is_dir():  # a source checkout, installed in editable mode or not
        return repo
    spec = importlib.util.find_spec("hybridsd_nas.search_spaces")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the shipped search spaces are missing (no search_spaces/ beside the package and no "
                          "hybridsd_nas.search_spaces package data); set HYBRIDSD_NAS_SPACES to a folder of space YAMLs")
    return Path(list(spec.submodule_search_locations)[0])


# space name -> its YAML file: the shipped ones, plus any a user registers (register_space)
SPACES: Registry[Path] = Registry("search space")


def register_space(path: str | Path, name: str | None = None) -> str:
    """Make a space YAML loadable by name (``load_space(name)``, a study's ``space:``); returns the name."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"space file {str(p)!r} does not exist")
    name = name or p.stem
    SPACES.register(name, p, replace=True)
    return name


def _shipped() -> dict[str, Path]:
    d = spaces_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def list_spaces() -> list[str]:
    return sorted(set(_shipped()) | set(SPACES.names()))


def space_file(name: str) -> Path:
    """The YAML file of a space name (a registered one first, then the shipped ones)."""
    if name in SPACES:
        return SPACES.get(name)
    shipped = _shipped()
    if name not in shipped:
        raise UnknownNameError("search space", name, list_spaces())
    return shipped[name]


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
        raise ConfigError(f"{source}: kind {data['kind']!r} is unknown; allowed: {', '.join(SPACE_KINDS.names())}")
    if not isinstance(data["version"], int) or data["version"] < 1:
        raise ConfigError(f"{source}: version must be a positive integer, got {data['version']!r}")
    if not isinstance(data["name"], str) or not data["name"]:
        raise ConfigError(f"{source}: name must be a non-empty string")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: options must be a mapping, got {type(options).__name__}")
    return SPACE_KINDS.get(data["kind"])(data["name"], data["version"], data.get("description", ""), options, source)


def load_space(spec: str | Path) -> SearchSpace:
    """A space by name (``search_spaces/NAME.yaml``) or by path to a YAML file."""
    p = Path(spec)
    if not p.suffix:
        p = space_file(str(spec))
    if not p.is_file():
        raise ConfigError(f"space file {str(spec)!r} does not exist")
    return space_from_dict(read_yaml(p), str(p))


def read_yaml(p: Path) -> Any:
    """The content of YAML file ``p`` (safe loader); malformed YAML is a one-line ConfigError with the line."""

    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: malformed YAML{where} ({getattr(e, 'problem', None) or e})") from None
