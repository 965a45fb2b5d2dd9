"""What a new user meets before any model runs: imports from a source tree, declared floors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import rotalabs_steer

PACKAGE = Path(rotalabs_steer.__file__).resolve().parent


def test_source_tree_without_the_core_says_what_to_do(tmp_path):
    """Running from a repository root shadows the installed package: one clear ImportError."""
    shutil.copytree(PACKAGE, tmp_path / "rotalabs_steer", ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    # -S: no site-packages, so nothing but the copied tree can provide the package.
    result = subprocess.run([sys.executable, "-S", "-c", "import rotalabs_steer"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: rotalabs_steer was imported from")
    assert "without a compiled C core" in last and "make build" in last and "outside the source tree" in last
    assert "circular import" not in result.stderr.split("The above exception")[-1]


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    assert rotalabs_steer.__version__ == version("rotalabs-steer")


def test_sdist_carries_what_the_test_suite_needs(tmp_path):
    """An sdist's tests collect: conftest.py, the helper modules and the C sources are inside."""
    import tarfile

    root = PACKAGE.parent
    if not (root / "setup.py").is_file():
        import pytest

        pytest.skip("not run from a source tree")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    helpers = {p.name for p in (root / "tests").glob("*.py") if not p.name.startswith("test_")}
    assert {f"tests/{name}" for name in helpers} <= names
    assert {"LICENSE", "csrc/core.h", "rotalabs_steer/datasets/data/refusal.jsonl"} <= names
    assert not any(name.endswith(".so") for name in names)
