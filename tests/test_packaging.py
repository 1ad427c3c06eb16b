"""An installed wheel (not the source tree) carries what it needs: the search spaces and the embedded
teacher are package data, found from any directory."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_finds_its_spaces_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(next(wheels.glob("*.whl")))],
                   check=True, capture_output=True)
    # the dependencies come from this environment, after the fresh venv's own site-packages (which hold
    # the installed copy of hybridsd_nas); a .pth path does not run this environment's editable finder
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([str(py), "-m", "hybridsd_nas", "space", "list", "--json"], cwd=elsewhere, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout)
    assert {r["name"] for r in rows} == {f.stem for f in (ROOT / "search_spaces").glob("*.yaml")}
    assert all(Path(r["file"]).is_relative_to(site) for r in rows)  # read from the installed package, not the checkout
    p = subprocess.run([str(py), "-m", "hybridsd_nas", "zoo", "path", "tiny"], cwd=elsewhere, capture_output=True, text=True)
    assert p.returncode == 0 and Path(p.stdout.strip()).is_relative_to(site) and (Path(p.stdout.strip()) / "model_index.json").is_file()
