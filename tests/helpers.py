"""Shared by several test modules: waiting on other threads, and the two-hop chain the comparison tests run."""

from __future__ import annotations

import time
from collections.abc import Callable

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
