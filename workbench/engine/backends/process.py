"""Process isolation: a model in a child process of its own, driven over a pipe of msgpack frames.

A crash in the child (SIGKILL, a segfault, a CUDA fatal error) ends that process only: the batch it
ran fails with ModelProcessDied, which retries, fallbacks and the breaker handle, and the child is
started again (up to the model's ``restarts``). A child that hangs (a batch it has not ended ``_HUNG_S`` after
every request in it timed out, or one it ended no decoding step of for the model's ``hang_timeout_s``) is killed,
and goes the same way. Token ids, texts and timings cross the pipe, never
tensors and never pickles: each frame is one msgpack map sent with ``Connection.send_bytes``.
The parent keeps the tokenizer, so tokenize and detokenize stay local.

Why a pipe: benchmarks/ipc.py measures it beside ZeroMQ and a shared-memory ring; it is as fast as
either at the batch sizes a hop sends, needs no cleanup in /dev/shm, and a dead child shows at once
as end-of-file on the pipe. A hung one shows by the beats it stops sending while a batch runs
(``BEAT_S``), which an unload reads to cut it off rather than wait for it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import msgpack
except ImportError:  # the "process" extra is not installed: only isolation="process" needs it, and says so
    msgpack = None  # type: ignore[assignment]

from workbench.engine.backends.base import (
    BackendOutOfMemory,
    BatchTiming,
    OnError,
    OnResult,
    RemoteSpan,
    Scheduler,
    TokenSink,
    next_batch_id,
    render_chat,
)
from workbench.engine.backends.codec import TextCodec
from workbench.engine.requests import GenerationRequest, GenerationResult, Messages
from workbench.errors import ModelLoadError, ModelProcessDied, StrategyError
from workbench.models.registry import LoadedModel
from workbench.models.settings import LoadSettings
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr

if TYPE_CHECKING:
    from workbench.engine.batching import BatchingPolicy

CHILD_MODULE = "workbench.engine.backends._child"
# How long a child that was asked to stop (its pipe closed) may take to exit before it is killed.
_STOP_S = 10.0
# How often, meanwhile, it is looked at to see whether it is stopped (a debugger holds it), which no grace will end.
_STOPPED_POLL_S = 0.05
# How often a batch with a timeout looks for rows to stop while it waits for the child.
_CANCEL_POLL_S = 0.02
# How long a child may take to end a batch once every row of it was told to stop (every request timed out). A
# healthy child stops them at its next decoding step; one that has not within this is hung (a deadlock, a driver
# that never returns, a stopped process) and is killed, so that the restart serves the requests queued behind it.
# Generous, because a step of a large model on a CPU, or a long prompt's prefill, can take seconds.
_HUNG_S = 30.0
# How often at least a child running a batch tells the parent it is alive (a frame with no data, sent between
# decoding steps when no token went out for this long): an unload tells a hung child (silent) from a long batch.
BEAT_S = 0.5


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    frame: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return frame


# With hang_timeout_s, how long a starting model process may say nothing before its first word: Python, torch and
# transformers importing, which a cold disk can make slow (beats start once the model begins to load).
START_QUIET_S = 120.0


class _HungLoading(Exception):
    """A loading model process said nothing (not even that it is alive) for hang_timeout_s."""


class _DiedLoading(ModelLoadError):
    """The child ended (killed, crashed) before its model was ready: unlike a load it refused, another try may work."""


class _Unread(Exception):
    """The child died without reading the batch sent to it; ``died`` says so, for when no restart can serve it."""

    def __init__(self, died: ModelProcessDied) -> None:
        super().__init__(died.message)
        self.died = died


def _how_it_ended(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed by {name}" + (" (a segfault)" if name == "SIGSEGV" else "")
    return f"exited with code {code}"


def _child_env() -> dict[str, str]:
    """The child's environment: this one, with this workbench's own package first on its path."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class ModelProcess:
    """One model loaded in a child process, and the pipe to it: start, ask for a batch, restart, close.

    Made by the registry's spawner (``isolation="process"``); the attributes are what the child
    reported once its model had loaded. ``pid`` is None while a restarted child loads.
    """

    def __init__(self, name: str, settings: LoadSettings, tracing: Tracing) -> None:
        if os.name != "posix":
            raise ModelLoadError(
                f"model {name!r}: isolation='process' needs a POSIX system (Linux, macOS): the pipe to the "
                "child is handed over as a file descriptor", hint="load it with isolation='thread'",
            )
        if msgpack is None:
            raise ModelLoadError(
                f"model {name!r}: isolation='process' frames its messages with msgpack, which is not installed",
                hint="pip install 'autoglm-workbench[process]' (or pip install msgpack)",
            )
        self.name = name
        self.settings = settings
        self._tracing = tracing  # a restart is a span of the engine's
        self.restarts = 0
        self.pid: int | None = None
        self._batches = 0  # batches sent; a cancel names its batch, so it never stops a row of the next one
        self._lock = threading.Lock()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None  # batches out, tokens and results back
        self._cancels: Connection | None = None  # rows to stop, out
        self._restart: threading.Thread | None = None
        self._gone: ModelProcessDied | None = None  # dead, with no restart left or coming
        self._in_batch = False  # a batch was sent and its answer is awaited
        self._awaiting_restart = False  # a batch waits for a restart to serve it
        self._heard = 0.0  # when the child last sent anything (perf_counter), for abort
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> None:
        """Start a child, hand it the settings, and wait until it has loaded the model (or says why not)."""
        ours, theirs = socket.socketpair()
        control, their_control = socket.socketpair()  # cancels, heard while the child's main thread generates
        with theirs, their_control:
            fds = (theirs.fileno(), their_control.fileno())
            proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, *map(str, fds)],
                pass_fds=fds, env=_child_env(), stdin=subprocess.DEVNULL,
                # Anything the child prints goes to stderr, so this process's stdout (autoglm run --json) stays ours.
                stdout=sys.__stderr__.fileno() if sys.__stderr__ is not None else subprocess.DEVNULL,
                # Its own session: a Ctrl-C in the terminal interrupts this process, not the model's.
                start_new_session=True,
            )
        conn, cancels = Connection(ours.detach()), Connection(control.detach())
        with self._lock:
            if self._closed:  # closed while a restart began: start nothing more
                conn.close()
                cancels.close()
                _stop(proc)
                return
            self._proc = proc  # close() may end a child that is still loading
        # In the child, the model is local (and this process watches it for hangs).
        settings = dataclasses.replace(self.settings, isolation="thread", hang_timeout_s=None)
        hang_s = self.settings.hang_timeout_s
        try:
            # A beat at least four times within the hang timeout, so only a child that ends no step is taken as hung.
            beat_s = BEAT_S if hang_s is None else min(BEAT_S, hang_s / 4)
            conn.send_bytes(pack({"name": self.name, "settings": dataclasses.asdict(settings), "beat_s": beat_s}))
            quiet_s = None if hang_s is None else max(hang_s, START_QUIET_S)  # it says nothing while Python starts
            while True:  # then it says it is alive every beat while it loads (see _child.main), then ready or failed
                if quiet_s is not None and not conn.poll(quiet_s):
                    raise _HungLoading
                ready = unpack(conn.recv_bytes())
                if ready["op"] != "alive":
                    break
                quiet_s = hang_s
        except (EOFError, OSError, _HungLoading) as exc:
            conn.close()
            cancels.close()
            hung = isinstance(exc, _HungLoading)
            code = _stop(proc, grace=not hung)  # a hung child is not resumed to load on for the grace: it is ended
            raise _DiedLoading(
                f"the process loading model {self.name!r} said nothing for {quiet_s:g} s (hang_timeout_s; "
                f"{START_QUIET_S:g} s while Python starts), so it was ended before the model was ready" if hung else
                f"the process loading model {self.name!r} {_how_it_ended(code)} before the model was ready",
                hint="its messages on stderr say why; load it with isolation='thread' to see the error here",
            ) from None
        if ready["op"] == "failed":
            conn.close()
            cancels.close()
            _stop(proc)
            raise ModelLoadError(ready["message"], hint=ready["hint"])
        with self._lock:
            if self._closed:  # closed while this restart loaded
                conn.close()
                cancels.close()
                _stop(proc)
                return
            self._conn, self._cancels = conn, cancels
            self.pid = ready["pid"]
        self.device: str = ready["device"]
        self.dtype: str = ready["dtype"]
        self.params: int = ready["params"]
        self.memory_bytes: int = ready["memory_bytes"]
        self.warmup_s: float = ready["warmup_s"]
        self.context_window: int | None = ready["context_window"]
        self.eos_ids: set[int] = set(ready["eos_ids"])

    @property
    def running(self) -> bool:
        """Whether the child is alive (serving, or loading as a restart)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        """End the child (its pipe closes, so it exits; killed if it does not) and any restart under way."""
        with self._lock:
            self._closed = True
            conn, cancels, proc, restart = self._conn, self._cancels, self._proc, self._restart
            self._conn = self._cancels = None
            idle = conn is not None and not self._in_batch
        if conn is not None:
            conn.close()
        if cancels is not None:
            cancels.close()
        if proc is not None:
            # An idle child sees its pipe close and exits. One still loading (a restart) is killed, so the restart
            # sees end-of-file and gives up; so is one running a batch, whose pipe stays open while the batch's
            # thread reads it (it would finish the batch, or hang on, for the whole grace): the batch fails now.
            _stop(proc, grace=idle)
        if restart is not None:
            restart.join()

    def abort(self, quiet_s: float | None = None, since: float = 0.0) -> None:
        """Cut off the batch in flight, the model being unloaded: end the child, so the batch fails with
        ModelProcessDied saying the model was unloaded, and no restart comes.

        ``quiet_s``: only once the child has sent nothing for that long, counted from ``since`` (when the unload
        began, a ``time.perf_counter()`` reading) at the earliest. A child running a batch says it is alive at
        least every BEAT_S between steps, so one that is silent is hung (or stopped), while a long batch goes on to
        its end. None: at once. A batch waiting for a restart is cut off at once: the restart is a load that would
        serve it only to be ended.
        """
        with self._lock:
            proc = self._proc
            if not self._awaiting_restart:
                if not self._in_batch or proc is None:
                    return
                if quiet_s is not None and time.perf_counter() - max(self._heard, since) < quiet_s:
                    return
            self._closed = True  # going: the batch's end-of-file is an unload, not a crash to restart from
        if proc is not None:
            proc.kill()  # a restart's new child sees it is closed as it starts, if it was not yet this one

    def _died(self, doing: str, kill: bool = False) -> ModelProcessDied:
        """The child is gone (``kill``: is to go now): reap it, start it again if restarts are left, and say what
        happened."""
        if kill and self._proc is not None:
            self._proc.kill()  # first: a hung child holds its memory (a GPU's) until it is gone, and a new one loads
        with self._lock:
            conn, cancels, proc, pid, closed = self._conn, self._cancels, self._proc, self.pid, self._closed
            self._conn = self._cancels = self.pid = None
            restart = None
            if not closed and self.restarts < self.settings.restarts:
                self.restarts += 1
                restart = self._restart = threading.Thread(
                    target=self._start_again, args=(pid,), name=f"workbench-restart-{self.name}", daemon=True
                )
                restart.start()  # under the lock, so close() never finds a restart it cannot join
        for pipe in (conn, cancels):
            if pipe is not None:
                pipe.close()
        assert proc is not None  # a child that served a batch was started
        message = f"model {self.name!r}: its process (pid {pid}) {_how_it_ended(_stop(proc))} while {doing}"
        if closed:
            return ModelProcessDied(message + "; the model was unloaded", hint=f"bench.load({self.name!r}, ...) again")
        if restart is not None:
            return ModelProcessDied(
                message, hint=f"it is starting again (restart {self.restarts} of {self.settings.restarts}); "
                "to ride this out give the hop a fallback, or retry with on: [error, breaker] and backoff long "
                "enough for a restart (its breaker is open meanwhile)"
            )
        self._gone = ModelProcessDied(
            message + f"; it was restarted {self.restarts} times already, so it stays down",
            hint=f"load it again (bench.unload({self.name!r}) then bench.load), or raise restarts",
        )
        return self._gone

    def _start_again(self, died: int | None) -> None:
        """Start a fresh child in place of ``died``, in a ``restart NAME`` span of the engine's trace."""
        span = self._tracing.start_span(f"restart {self.name}", attributes={
            attr.SPAN_KIND: attr.KIND_CHAIN, attr.MODEL_NAME: self.name, attr.PROCESS_RESTARTS: self.restarts,
            attr.PROCESS_PREVIOUS_PID: died or 0,
        })
        try:
            while True:
                try:
                    self._start()
                except ModelLoadError as exc:
                    with self._lock:
                        # A new child killed while it loaded (the OOM killer again, say) is started again while
                        # restarts are left; a load the child refused would be refused the same way.
                        again = isinstance(exc, _DiedLoading) and not self._closed \
                            and self.restarts < self.settings.restarts
                        if again:
                            self.restarts += 1
                    if again:
                        span.set_attribute(attr.PROCESS_RESTARTS, self.restarts)
                        continue
                    mark_error(span, exc)
                    self._gone = ModelProcessDied(
                        f"model {self.name!r}: its process died and could not be started again: {exc.message}",
                        hint=exc.hint or f"load it again: bench.load({self.name!r}, ...)",
                    )
                else:
                    span.set_attribute(attr.PROCESS_PID, self.pid or 0)
                return
        finally:
            span.end()

    # -- serving ---------------------------------------------------------------------------------

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """Run ``batch`` in the child, streaming its tokens to ``on_token``; ModelProcessDied if the child dies.

        A batch the child never read (it died first: between batches, or with the batch still in its socket) goes
        to the restarted child instead of failing.
        """
        while True:
            conn, cancels = self._serving()
            try:
                sent, frame = self._exchange(conn, cancels, batch, on_token)
                break
            except _Unread as unread:
                if self._gone is not None or self._closed:
                    raise unread.died from None
        received = time.perf_counter()
        if frame["op"] == "error":
            if frame["fatal"]:  # a CUDA fatal error leaves the child's device unusable: it exits, and restarts
                raise self._died(f"it ran a batch of {len(batch)}: {frame['message']}")
            raise (BackendOutOfMemory if frame["oom"] else RuntimeError)(
                f"in model {self.name!r}'s process: {frame['message']}"
            )
        batch_id = next_batch_id()  # numbered here, so batch ids stay unique across the trace
        results = [
            GenerationResult(
                text=text, token_ids=tokens, tokens_in=request.tokens_in, tokens_out=len(tokens),
                finish_reason=finish, queue_ms=queue_ms, prefill_ms=prefill_ms, ttft_ms=ttft_ms, decode_ms=decode_ms,
                e2e_ms=(received - request.submitted) * 1e3, batch_id=batch_id, batch_size=len(batch),
                padding_tokens=padding,
            )
            for request, (text, tokens, finish, queue_ms, prefill_ms, ttft_ms, decode_ms, padding)
            in zip(batch, frame["results"])
        ]
        timing = BatchTiming(**(frame["timing"] | {"batch_id": batch_id}),
                             spans=[RemoteSpan(*span) for span in frame["spans"]])
        child_ms = frame["busy_ms"]
        timing.attributes = {**timing.attributes,  # the child's own (its decode loop, a batch's adapters)
                             attr.PROCESS_PID: self.pid or 0, attr.PROCESS_RESTARTS: self.restarts,
                             attr.IPC_MS: max((received - sent) * 1e3 - child_ms, 0.0)}
        return results, timing

    def _serving(self) -> tuple[Connection, Connection]:
        """The pipes to a live child: waits for a restart under way, and restarts a child that died while idle."""
        while True:
            restart = self._restart
            if restart is not None and restart.is_alive():
                self._awaiting_restart = True
                try:
                    restart.join()  # a batch that arrives while the child restarts waits for it
                finally:
                    self._awaiting_restart = False
            with self._lock:
                conn, cancels, gone, proc = self._conn, self._cancels, self._gone, self._proc
            if conn is None or cancels is None:
                unloaded = ModelProcessDied(f"model {self.name!r} was unloaded", hint=f"bench.load({self.name!r}) again")
                raise unloaded if self._closed else gone or unloaded
            if proc is None or proc.poll() is None:
                return conn, cancels
            # It died between batches (the OOM killer, a kill): restart it and send the batch to the new one,
            # rather than fail a batch it never saw.
            died = self._died("it was idle")
            if self._gone is not None or self._closed:
                raise died

    def _exchange(
        self, conn: Connection, cancels: Connection, batch: list[GenerationRequest], on_token: TokenSink | None
    ) -> tuple[float, dict[str, Any]]:
        """Send ``batch`` and read the child's frames up to its last, which is returned with when the batch went."""
        params = vars(batch[0].params)  # a flat frozen dataclass: its fields as they are, with no deep copy
        # Both processes read one system-wide monotonic clock (perf_counter is CLOCK_MONOTONIC on Linux
        # and mach_absolute_time on macOS), so the child times queue and TTFT from the parent's stamps.
        rows = [[r.input_ids, r.submitted, r.stream and on_token is not None, r.cancellable] for r in batch]
        seq = self._batches = self._batches + 1
        cancellable = any(r.cancellable for r in batch)
        hang_s = self.settings.hang_timeout_s
        told: set[int] = set()
        all_told: float | None = None  # when the last row was told to stop
        sent = self._heard = time.perf_counter()
        self._in_batch = True
        try:
            conn.send_bytes(pack({"op": "generate", "seq": seq, "params": params, "rows": rows}))
            while True:
                # A row whose request timed out here is stopped in the child too, as in-process; only a
                # batch with a timeout on some row wakes up to look (poll returns at once when a frame comes), or
                # one whose model has a hang timeout, to see whether the child has gone quiet for it.
                wait_s = _CANCEL_POLL_S if cancellable else None
                if hang_s is not None:
                    quiet_for = max(self._heard + hang_s - time.perf_counter(), 0.0)
                    wait_s = quiet_for if wait_s is None else min(wait_s, quiet_for)
                if wait_s is not None and not conn.poll(wait_s):
                    if hang_s is not None and time.perf_counter() - self._heard >= hang_s:
                        raise self._died(f"it ran a batch of {len(batch)}, and ended no decoding step of it in "
                                         f"{hang_s:g} s (its hang_timeout_s), so the workbench killed it as hung",
                                         kill=True)
                    if not cancellable:
                        continue
                    stopped = [row for row, r in enumerate(batch) if r.cancelled and row not in told]
                    if stopped:
                        try:
                            cancels.send_bytes(pack({"seq": seq, "rows": stopped}))
                        except OSError:  # it died, maybe running the batch: not a batch it never read
                            raise self._died(f"it ran a batch of {len(batch)}") from None
                        told.update(stopped)
                        if len(told) == len(batch):
                            all_told = time.perf_counter()
                    if all_told is not None and time.perf_counter() - all_told > _HUNG_S:
                        raise self._died(f"it ran a batch of {len(batch)}, which it had not ended {_HUNG_S:g} s after "
                                         "every request in it timed out, so the workbench killed it as hung",
                                         kill=True)
                    continue
                frame = unpack(conn.recv_bytes())
                self._heard = time.perf_counter()
                if frame["op"] == "alive":
                    continue
                if frame["op"] != "token":
                    return sent, frame
                if on_token is not None:
                    on_token(batch[frame["row"]], frame["token"], frame["text"])
        except (BrokenPipeError, ConnectionResetError):
            # Linux resets the socket of a process that exits with data unread in it, so this is a child that died
            # before it read the batch (or, sending, before the batch went): it never began it. A batch it read and
            # died under ends the stream instead (EOFError, below). Elsewhere (macOS) both read as end-of-file.
            raise _Unread(self._died(f"a batch of {len(batch)} waited for it unread")) from None
        except (EOFError, OSError):
            raise self._died(f"it ran a batch of {len(batch)}") from None
        finally:
            self._in_batch = False

def _stop(proc: subprocess.Popen[bytes], grace: bool = True) -> int:
    """Wait for ``proc`` to exit (its pipe is closed, or it died), killing it if it lingers; its exit code.

    A stopped child (SIGSTOP, SIGTSTP) cannot see its pipe close, so it is resumed first and exits as any idle one
    does. One that stays stopped (a debugger holds it: SIGCONT does not resume a traced stop) cannot exit by itself
    at all, so it is killed as soon as that shows, rather than after the whole grace.
    """
    if grace:
        proc.send_signal(signal.SIGCONT)  # a no-op for a running child (it handles no SIGCONT), and for a reaped one
        deadline = time.monotonic() + _STOP_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                return proc.wait(min(left, _STOPPED_POLL_S))
            except subprocess.TimeoutExpired:
                if _stopped(proc.pid):
                    break
    proc.kill()  # SIGKILL ends a stopped process too; wait() then reaps it, so no stopped zombie is left
    return proc.wait()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T) or held by a tracer (state t), as /proc says; False without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it has just been reaped
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")  # after the name, which may hold spaces and parentheses


class ProcessBackend:
    """The :class:`Backend` of a model loaded with ``isolation="process"``: tokenizes here, generates in the child."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.process: ModelProcess = loaded.model
        self.model = loaded.name
        self.source = loaded.source
        self.device = self.process.device
        self.dtype = self.process.dtype
        self.context_window = loaded.context_window
        self.codec = TextCodec(loaded.tokenizer, self.process.eos_ids)

    @property
    def pid(self) -> int | None:
        """The child's process id; None while it starts again, or once it has died and before a request notices."""
        return self.process.pid if self.process.running else None

    @property
    def restarts(self) -> int:
        return self.process.restarts

    def tokenize(self, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        return self.codec.tokenize(prompts, special_tokens)

    def chat_prompt(self, messages: Messages, hop: str | None = None) -> str:
        return render_chat(self.codec.tokenizer, messages, self.model, hop)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.codec.detokenize(tokens)

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        return self.process.generate(batch, on_token)

    def abort(self, quiet_s: float | None = None, since: float = 0.0) -> None:
        """Cut off the batch in flight (an unload): see :meth:`ModelProcess.abort`."""
        self.process.abort(quiet_s, since)

    def check(self, policy: BatchingPolicy) -> None:
        if policy.continuous:
            raise StrategyError(
                f"model {self.model!r} runs in a child process (isolation='process'), where continuous batching "
                "is not available yet",
                hint="use dynamic batching (wb.DynamicBatching) for it, or load it with isolation='thread'",
            )

    def scheduler(self, policy: BatchingPolicy, on_result: OnResult, on_error: OnError) -> Scheduler:
        raise StrategyError(f"model {self.model!r}: no continuous batching in a child process")  # check refuses first

    def release_memory(self) -> None:
        pass  # the child gives back its cache itself when a batch runs out of memory

    def memory_bytes(self) -> int:
        return self.process.memory_bytes

    def close(self) -> None:
        self.process.close()
