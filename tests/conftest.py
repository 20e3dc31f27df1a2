"""Shared fixtures: the real tiny model (built once per test session) and fresh workbenches."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Server, machine_turn, serve_command, start_server

import workbench as wb

DATA_DIR = "AUTOGLM_DATA_DIR"
_run_data_dir = pytest.StashKey["str | None"]()


def pytest_configure(config: pytest.Config) -> None:
    """Point the workbench's data directory (where sessions persist) away from the real home.

    Set for the whole run, before anything starts, so subprocesses (the CLI tests) and notebook
    kernels under nbval inherit it; the fixtures below narrow it to a module and a test.
    """
    config.stash[_run_data_dir] = os.environ.get(DATA_DIR)
    os.environ[DATA_DIR] = tempfile.mkdtemp(prefix="autoglm-data-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ[DATA_DIR], ignore_errors=True)
    previous = config.stash.get(_run_data_dir, None)
    if previous is None:
        del os.environ[DATA_DIR]
    else:
        os.environ[DATA_DIR] = previous


@pytest.fixture(scope="module", autouse=True)
def _module_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory per test module, so module-wide workbenches share no sessions across modules."""
    path = tmp_path_factory.mktemp("autoglm-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_DIR, str(path))
        yield path


@pytest.fixture(autouse=True)
def _machine_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test holds a shared turn on the machine; one marked machine_alone (it starts a Ray of its own) waits for
    the tests beside it to end and runs alone (see helpers.machine_turn)."""
    with machine_turn(alone=request.node.get_closest_marker("machine_alone") is not None):
        yield


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data directory of a test's workbenches (their session store lives here); empty until used."""
    path = tmp_path / "autoglm-data"
    monkeypatch.setenv(DATA_DIR, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built through the same code users run, into the session's cache."""
    cache = os.environ.get("AUTOGLM_CACHE_DIR") or str(tmp_path_factory.mktemp("autoglm-cache"))
    return wb.tiny_model(cache_dir=cache)


@pytest.fixture(scope="session")
def server(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `transformers serve` on 127.0.0.1 serving the tiny model's directory, started once per test session."""
    command = serve_command()
    if command is None:
        pytest.skip("`transformers serve` needs transformers[serving] (fastapi, uvicorn): pip install -e '.[dev]'")
    try:
        served = start_server(command, tiny_path, tmp_path_factory.mktemp("serve") / "serve.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield served
    served.stop()


@pytest.fixture
def bench() -> Iterator[wb.Workbench]:
    """An empty workbench, closed after the test (workers stopped, models freed)."""
    with wb.Workbench() as b:
        yield b


@pytest.fixture(scope="module")
def tiny_bench(tiny_path: Path) -> Iterator[wb.Workbench]:
    """One workbench per test module with 'tiny' on the CPU (no batching), for tests that do not change it."""
    with wb.Workbench() as b:
        b.load("tiny", tiny_path, device="cpu")
        yield b


@pytest.fixture
def loaded(bench: wb.Workbench, tiny_path: Path) -> wb.Workbench:
    """A workbench with the tiny model loaded as 'tiny' on the CPU."""
    bench.load("tiny", tiny_path, device="cpu")
    return bench


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C (``_thread.interrupt_main``) raises KeyboardInterrupt in the main thread, as in a terminal or a kernel.

    However this process was started: a shell's background job starts with SIGINT ignored, and
    then Python leaves it ignored and ``interrupt_main`` does nothing at all.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
