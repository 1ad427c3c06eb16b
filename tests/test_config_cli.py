import json
import subprocess
import sys

import pytest
import torch

from hybridsd_nas.arch import describe
from hybridsd_nas.sources import load_pretrained_unet, load_unet_config
from hybridsd_nas.cli import main
from hybridsd_nas.core.errors import ConfigError, UnknownNameError

from .conftest import TINY_SD1


@pytest.fixture(scope="module")
def unet_dirs(tiny_sd1_dirs, tiny_sd1_teacher):
    return tiny_sd1_dirs, tiny_sd1_teacher


def test_config_from_every_kind_of_spec(unet_dirs):
    root, _ = unet_dirs
    ref = describe(TINY_SD1)
    for spec in (TINY_SD1, root / "unet_only", root / "unet_only" / "config.json", root / "pipe", str(root / "pipe")):
        a = describe(spec)
        assert a.params == ref.params and a.block_names == ref.block_names


def test_weights_load_from_directories(unet_dirs):
    root, m = unet_dirs
    for d in (root / "unet_only", root / "pipe"):
        loaded = load_pretrained_unet(d)
        assert torch.equal(loaded.state_dict()["conv_in.weight"], m.state_dict()["conv_in.weight"])


def test_bad_configs_name_the_problem(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_unet_config(tmp_path / "broken.json")
    (tmp_path / "vae.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ConfigError, match="only UNet2DConditionModel"):
        load_unet_config(tmp_path / "vae.json")
    with pytest.raises(ConfigError, match="same length"):
        load_unet_config({**TINY_SD1, "block_out_channels": [32, 64]})
    with pytest.raises(ConfigError, match="supported: CrossAttnUpBlock2D, UpBlock2D"):
        load_unet_config({**TINY_SD1, "up_block_types": ["UpBlock2D", "X", "Y", "Z"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no U-Net config"):
        load_unet_config(tmp_path / "empty")
    with pytest.raises(UnknownNameError, match="known: .*bk-sdm-base"):
        load_unet_config("sd-v9")


def test_hub_id_is_real_code_and_fails_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot fetch a U-Net config for hub id 'nota-ai/bk-sdm-base'"):
        load_unet_config("nota-ai/bk-sdm-base")


@pytest.mark.slow
def test_cli_cost_json_and_table(capsys):
    assert main(["cost", "--teacher", "sd-v1", "--candidate", "bk-sdm-small", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params"] == 482_346_884 and isinstance(r["macs"], int) and isinstance(r["macs_conv_linear"], int)
    assert main(["table", "--resolution", "256"]) == 0
    out = capsys.readouterr().out
    assert "bk-sdm-tiny" in out and "256x256 px" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["cost", "--teacher", "sd-v9"], "unknown U-Net"),
        (["cost", "--candidate", "bk-sdm-huge"], "unknown candidate"),
        (["cost", "--candidate", "/no/such/file.json"], "does not exist"),
        (["cost", "--resolution", "500"], "multiple of the VAE scale factor 8"),
        (["cost", "--latency", "measure", "--device", "cuda:3"], "not available"),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"drop_layers": ["up1.0", "up1.1", "up1.2"]}))
    p = subprocess.run([sys.executable, "-m", "hybridsd_nas", "cost", "--candidate", str(tmp_path / "c.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "hybridsd-nas: error: up1: an up block needs at least one layer (all 3 are dropped)"
