import json

import pytest

from hybridsd_nas.cli import main
from hybridsd_nas.proxy import ProxySettings, run_proxy

pytestmark = pytest.mark.slow

TINY = ProxySettings(distill_steps=2, batch_size=4, samples=8, sampler_steps=2, reference_images=16, kid_subset=4, data_images=64)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSD_NAS_CACHE", str(tmp_path / "cache"))


def test_proxy_scores_a_candidate_on_the_embedded_teacher():
    r = run_proxy("tiny", "bk-sdm-small", TINY)
    assert r["status"] == "ok", r.get("reason")
    for k in ("proxy_fid", "fid_real", "kid", "adherence", "distill_seconds", "eval_seconds"):
        assert isinstance(r[k], float), k
    assert r["proxy_fid"] >= 0 and 0 <= r["adherence"] <= 1 and r["samples"] == 8
    assert r["zero_cost"]["output_mse"] > 0  # BK-SDM-Small differs from the teacher before training
    again = run_proxy("tiny", "identity", TINY)
    assert again["zero_cost"]["output_mse"] == 0.0  # the no-op candidate is the teacher


def test_proxy_cli_json(capsys):
    argv = ["proxy", "--teacher", "tiny", "--candidate", "bk-sdm-base", "--distill-steps", "1", "--samples", "4",
            "--sampler-steps", "2", "--batch-size", "2", "--reference-images", "8", "--data-images", "32",
            "--kid-subset", "4", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["status"] == "ok" and {"proxy_fid", "fid_real", "kid", "adherence", "distill_seconds", "eval_seconds"} <= set(r)
