"""Where a study lives: Optuna RDB storage (a SQLite file or a server), opened with heartbeats and
retries of dead workers' trials; loading a stored study by name; creating or joining one."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.core.paths import results_root

from .config import StudyConfig, sqlite_url
from .samplers import make_sampler

# heartbeats, retries and metric names are marked experimental by Optuna; they are what we rely on
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# settings that do not change what a trial means (budgets, storage, where outputs go, logging)
_NOT_IDENTITY = {"trials", "timeout", "max_failures", "storage", "results", "artifacts", "wandb", "heartbeat_interval",
                 "heartbeat_grace", "max_retry", "source", "description", "enqueue"}


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and summaries)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def default_db(name: str) -> Path:
    """The SQLite file of a study named ``name`` that sets no storage: ``results_root()/NAME/study.db``."""
    return results_root() / name / "study.db"


def default_storage_url(name: str) -> str:
    """The storage URL of a study named ``name`` that sets no storage."""
    return sqlite_url(default_db(name))


def open_storage(cfg: StudyConfig, url: str | None = None) -> optuna.storages.RDBStorage:
    """RDB storage (SQLite file or a server URL) with heartbeats and retry of dead workers' trials."""
    url = cfg.storage_url(url)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.heartbeat_grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )
    except Exception as e:  # bad URL, server down, missing driver
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot open the study storage {redact_url(url)!r} ({type(e).__name__}: {msg}); "
                          "give sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB") from None


def stored_study_url(name: str, storage: str | None) -> str:
    """``storage``, or the default SQLite file of study ``name`` when it exists (else a one-line error)."""
    if storage:
        return storage
    db = default_db(name)
    if not db.is_file():
        raise ConfigError(f"no study {name!r} at {db} (the default storage of a study named {name!r}); "
                          "give --storage URL (sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB)")
    return sqlite_url(db)


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    """A stored study by name, with errors that list the studies the storage holds."""
    url = stored_study_url(name, storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as e:
        raise ConfigError(f"cannot open the study storage {redact_url(url)!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if name not in names:
        raise ConfigError(f"unknown study {name!r} in {redact_url(url)}; known: {', '.join(sorted(names)) or '(none)'}")
    return optuna.load_study(study_name=name, storage=url)


def load_or_create_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Join study ``cfg.name`` in ``storage``, or create it; refused if it exists with settings that
    change what a trial means."""
    directions = [o.direction for o in cfg.objectives]
    study = optuna.create_study(study_name=cfg.name, storage=storage, directions=directions,
                                sampler=make_sampler(cfg), load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"{cfg.source}: objectives: study {cfg.name!r} in this storage has directions "
                          f"{[d.name.lower() for d in study.directions]}, not {directions}; give the study another name")
    old = study.user_attrs.get("config")
    if old is not None:
        mine = study_identity(cfg.to_dict())
        theirs = study_identity(old)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"{cfg.source}: study {cfg.name!r} already exists with other settings ({', '.join(diff)}); "
                              "give the study another name or another storage")
    else:
        study.set_user_attr("config", json.loads(json.dumps(cfg.to_dict(), default=str)))
        study.set_metric_names([o.metric for o in cfg.objectives])
    return study


def study_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The settings of a config dict that change what a trial means (not budgets, storage or logging)."""
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _NOT_IDENTITY}, default=str))
