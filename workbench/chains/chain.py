"""A chain bound to its host: run it once, map it over many inputs, or stream it; blocking or awaited."""

from __future__ import annotations

import asyncio
import html
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from workbench.chains.batch import Errors, MapInterrupted, MapState, RunBatch, reuse, run_all
from workbench.chains.events import Event, RunFinished
from workbench.chains.host import ChainHost
from workbench.chains.run import Run
from workbench.chains.runner import Interrupted, check_inputs, check_session
from workbench.chains.spec import ChainSpec, HopSpec
from workbench.errors import InvalidInput, WorkbenchError, WorkloadError


class Chain:
    """A validated chain spec plus the host (a Workbench) that runs it.

    Every way to run it has a blocking and an awaited form with the same behaviour:
    ``run``/``arun``, ``map``/``amap``, ``stream``/``astream``.
    """

    def __init__(self, spec: ChainSpec, host: ChainHost) -> None:
        self.spec = spec
        self._host = host
        self.last_batch: RunBatch | None = None  # the latest map's runs, filled in as they finish

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
        try:
            run = self._host.run_sync(self._host.arun_spec(self.spec, inputs, session))
        except Interrupted:
            raise KeyboardInterrupt from None  # a hop raised it; the run's trace says so
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
    ) -> RunBatch:
        """Run once per input mapping, ``concurrency`` at a time; the RunBatch lists Runs in input order.

        ``errors="keep"``: a failing run does not stop the others; its Run has ``error`` set and
        keeps the outputs of the hops that finished. ``errors="raise"``: the first failure
        stops the inputs not yet started and raises its HopFailed.

        Each run is kept as it finishes, in ``chain.last_batch``: a Ctrl-C raises MapInterrupted
        (a KeyboardInterrupt) whose ``.batch`` is that batch, with ``None`` for inputs not run
        (runs in flight still land in it). ``resume=`` a previous batch (or any Runs, e.g.
        ``bench.runs()``) reuses the successful runs of equal inputs and runs only the others.

        ``prefetch=True`` gets the next inputs' first hops ready while earlier runs go (their prompts
        rendered and tokenized, the prefix KV of ``cache: prefix`` hops warmed), so each starts the
        moment a lane frees. Not with a ``session`` (the history the prompts read is not known ahead).
        """
        batch = self._batch(inputs, errors, resume, concurrency, session)
        state = MapState(batch, batch.missing)
        try:
            return self._host.run_sync(self._map(batch, concurrency, session, errors, state, prefetch),
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
    ) -> RunBatch:
        """``await chain.amap(...)``: :meth:`map` awaited; cancelling it stops new starts and keeps what finished."""
        batch = self._batch(inputs, errors, resume, concurrency, session)
        try:
            return await self._host.run_async(self._map(batch, concurrency, session, errors, None, prefetch))
        except Interrupted:
            raise MapInterrupted(batch) from None

    def _batch(
        self,
        inputs: Iterable[Mapping[str, Any]],
        errors: Errors,
        resume: Iterable[Run | None] | None,
        concurrency: int,
        session: str | None,
    ) -> RunBatch:
        """Check a map's arguments and inputs before any run starts; its batch, with resumed runs filled in."""
        if errors not in ("keep", "raise"):
            raise WorkbenchError(f"errors={errors!r} is not a choice", hint="errors='keep' (default) or 'raise'")
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
            reuse(batch, resume)
        self.last_batch = batch
        return batch

    async def _map(
        self, batch: RunBatch, concurrency: int, session: str | None, errors: Errors, state: MapState | None,
        prefetch: bool = False,
    ) -> RunBatch:
        prepare = getattr(self._host, "aprepare_spec", None)
        ahead = _Ahead(batch, concurrency, lambda item: prepare(self.spec, item)) \
            if prefetch and session is None and prepare is not None else None

        async def execute(item: dict[str, Any]) -> Run:
            if ahead is not None:
                ahead.started()
            return await self._host.arun_spec(self.spec, item, session)

        try:
            return await run_all(batch, execute, concurrency, errors, state)
        finally:
            if ahead is not None:
                ahead.close()

    # -- streaming -----------------------------------------------------------------------------

    def stream(self, session: str | None = None, **inputs: Any) -> Iterator[Event]:
        """Run once, yielding what happens as it happens: HopStarted, Token (LLM hops), HopFinished, RunFinished.

        The last event is RunFinished with the Run (a failed hop leaves ``run.error`` set; nothing is
        raised). Leaving the loop early, or a Ctrl-C, cancels the run.
        """
        self._host.check_open(f"run chain {self.name!r}")
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        future = self._host.start(self._host.arun_spec(self.spec, inputs, session, events.put))
        try:
            while True:
                try:
                    event = events.get(timeout=_POLL_S)  # wakes for a Ctrl-C between waits
                except queue.Empty:
                    if future.done():
                        _raise_failure(future.exception())
                    continue
                yield event
                if isinstance(event, RunFinished):
                    return
        finally:
            future.cancel()

    async def astream(self, session: str | None = None, **inputs: Any) -> AsyncIterator[Event]:
        """``async for event in chain.astream(...)``: :meth:`stream` for asyncio programs and notebook cells."""
        self._host.check_open(f"run chain {self.name!r}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        future = asyncio.wrap_future(self._host.start(self._host.arun_spec(self.spec, inputs, session, put)))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the run ended without its last event: it failed outside every hop
                    getter.cancel()
                    _raise_failure(future.exception())
                event = getter.result()
                yield event
                if isinstance(event, RunFinished):
                    return
        finally:
            future.cancel()

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
    """What a hop does, as the chain's table shows it: its prompt, its messages a line each, or its function."""
    if hop.messages is not None:
        return "\n".join(f"{role}: {template.source}" for role, template in hop.messages)
    return hop.prompt or getattr(hop.call, "__qualname__", "")


# How often a waiting thread returns to Python: a Ctrl-C is only seen between bytecodes.
_POLL_S = 0.1


def _raise_failure(exc: BaseException | None) -> None:
    if isinstance(exc, Interrupted):
        raise KeyboardInterrupt from None
    if exc is not None:
        raise exc
