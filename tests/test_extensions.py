"""The front-end modules' own tests (extensions/tests), run with Node's built-in test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSIONS = Path(__file__).resolve().parents[1] / "extensions"


def test_front_end_modules_pass_their_node_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed; the front-end tests run with `node --test extensions/tests/`")
    result = subprocess.run(
        [node, "--test", "tests/"], cwd=EXTENSIONS, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
