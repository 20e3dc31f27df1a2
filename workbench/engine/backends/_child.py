"""The model process of ``isolation="process"``: loads one model with the registry's code, serves batches on a pipe.

Run as ``python -m workbench.engine.backends._child FD CONTROL_FD`` by
:class:`~workbench.engine.backends.process.ModelProcess`, with its ends of two socket pairs. The
first frame names the model, its LoadSettings and how often to say it is alive; the answer is ``ready``
(what loaded, and where) or ``failed``. Then each ``generate`` frame is one batch, answered by ``token``
frames for streaming rows, ``alive`` frames between steps when nothing went out for a while, and one
``done`` (or ``error``) frame; a ``cancel`` frame on the control pipe stops rows of a batch (their requests
timed out in the parent).
End-of-file on the pipe (the parent closed it, or died) ends the process.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from opentelemetry.trace import INVALID_SPAN

from workbench.engine.backends.base import BackendOutOfMemory, BatchTiming, RowCancels
from workbench.engine.backends.process import pack, unpack
from workbench.engine.backends.transformers import TransformersBackend
from workbench.engine.requests import GenerationParams, GenerationRequest
from workbench.errors import WorkbenchError, describe
from workbench.models.registry import ModelRegistry
from workbench.models.settings import LoadSettings
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr
from workbench.tracing.clock import now_ns

_ALIVE = pack({"op": "alive"})


def _is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` left the device unusable for this process: a CUDA error other than out-of-memory.

    After a device-side assert or an illegal memory access every later CUDA call fails too, so
    the process ends and the parent starts a fresh one.
    """
    return "CUDA error" in str(exc) or type(exc).__name__ == "AcceleratorError"


# GenerationParams of the batches served so far, by their fields: a chain's hops send the same few again and again,
# and building one checks every field again (the parent checked them already).
_PARAMS: dict[tuple[Any, ...], GenerationParams] = {}


def _params(fields: dict[str, Any]) -> GenerationParams:
    key = tuple(fields.items())
    params = _PARAMS.get(key)
    if params is None:
        if len(_PARAMS) >= 256:
            _PARAMS.clear()
        params = _PARAMS[key] = GenerationParams(**fields)
    return params


def _batch(backend: TransformersBackend, frame: dict[str, Any]) -> list[GenerationRequest]:
    params = _params(frame["params"])
    return [
        GenerationRequest(backend.model, ids, params, INVALID_SPAN, submitted=submitted, cancellable=cancellable,
                          on_token=(lambda *_: None) if stream else None)  # marks the row as streaming
        for ids, submitted, stream, cancellable in frame["rows"]
    ]


def _serve(conn: Connection, backend: TransformersBackend, batch: list[GenerationRequest], beat_s: float) -> None:
    started = time.perf_counter()
    wall = now_ns()  # spans are stamped in epoch time; this maps the batch's perf_counter reads onto it
    rows = {request.id: row for row, request in enumerate(batch)}
    said = started  # when the parent last heard from this batch

    def on_token(request: GenerationRequest, token: int, text: str) -> None:
        nonlocal said
        conn.send_bytes(pack({"op": "token", "row": rows[request.id], "token": token, "text": text}))
        said = time.perf_counter()

    def on_beat() -> None:
        # A step went by: a batch that streams nothing says it is alive now and then, so the parent can tell a long
        # batch from a hung process (an unload waits for the one, and cuts the other off).
        nonlocal said
        now = time.perf_counter()
        if now - said >= beat_s:
            conn.send_bytes(_ALIVE)
            said = now

    try:
        results, timing = backend.generate(batch, on_token if any(r.stream for r in batch) else None, on_beat)
    except Exception as exc:
        oom = isinstance(exc, BackendOutOfMemory)
        if oom:
            backend.release_memory()
        fatal = not oom and _is_fatal(exc)
        conn.send_bytes(pack({"op": "error", "oom": oom, "fatal": fatal, "message": describe(exc)}))
        if fatal:
            os._exit(70)  # nothing this process holds can be trusted now; the parent restarts it
        return
    conn.send_bytes(pack({
        "op": "done",
        "results": [[r.text, r.token_ids, r.finish_reason, r.queue_ms, r.prefill_ms, r.ttft_ms, r.decode_ms,
                     r.padding_tokens] for r in results],
        # Field by field, not dataclasses.asdict: that deep-copies, ~35 µs here on caches a batch left cold.
        "timing": {"size": timing.size, "padded_len": timing.padded_len, "padding_tokens": timing.padding_tokens,
                   "started": timing.started, "prefill_ms": timing.prefill_ms, "decode_ms": timing.decode_ms,
                   "detokenize_ms": timing.detokenize_ms, "steps": timing.steps, "attributes": timing.attributes},
        "busy_ms": (time.perf_counter() - started) * 1e3,
        "spans": _spans(backend, timing, started, wall),
    }))


def _spans(backend: TransformersBackend, timing: BatchTiming, started: float, wall: int) -> list[list[Any]]:
    """The batch's prefill and decode as spans (name, start and end in epoch ns, attributes) for the parent's trace."""

    def at(stamp: float) -> int:
        return wall + round((stamp - started) * 1e9)

    first = timing.started + timing.prefill_ms / 1e3
    ended = first + timing.decode_ms / 1e3
    where = {attr.SPAN_KIND: attr.KIND_LLM, attr.PROCESS_PID: os.getpid(), attr.BATCH_SIZE: timing.size}
    return [
        [f"prefill {backend.model}", at(timing.started), at(first), where],
        [f"decode {backend.model}", at(first), at(ended), {**where, attr.BATCH_STEPS: timing.steps}],
    ]


def main() -> None:
    faulthandler.enable()  # a segfault prints where it happened, on the stderr shared with the parent
    # Batches come and go on one pipe, read by this thread with no hand-off; cancels on another, heard
    # by a thread of their own while a batch runs.
    conn, control = Connection(int(sys.argv[1])), Connection(int(sys.argv[2]))
    try:
        hello = unpack(conn.recv_bytes())
    except EOFError:  # the parent closed the pipe before it said hello: closed, or unloaded, while this one started
        return
    # While it loads, a thread says it is alive every beat: a parent watching for hangs tells a long load (a large
    # model from a slow disk) from a process that stopped (SIGSTOP, a swap storm), which says nothing.
    loading, said = threading.Event(), threading.Lock()

    def beat() -> None:
        while not loading.wait(hello["beat_s"]):
            with said:
                if loading.is_set():
                    return
                try:
                    conn.send_bytes(_ALIVE)
                except OSError:  # the parent gave up on this process (or went): it ends it
                    return

    threading.Thread(target=beat, name="workbench-child-loading", daemon=True).start()
    try:
        try:
            loaded = ModelRegistry(Tracing()).load(hello["name"], LoadSettings(**hello["settings"]))
        finally:
            with said:  # no beat after this: the next frame is the answer
                loading.set()
    except WorkbenchError as exc:
        conn.send_bytes(pack({"op": "failed", "message": exc.message, "hint": exc.hint}))
        return
    backend = TransformersBackend(loaded)
    conn.send_bytes(pack({
        "op": "ready", "pid": os.getpid(), "device": backend.device, "dtype": backend.dtype, "params": loaded.params,
        "memory_bytes": loaded.memory_bytes, "warmup_s": loaded.warmup_s, "context_window": loaded.context_window,
        "eos_ids": sorted(backend.eos_ids),
    }))
    cancels = RowCancels()
    threading.Thread(target=_listen, args=(control, cancels), name="workbench-child-cancels", daemon=True).start()
    # Batches run on a thread of their own, as in-process ones run on the engine's worker thread, not on the main
    # thread. glibc's malloc gives each thread an arena of its own; the main thread's is the one every import and
    # the load filled, and a decoding step's tensors allocated there ran slower: on the tiny model ~20-45 µs a step
    # (of ~850) against the same backend on a thread in the same process; one arena for all (MALLOC_ARENA_MAX=1)
    # made the two equal. That was most of what isolation added to a hop beyond the pipe.
    batches = threading.Thread(target=_serve_batches, args=(conn, backend, cancels, hello["beat_s"]),
                               name="workbench-child-batches")
    batches.start()
    batches.join()


def _serve_batches(conn: Connection, backend: TransformersBackend, cancels: RowCancels, beat_s: float) -> None:
    """Read each batch off the pipe and run it, until the parent closes the pipe (or dies)."""
    try:
        while True:
            try:
                frame = unpack(conn.recv_bytes())
            except EOFError:  # the parent closed the pipe (the model was unloaded) or died
                return
            batch = _batch(backend, frame)
            cancels.running(frame["seq"], batch)
            _serve(conn, backend, batch, beat_s)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent died (killed, crashed) while this process answered it: no one is left to tell


def _listen(control: Connection, cancels: RowCancels) -> None:
    while True:
        try:
            frame = unpack(control.recv_bytes())
        except EOFError:
            return
        cancels.cancel(frame["seq"], frame["rows"])


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent died (killed, crashed) while this process answered it: no one is left to tell
