"""Shared fixtures: the real tiny model (built once per test session) and fresh workbenches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import workbench as wb


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built through the same code users run, into the session's cache."""
    cache = os.environ.get("AUTOGLM_CACHE_DIR") or str(tmp_path_factory.mktemp("autoglm-cache"))
    return wb.tiny_model(cache_dir=cache)


@pytest.fixture
def bench() -> Iterator[wb.Workbench]:
    """An empty workbench, closed after the test (workers stopped, models freed)."""
    with wb.Workbench() as b:
        yield b


@pytest.fixture
def loaded(bench: wb.Workbench, tiny_path: Path) -> wb.Workbench:
    """A workbench with the tiny model loaded as 'tiny' on the CPU."""
    bench.load("tiny", tiny_path, device="cpu")
    return bench
