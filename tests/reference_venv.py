"""The reference package (rotalabs-steer 1.2.0) in its own interpreter, for both-ways checks.

Its import name is ``rotalabs_steer`` too, so it only ever runs in a subprocess whose working
directory is outside this source tree. ``ROTALABS_REFERENCE_PYTHON`` names the interpreter;
otherwise ``bench/.venvs/reference`` (made by ``make bench-peers``). Tests that need it skip
cleanly when neither exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def reference_python() -> Path | None:
    named = os.environ.get("ROTALABS_REFERENCE_PYTHON")
    candidate = Path(named) if named else REPO / "bench" / ".venvs" / "reference" / "bin" / "python"
    return candidate if candidate.exists() else None


def run_reference(script: str, timeout: float = 300) -> object:
    """Run ``script`` under the reference interpreter; it must print one JSON value last."""
    python = reference_python()
    if python is None:
        pytest.skip("the reference venv is absent (make bench-peers, or set ROTALABS_REFERENCE_PYTHON)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([str(python), "-c", script], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"the reference script failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
