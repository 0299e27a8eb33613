"""The layer contract (docs/architecture.md, `[tool.importlinter]` in pyproject.toml), checked with
import-linter: a package imports only packages below it, so there is no cycle between packages, and
no core package imports Ray. A second run on a copy of the package with one upward import and one
Ray import in the core shows that both contracts can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(LINT.parent), "HOME": str(cwd)}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken" in r.stdout, r.stdout


def test_an_upward_import_or_ray_in_the_core_breaks_the_contract(tmp_path):
    pkg = tmp_path / "src" / "petl_platform"
    shutil.copytree(ROOT / "platform" / "petl_platform", pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    runs = pkg / "tracking" / "runs.py"
    runs.write_text(runs.read_text() + "\n\ndef _upward():\n    from ..serving import catalog  # noqa: F401\n")
    engine = pkg / "inference" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _ray():\n    import ray  # noqa: F401\n")
    r = lint(tmp_path, pythonpath=tmp_path / "src")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Contracts: 0 kept, 2 broken" in r.stdout, r.stdout
    assert "petl_platform.tracking.runs -> petl_platform.serving.catalog" in r.stdout
    assert "petl_platform.inference.engine -> ray" in r.stdout
