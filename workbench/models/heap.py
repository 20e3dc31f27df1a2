"""Keeping the garbage collector's full passes off the request path.

torch, transformers and a loaded model leave a few hundred thousand long-lived objects in the
collector's oldest generation. A full (generation 2) pass walks all of them: on the development
machine it takes 0.2-0.5 s, and it runs in whichever thread happens to allocate, so it lands in
the middle of a chain run as a pause no span explains. After each load the workbench therefore
moves every object alive into the collector's permanent generation (``gc.freeze``), which full
passes skip; unloading thaws, collects (so a freed model really goes) and freezes again.
Reference counting frees objects as usual throughout; only cycle detection skips frozen ones.

``AUTOGLM_GC_FREEZE=0`` turns this off, for a study of the collector's own effect.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()  # a freeze between another thread's thaw and collect would hide the model it frees


def enabled() -> bool:
    return os.environ.get("AUTOGLM_GC_FREEZE", "1") != "0"


def settle() -> None:
    """After a load: put every object alive now out of full collections' reach."""
    if enabled():
        with _lock:
            gc.freeze()


_deferred = 0  # open deferred() blocks: while any is open, collect() only notes that one is owed
_owed = False


@contextmanager
def deferred() -> Iterator[None]:
    """Unload many models with one collection at the end, not one each (a full pass takes ~0.2 s here, so a
    workbench closing 16 models spent 3 s collecting)."""
    global _deferred, _owed
    with _lock:
        _deferred += 1
    try:
        yield
    finally:
        with _lock:
            _deferred -= 1
            due = _owed and _deferred == 0
            if due:
                _owed = False
        if due:
            collect()


def collect() -> None:
    """After an unload: collect everything unreachable, frozen objects included, then freeze again."""
    global _owed
    with _lock:
        if _deferred:
            _owed = True
            return
        thawed = gc.get_freeze_count() > 0
        if thawed:
            gc.unfreeze()
        gc.collect()
        if thawed and enabled():
            gc.freeze()


def thaw() -> None:
    """Hand every frozen object back to the collector (when a workbench closes)."""
    with _lock:
        gc.unfreeze()
