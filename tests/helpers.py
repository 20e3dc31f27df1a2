"""Shared by several test modules: waiting on other threads, the two-hop chain the comparison tests run, and a real
`transformers serve`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

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


SERVE_START_S = 180  # transformers serve imports torch and fastapi, then loads the model: ~20 s here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_command() -> list[str] | None:
    """How to start `transformers serve`, or None where transformers' serving extra is not installed."""
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        return None
    script = Path(sys.executable).parent / "transformers"
    found = str(script) if script.exists() else shutil.which("transformers")
    return [found, "serve"] if found else None


@contextlib.contextmanager
def transformers_serve(model: Path, log_dir: Path) -> Iterator[str]:
    """A real `transformers serve` on 127.0.0.1 serving the model directory ``model``; its OpenAI base URL.

    Skips the test where transformers' serving extra is not installed; its log goes to ``log_dir``.
    """
    command = _serve_command()
    if command is None:
        pytest.skip("`transformers serve` needs transformers[serving] (fastapi, uvicorn): pip install -e '.[dev]'")
    port = free_port()
    log = (log_dir / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(model)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"transformers serve did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
