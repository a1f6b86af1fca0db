"""The layers of design §3: no import cycle (imports inside functions included), and the
import-linter layers contract of pyproject.toml kept."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _scanner():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "import_cycles.py")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cycle_scan_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import f\n")
    mod = _scanner()
    cycle = mod.find_cycle(mod.edges(mod.module_names(pkg)))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}
    (pkg / "sub" / "b.py").write_text("import os\n")
    assert mod.find_cycle(mod.edges(mod.module_names(pkg))) is None


def test_layers_contract():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter not installed (pip install import-linter)")
    proc = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
