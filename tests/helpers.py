"""Shared by several test modules: waiting on other threads, the two-hop chain the comparison tests run, reading
server-sent events, a real `transformers serve` on the tiny model, and Ray."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

WAIT_S = 60  # a generous bound on waits for another thread; no test expects to come near it


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds, polling; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Concurrency:
    """How many calls of a function run at once now, and the most that ever did."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


SLOW_ECHO = Concurrency()


def slow_echo(question: str) -> str:
    """A Python hop that takes 50 ms and counts how many of it run at once (``SLOW_ECHO``)."""
    with SLOW_ECHO:
        time.sleep(0.05)
    return question


GATE = threading.Event()


def gated_echo(question: str) -> str:
    """A Python hop that waits until ``GATE`` is set (at most WAIT_S), then echoes."""
    GATE.wait(WAIT_S)
    return question


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


def sse(lines: Iterator[str]) -> list[tuple[str, Any]]:
    """Server-sent events as (event, data) pairs."""
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
            kind = None
    return events


SERVE_START_S = 180  # transformers serve imports torch and fastapi, then loads the model: ~20 s here


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command() -> list[str] | None:
    """How to start `transformers serve`, or None where transformers' serving extra is not installed."""
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        return None
    script = Path(sys.executable).parent / "transformers"
    found = str(script) if script.exists() else shutil.which("transformers")
    return [found, "serve"] if found else None


@dataclass
class Server:
    """A running `transformers serve`: its OpenAI base URL, and its process to pause (a stalled server) and resume."""

    url: str
    process: subprocess.Popen[bytes]
    log: IO[str]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the server's process (SIGSTOP): it takes connections and answers nothing until the block ends."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def start_server(command: list[str], model: Path, log: Path) -> Server:
    """Start `transformers serve` on 127.0.0.1 serving ``model`` (a directory) and wait until it answers /health."""
    port = free_port()
    out = log.open("w")
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(model)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    server = Server(f"http://127.0.0.1:{port}/v1", process, out)
    deadline = time.monotonic() + SERVE_START_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"transformers serve did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@contextmanager
def transformers_serve(model: Path, log_dir: Path) -> Iterator[str]:
    """A real `transformers serve` on 127.0.0.1 serving the model directory ``model``, for one test module; its URL.

    Skips the test where transformers' serving extra is not installed; its log goes to ``log_dir``.
    """
    command = serve_command()
    if command is None:
        pytest.skip("`transformers serve` needs transformers[serving] (fastapi, uvicorn): pip install -e '.[dev]'")
    try:
        server = start_server(command, model, log_dir / "serve.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


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


@contextmanager
def ray_turn() -> Iterator[None]:
    """This machine's one turn at running Ray for a test module: a module that starts Ray holds it throughout.

    Under ``pytest -n 2`` the two Ray modules (a local Ray; a head and two worker raylets) could start together on
    the two cores, and Ray's head gave up on its own raylet after its fixed 30 s ("The current node timed out during
    startup"; CI run 35, on fef7aa5). A file lock, so test runs side by side on one machine take turns too.
    """
    with open(Path(tempfile.gettempdir()) / "autoglm-tests-ray.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def machine_turn(alone: bool) -> Iterator[None]:
    """A turn on this machine: every test holds a shared one (conftest.py); what must not compete for the CPU while
    it starts (Ray: its raylet gives its own agent a fixed 15 s, see ray_started) waits for the tests running beside
    it to end and keeps others from starting until it is done. A file lock, so test runs side by side take turns too.

    Whoever waits for the machine alone is let in next: each turn passes a gate first (a second lock), and one that
    waits to be alone keeps the gate shut until it is in. Without the gate a Linux flock lets shared turns in as long as
    one is held, and a worker taking its tests' turns back to back could keep the other waiting for all of them.
    """
    folder = Path(tempfile.gettempdir())
    with open(folder / "autoglm-tests-machine.lock", "a") as lock, \
            open(folder / "autoglm-tests-machine.gate", "a") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ray_started(ray: Any, start: Callable[[], Any]) -> Any:
    """``start()`` (a ray.init, a test Cluster), once more if Ray's own start timed out, as the workbench's own local
    start does (LOCAL_START_ATTEMPTS in workbench/engine/backends/ray.py): on a busy machine Ray's raylet may abort
    before its dashboard agent, slow to import, writes its port. What the failed start left running is stopped first.
    """
    with machine_turn(alone=True):
        try:
            return start()
        except Exception as exc:
            if "timed out during startup" not in str(exc):
                raise
        import psutil

        ray.shutdown()
        left = []
        for process in psutil.Process().children(recursive=True):
            try:
                if "ray" in " ".join(process.cmdline()):
                    left.append(process)
            except psutil.Error:  # gone, or a zombie (a raylet that aborted): nothing to stop
                continue
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=30)
        return start()


def ray_runtime_env() -> dict[str, Any]:
    """What Ray's workers need to import this checkout's workbench: it on their PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[1])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
