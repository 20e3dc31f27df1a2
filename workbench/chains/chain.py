"""A chain bound to its host: run it once, map it over many inputs, or stream it; blocking or awaited."""

from __future__ import annotations

import asyncio
import html
import os
import queue
import threading
import logging
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from workbench.chains.batch import Errors, MapInterrupted, MapState, RunBatch, inputs_key, reuse, run_all
from workbench.chains.checkpoint import Checkpoint
from workbench.chains.events import Event, RunFinished
from workbench.chains.host import ChainHost
from workbench.chains.live import (
    DEFAULT_INTERVAL_S,
    ConfigRefusal,
    ConfigVersion,
    FileWatcher,
    LiveSpec,
    read_text,
    refuse,
)
from workbench.chains.run import Run, RunInterrupted
from workbench.chains.runner import INTERRUPTED_RUNS, Interrupted, RunKeeper, check_inputs, check_session, lending
from workbench.chains.spec import ChainSpec, HopSpec
from workbench.errors import InvalidInput, WorkbenchError, WorkloadError, plain

log = logging.getLogger(__name__)


class Chain:
    """A validated chain spec plus the host (a Workbench) that runs it.

    Every way to run it has a blocking and an awaited form with the same behaviour:
    ``run``/``arun``, ``map``/``amap``, ``stream``/``astream``.

    Its spec may change while it serves (:meth:`set`, :meth:`update`, :meth:`watch`): each run
    uses the version that served when it started, and records it (``run.config_version``).
    ``parse`` validates a changed spec as the host does (against the models it knows); ``context()`` says what
    it validates against (the models' names), so that a watched file refused for a model not loaded serves once
    the model is.
    """

    def __init__(
        self, spec: ChainSpec, host: ChainHost, parse: Callable[[str | Mapping[str, Any]], ChainSpec] | None = None,
        context: Callable[[], object] | None = None,
    ) -> None:
        self._live = LiveSpec(spec, parse)
        self._context = context
        self._watcher: FileWatcher | None = None
        self._stop_when_collected: weakref.finalize | None = None
        self._host = host
        self.last_batch: RunBatch | None = None  # the latest map's runs, filled in as they finish

    @property
    def spec(self) -> ChainSpec:
        """The spec serving now: what a run that starts now uses (an edit makes a new one; runs keep theirs)."""
        return self._live.current

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bench(self) -> ChainHost:
        """The workbench this chain runs on."""
        return self._host

    @property
    def hops(self) -> list[str]:
        return [h.name for h in self.spec.hops]

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.spec.inputs

    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each hop and the hops whose outputs it reads."""
        return self.spec.deps()

    # -- one run -------------------------------------------------------------------------------

    def run(self, session: str | None = None, **inputs: Any) -> Run:
        """Run the chain once; raises HopFailed (holding the partial run) if a hop fails."""
        self._host.check_open(f"run chain {self.name!r}")
        keeper = RunKeeper()  # where the runner leaves the partial run if a Ctrl-C stops it
        token = INTERRUPTED_RUNS.set(keeper)  # copied into the run's task on the workbench's loop
        try:
            run = self._host.run_sync(self._host.arun_spec(self.spec, inputs, session))
        except (Interrupted, KeyboardInterrupt):  # Interrupted: a hop raised it; the run's trace says so
            keeper.ended.wait(_INTERRUPTED_WAIT_S)  # the cancel reaches the run's task on the loop: let it end there
            if keeper.runs:
                raise RunInterrupted(keeper.runs[0]) from None
            raise KeyboardInterrupt from None
        finally:
            INTERRUPTED_RUNS.reset(token)
        if run.error is not None:
            raise run.error
        return run

    async def arun(self, session: str | None = None, **inputs: Any) -> Run:
        """``await chain.arun(...)``: :meth:`run` for a notebook cell's top-level await or any asyncio program."""
        self._host.check_open(f"run chain {self.name!r}")
        try:
            run = await self._host.arun_spec(self.spec, inputs, session)
        except Interrupted:
            raise KeyboardInterrupt from None
        if run.error is not None:
            raise run.error
        return run

    # -- many runs -----------------------------------------------------------------------------

    def map(
        self,
        inputs: Iterable[Mapping[str, Any]],
        concurrency: int = 8,
        session: str | None = None,
        *,
        errors: Errors = "keep",
        resume: Iterable[Run | None] | None = None,
        prefetch: bool = False,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> RunBatch:
        """Run once per input mapping, ``concurrency`` at a time; the RunBatch lists Runs in input order.

        ``errors="keep"``: a failing run does not stop the others; its Run has ``error`` set and
        keeps the outputs of the hops that finished. ``errors="raise"``: the first failure
        stops the inputs not yet started and raises its HopFailed.

        Each run is kept as it finishes, in ``chain.last_batch``: a Ctrl-C raises MapInterrupted
        (a KeyboardInterrupt) whose ``.batch`` is that batch, with ``None`` for inputs not run
        (runs in flight still land in it). ``resume=`` a previous batch (or any Runs, e.g.
        ``bench.runs()``) reuses the successful runs of equal inputs made under the configuration serving now
        (``chain.version``) and runs only the others (an input JSON cannot hold, such as an array, always runs).

        ``prefetch=True`` gets the next inputs' first hops ready while earlier runs go (their prompts
        rendered and tokenized, the prefix KV of ``cache: prefix`` hops warmed), so each starts the
        moment a lane frees. Not with a ``session`` (the history the prompts read is not known ahead).

        ``checkpoint="runs.jsonl"`` writes each successful run to that file as it finishes (one JSON line), and
        reuses the file's runs as ``resume=`` does: the same map again after the process died (a kernel restarted,
        out of memory) runs only the inputs it had not finished. Reused runs have no trace (see checkpoint.py).
        """
        concurrency = plain(concurrency)  # an np.int64 from a sweep counts
        batch, kept = self._batch(inputs, errors, resume, concurrency, session, checkpoint)
        state = MapState(batch, batch.missing)
        try:
            return self._host.run_sync(self._map(batch, concurrency, session, errors, state, prefetch, kept),
                                       on_interrupt=state.stop)
        except (KeyboardInterrupt, Interrupted):
            batch.interrupted = True
            raise MapInterrupted(batch) from None

    async def amap(
        self,
        inputs: Iterable[Mapping[str, Any]],
        concurrency: int = 8,
        session: str | None = None,
        *,
        errors: Errors = "keep",
        resume: Iterable[Run | None] | None = None,
        prefetch: bool = False,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> RunBatch:
        """``await chain.amap(...)``: :meth:`map` awaited; cancelling it cancels the runs in flight and keeps what
        finished, in ``chain.last_batch``."""
        concurrency = plain(concurrency)  # an np.int64 from a sweep counts
        batch, kept = self._batch(inputs, errors, resume, concurrency, session, checkpoint)
        try:
            return await self._host.run_async(self._map(batch, concurrency, session, errors, None, prefetch, kept))
        except Interrupted:
            raise MapInterrupted(batch) from None
        except asyncio.CancelledError:
            batch.interrupted = True  # at once: the map's own task on the workbench's loop hears the cancel later
            raise

    def _batch(
        self,
        inputs: Iterable[Mapping[str, Any]],
        errors: Errors,
        resume: Iterable[Run | None] | None,
        concurrency: int,
        session: str | None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> tuple[RunBatch, Callable[[Run], None] | None]:
        """Check a map's arguments and inputs before any run starts; its batch, with resumed runs filled in, and
        what keeps each run that lands in it (a checkpoint file's writer; None without one)."""
        if errors not in ("keep", "raise"):
            raise WorkloadError(f"errors={errors!r} is not a choice", hint="errors='keep' (default) or 'raise'")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise WorkloadError(f"concurrency must be a whole number >= 1, not {concurrency!r:.80}",
                                hint="the number of runs in flight at once, e.g. concurrency=8")
        self._host.check_open(f"run chain {self.name!r}")
        check_session(session)
        items = []
        for position, item in enumerate(inputs):  # refuse bad input before any run starts
            if not isinstance(item, Mapping):
                example = ", ".join(f"{name!r}: ..." for name in self.inputs) or "..."
                raise InvalidInput(
                    f"chain.map takes one mapping of inputs per run; item {position} is {type(item).__name__} "
                    f"{item!r:.80}",
                    hint=f"e.g. chain.map([{{{example}}}, ...])",
                )
            items.append(dict(item))
            check_inputs(self.spec, items[-1])
        batch = RunBatch(self.name, items)
        if resume is not None:
            reuse(batch, resume, self.version, partial(self._same_models, where="given to resume="))
        file = None
        if checkpoint is not None:
            file = Checkpoint(checkpoint, self.name)
            held = file.runs()
            reuse(batch, held, self.version,
                  partial(self._same_models, where=f"of the checkpoint file {str(file.path)!r}"))
            file.prepare()
            written = {run.id for run in held}
            for run in batch.finished:  # runs resume= gave, which the file does not hold yet: a crash now keeps them
                if run.id not in written:
                    file.keep(run)
        self.last_batch = batch
        return batch, None if file is None else file.keep

    def _same_models(self, runs: list[Run], where: str) -> list[Run]:
        """Those of ``runs`` answered by the models that would answer them now (their identity and adapters'
        versions; loaded here to tell, as the map's first run would), or not known to have been answered otherwise;
        the others run again, with a warning: a map resumed after a model changed reused its other version's
        answers, without a word."""
        digest = getattr(self._host, "models_digest", None)
        if digest is None or not any(run._models for run in runs):
            return runs
        try:
            now = digest(self.spec, load=True)
        except WorkbenchError as exc:  # a model that cannot load now: its runs say why; none is reused unchecked
            now = None
            log.warning("cannot tell which models answered the runs %s: %s", where, exc)
        kept = [run for run in runs if run._models in (None, now)]
        answered = {inputs_key(run.inputs) for run in kept}
        stale = [run for run in runs if run._models not in (None, now)
                 and inputs_key(run.inputs) not in answered]  # those the models of now have not answered since
        if stale:
            warnings.warn(
                f"{len(stale):,} runs {where} were answered by another version of the models of chain "
                f"{self.name!r} (another source, weights, device, dtype or adapter version): they run again",
                RuntimeWarning, stacklevel=5)
        return kept

    async def _map(
        self, batch: RunBatch, concurrency: int, session: str | None, errors: Errors, state: MapState | None,
        prefetch: bool = False, kept: Callable[[Run], None] | None = None,
    ) -> RunBatch:
        prepare = getattr(self._host, "aprepare_spec", None)
        ahead = _Ahead(batch, concurrency, lambda item: prepare(self.spec, item)) \
            if prefetch and session is None and prepare is not None else None

        async def execute(item: dict[str, Any]) -> Run:
            if ahead is not None:
                ahead.started()
            return await self._host.arun_spec(self.spec, item, session)  # the host notes what answered it

        try:
            return await run_all(batch, execute, concurrency, errors, state, kept)
        finally:
            if ahead is not None:
                ahead.close()

    # -- streaming -----------------------------------------------------------------------------

    def stream(self, session: str | None = None, **inputs: Any) -> Iterator[Event]:
        """Run once, yielding what happens as it happens: HopStarted, Token (LLM hops), HopFinished, RunFinished.

        The last event is RunFinished with the Run (a failed hop leaves ``run.error`` set; nothing is
        raised). Leaving the loop early, or a Ctrl-C, cancels the run; a Ctrl-C raises :class:`RunInterrupted`
        holding what the run had done, as :meth:`run` does.
        """
        return self._stream(session, inputs, None)

    def _stream(self, session: str | None, inputs: dict[str, Any], stop: threading.Event | None) -> Iterator[Event]:
        """:meth:`stream`; ``stop`` set (from another thread: a widget's stop button) cancels the run and ends the
        stream within _POLL_S, between events as well as at one, where leaving the loop is heard only at the next."""
        self._host.check_open(f"run chain {self.name!r}")
        self._host.check_blocking()  # on the host's loop the events would never come
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        keeper = RunKeeper()  # where the runner leaves the partial run if a Ctrl-C stops it
        token = INTERRUPTED_RUNS.set(keeper)  # copied into the run's task as it starts, and reset at once: a
        try:  # generator's frame shares its caller's context
            with lending() as lent:  # in a Python hop: its thread runs the run's hop work while it waits for events
                put: Callable[[Event], None] = events.put if lent is None else \
                    lambda event: lent.offer(partial(events.put, event))  # wakes the thread as the work does, in order
                future = self._host.start(self._host.arun_spec(self.spec, inputs, session, put))
        finally:
            INTERRUPTED_RUNS.reset(token)

        def next_event() -> Event:
            """The run's next event; queue.Empty when none came for _POLL_S (a Ctrl-C is heard between waits)."""
            if lent is None:
                return events.get(timeout=_POLL_S)
            while events.empty():
                if not lent.run_next(_POLL_S):
                    raise queue.Empty
            return events.get_nowait()

        try:
            while True:
                try:
                    event = next_event()
                except queue.Empty:
                    if stop is not None and stop.is_set():
                        return
                    if future.done():
                        if future.cancelled():  # the host's loop stopped under the run: close() cut it short
                            self._host.check_open("finish what it was running")
                        _raise_failure(future.exception())
                    continue
                if stop is not None and stop.is_set():
                    return
                yield event
                if isinstance(event, RunFinished):
                    return
        except KeyboardInterrupt:
            future.cancel()
            keeper.ended.wait(_INTERRUPTED_WAIT_S)  # the cancel reaches the run's task on the loop: let it end there
            if keeper.runs:
                raise RunInterrupted(keeper.runs[0]) from None
            raise
        finally:
            future.cancel()

    async def astream(self, session: str | None = None, **inputs: Any) -> AsyncIterator[Event]:
        """``async for event in chain.astream(...)``: :meth:`stream` for asyncio programs and notebook cells."""
        self._host.check_open(f"run chain {self.name!r}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def put(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's loop closed (it left the stream): its run is being cancelled
                pass

        with lending(loop):  # asyncio.run(...) in a Python hop: its loop runs the run's hop work
            future = asyncio.wrap_future(self._host.start(self._host.arun_spec(self.spec, inputs, session, put)))
        getter: asyncio.Future[Event] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the run ended without its last event: it failed outside every hop
                    getter.cancel()
                    if future.cancelled():  # the host's loop stopped under the run: close() cut it short
                        self._host.check_open("finish what it was running")
                    _raise_failure(future.exception())
                event = getter.result()
                yield event
                if isinstance(event, RunFinished):
                    return
        finally:
            future.cancel()
            if getter is not None:  # the consumer left (a client gone): else "Task was destroyed but it is pending"
                getter.cancel()

    # -- live configuration --------------------------------------------------------------------

    @property
    def version(self) -> ConfigVersion:
        """The serving configuration's version: ``number`` counts accepted versions from 1, ``digest`` hashes it."""
        return self._live.version

    @property
    def config_errors(self) -> list[ConfigRefusal]:
        """Edits that were refused (a watched file that did not validate, a bad :meth:`set`), oldest first."""
        return list(self._live.refusals)

    @property
    def overrides(self) -> dict[str, Any]:
        """Fields set live with :meth:`set`, by path; they stay over later edits of the spec until :meth:`unset`."""
        return self._live.overrides

    def set(self, path: str | Mapping[str, Any], value: Any = None) -> ConfigVersion:
        """Change one field live, for runs that start from now on: ``chain.set("answer.temperature", 0.7)``;
        or several at once, in one version: ``chain.set({"answer.temperature": 0.7, "plan.max_new_tokens": 8})``.

        ``path`` is ``HOP.FIELD`` (``answer.prompt``, ``plan.max_new_tokens``, ``answer.retry.attempts``)
        or a chain field (``history``, ``output``, ``description``). The whole spec is validated again
        with the new value; a value the spec does not allow raises SpecError and nothing changes.
        Code (a Python hop's ``call``), names and ``uses`` are not set live. Returns the new version.
        """
        return self._live.set(path if isinstance(path, Mapping) else {path: value})

    def unset(self, *paths: str) -> ConfigVersion:
        """Drop values set with :meth:`set`: the fields take the spec's own values again."""
        return self._live.unset(paths)

    def update(self, spec: str | Mapping[str, Any]) -> ConfigVersion:
        """Replace the spec (YAML text or a dict) for runs that start from now on; SpecError refuses it whole.

        The chain keeps its name; values set with :meth:`set` stay on top.
        """
        return self._live.update(spec)

    def watch(self, path: str | os.PathLike[str], interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Follow the spec file at ``path``: each edit that validates becomes the next version, within about
        ``interval_s``; one that does not is refused (logged, warned about, kept in :attr:`config_errors`)
        while the last good version keeps serving. Replaces an earlier watch; stops on ``bench.close()``, or once
        nothing holds the chain any more. A file that cannot be read now raises SpecError.
        """
        self._host.check_open(f"watch {str(path)!r}")
        read_text(path, "chain spec file")  # a typo in the path watched nothing, without a word, for good
        origin = str(path)
        # The watcher's thread holds the spec, never the chain: a chain nobody holds is collected, and stops it.
        live, context = self._live, self._context

        def unreadable(error: WorkbenchError) -> None:
            live.refusals.append(refuse(origin, error, live.version, f"chain {live.current.name!r}"))

        def checked_against() -> object:
            """What a refused content is retried on: the models and modules it may name, and the values set live
            (an edit refused beside chain.set's value serves once chain.unset drops it)."""
            return context() if context is not None else None, live.overrides

        # The first poll reads the file again: an edit made since the chain was built is not missed, and
        # the same content again makes no new version.
        watcher = FileWatcher(path, lambda text: live.update(text, origin), interval_s,
                              on_unreadable=unreadable, retry_when=checked_against, what="chain spec file")
        self.unwatch()
        self._watcher = watcher.start()
        self._stop_when_collected = weakref.finalize(self, watcher.stop, wait=False)

    def unwatch(self) -> None:
        """Stop following the spec file; the version serving now stays."""
        watcher, self._watcher = self._watcher, None
        if self._stop_when_collected is not None:
            self._stop_when_collected.detach()
        if watcher is not None:
            watcher.stop()

    @property
    def watching(self) -> Path | None:
        """The spec file this chain follows, or None."""
        return self._watcher.path if self._watcher is not None and self._watcher.running else None

    def __repr__(self) -> str:
        arrows = ", ".join(f"{h.name}<-[{','.join(h.deps)}]" if h.deps else h.name for h in self.spec.hops)
        return f"<Chain {self.name!r}: {arrows}; inputs {list(self.inputs)}; output {self.spec.output!r}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>"
            f"<td><b>{html.escape(h.name)}</b></td><td>{h.kind}</td><td>{html.escape(h.model or '')}</td>"
            f"<td>{html.escape(', '.join(h.deps) or '—')}</td>"
            f"<td><pre style='margin:0'>{html.escape(_shown(h))}</pre></td>"
            "</tr>"
            for h in self.spec.hops
        )
        return (
            f"<div><p>Chain <b>{html.escape(self.name)}</b>: inputs {html.escape(', '.join(self.inputs) or 'none')}, "
            f"output <b>{html.escape(self.spec.output)}</b></p>"
            "<table><tr><th>hop</th><th>kind</th><th>model</th><th>uses</th><th>prompt / call</th></tr>"
            f"{rows}</table></div>"
        )


class _Ahead:
    """A map's prefetch: while ``concurrency`` runs go, the inputs that start next get their first hops ready.

    At the start the second wave (inputs ``concurrency`` to ``2 * concurrency - 1``) is prepared; each
    run that starts then queues the input ``concurrency`` places after it. One task prepares them in order.
    """

    def __init__(self, batch: RunBatch, concurrency: int, prepare: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        self._order = batch.missing
        self._items = batch.inputs
        self._concurrency = concurrency
        self._prepare = prepare
        self._starts = 0
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        for position in range(concurrency, min(2 * concurrency, len(self._order))):
            self._queue.put_nowait(self._order[position])
        self._task = asyncio.ensure_future(self._work())

    def started(self) -> None:
        """The next input in order started: queue the one ``concurrency`` places after it (the first wave's are)."""
        position, self._starts = self._starts, self._starts + 1
        ahead = position + self._concurrency
        if position >= self._concurrency and ahead < len(self._order):
            self._queue.put_nowait(self._order[ahead])

    async def _work(self) -> None:
        while True:
            index = await self._queue.get()
            await self._prepare(self._items[index])

    def close(self) -> None:
        self._task.cancel()


def _shown(hop: HopSpec) -> str:
    """What a hop does, as the chain's table shows it: its prompt, its messages a line each, its graph query, or its
    function."""
    if hop.messages is not None:
        return "\n".join(f"{role}: {template.source}" for role, template in hop.messages)
    if hop.knowledge is not None:
        k = hop.knowledge
        return f"graph {k.source}, {k.hops} hop{'s' if k.hops > 1 else ''}, at most {k.max_triples} triples: " \
            f"{k.query.source}"
    return hop.prompt or getattr(hop.call, "__qualname__", "")


# How often a waiting thread returns to Python: a Ctrl-C is only seen between bytecodes.
_POLL_S = 0.1
# How long a Ctrl-C'd chain.run waits for its run's task to end on the loop and leave the partial run (it takes
# milliseconds: the cancel reaches the awaiting hop at once; a Python hop's thread is not waited for).
_INTERRUPTED_WAIT_S = 2.0


def _raise_failure(exc: BaseException | None) -> None:
    if isinstance(exc, Interrupted):
        raise KeyboardInterrupt from None
    if exc is not None:
        raise exc
