"""Teachers named by hub id: resolved from the local Hugging Face cache, offline."""

import shutil

import pytest
from huggingface_hub import constants as hub_constants

from hybridsd_nas.core.errors import ConfigError
from hybridsd_nas.sources import load_pipeline, resolve_teacher
from hybridsd_nas.zoo import model_path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache with offline mode on; ``add(repo_id)`` puts the embedded pipeline in it."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(model_path("tiny"), repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return add


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(hub_cache):
    snap = hub_cache("someone/tiny-sd")
    t = resolve_teacher("someone/tiny-sd")
    assert t.spec == "someone/tiny-sd" and t.path == str(snap) and t.local_dir == snap
    assert t.fingerprint.startswith(str(snap) + "@") and t.has_eval_prompts
    assert load_pipeline(t).unet.config.sample_size == 16


def test_a_hub_id_missing_from_the_cache_is_a_one_line_error(hub_cache):
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache") as e:
        resolve_teacher("someone/not-there")
    assert "\n" not in str(e.value) and "someone/not-there" in str(e.value)
