"""Shared by several test modules: waiting on other threads, the two-hop chain the comparison tests run, Ray."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 60  # a generous bound on waits for another thread; no test expects to come near it


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds, polling; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


QA_SPEC = {
    "name": "qa",
    "hops": [
        {"name": "plan", "model": "tiny", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 4},
        {"name": "answer", "model": "tiny", "prompt": "{{ plan }}\nAnswer:", "max_new_tokens": 4},
    ],
    "output": "answer",
}
# Questions of different lengths, so padded batches pad.
QUESTIONS = [{"question": f"What is {i} + {i}?" + " Explain it step by step." * (i % 3)} for i in range(4)]


# CI sets this: there a Ray that is not installed is a failure, where a laptop without the extra skips.
REQUIRE_RAY = "AUTOGLM_REQUIRE_RAY"


def need_ray() -> Any:
    """The ray module, or a skip (a failure where AUTOGLM_REQUIRE_RAY is set) when the ray extra is not installed."""
    try:
        import ray
    except ImportError:
        reason = "ray is not installed: pip install 'autoglm-workbench[ray]'"
        if os.environ.get(REQUIRE_RAY):
            pytest.fail(f"{reason} ({REQUIRE_RAY} is set)")
        pytest.skip(reason)
    return ray


def ray_runtime_env() -> dict[str, Any]:
    """What Ray's workers need to import this checkout's workbench: it on their PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
