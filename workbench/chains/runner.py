"""Walks a chain's hop graph for one set of inputs on an event loop; hops whose inputs are ready run together.

LLM hops await the engine; a Python hop runs in the hop thread pool, or on the loop itself when
it is ``async def``; a knowledge hop looks up its graph on the loop (a short query against a
loaded graph, for a few hundred triples at most, takes well under a millisecond) and loads a graph,
reads a long query or walks for many triples in the pool.
Every coroutine here runs on the workbench's loop; the sync API waits on it.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from workbench.chains.cache import ResponseCache, response_key
from workbench.chains.context import ContextStore, History, RunRecord, SessionWrites
from workbench.chains.events import AttemptFailed, Event, HopFinished, HopStarted, RunFinished, Token
from workbench.chains.resilience import Interrupted, Route, serve
from workbench.chains.run import Run
from workbench.chains.spec import ChainSpec, HopSpec, fixed_prefix
from workbench.chains.templates import PromptTemplate
from workbench.engine import Call, Engine
from workbench.engine.requests import NO_TOKEN_ID, GenerationResult, Messages, check_text
from workbench.errors import (ContextWindowExceeded, HopFailed, HopTimeout, InvalidInput, MissingInputError,
                              RunCancelled, RunError, StoreError, describe, did_you_mean)
from workbench.knowledge import Facts, GraphStore, Lookup
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr
from workbench.tracing.clock import now_ns
from workbench.tracing import openinference

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]
# A knowledge hop is looked up on the loop when its query is at most this long (linking reads it word by word)
# and it may return at most this many triples (the walk costs about 1 µs a triple, more past a few hundred).
INLINE_QUERY_CHARS = 4_096
INLINE_MAX_TRIPLES = 200

# The trace a run started in this context joins: a served request's caller's (read from its W3C traceparent);
# None starts a new trace. A context variable, so it travels with the awaiting task onto the workbench's loop
# (asyncio copies the caller's context there) without a parameter on every method in between.
TRACE_PARENT: ContextVar[Context | None] = ContextVar("workbench_trace_parent", default=None)
# Whose answers the exact response cache shares in this context: a served caller's own (its principal), so that no
# caller gets another's stored answer, or learns from a hit that somebody sent that very prompt; None (a notebook, a
# server without credentials) shares the workbench's.
CACHE_SCOPE: ContextVar[str | None] = ContextVar("workbench_cache_scope", default=None)


@dataclass
class RunKeeper:
    """Where a run interrupted in its context (Ctrl-C, a cancel) leaves its partial Run (the outputs of the hops that
    finished, its trace), and a flag its task raises as it ends: chain.run sets one before it waits, so that a
    Ctrl-C, which cancels the run's task from the caller's thread, does not lose what the run had done."""

    runs: list[Run] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)


INTERRUPTED_RUNS: ContextVar[RunKeeper | None] = ContextVar("workbench_interrupted_runs", default=None)

T = TypeVar("T")


class _HopThread(threading.local):
    running: bool = False  # a Python hop's function runs on this thread now


_hop_thread = _HopThread()


class Lender:
    """A hop thread lent to a blocking chain call its hop made (``chain.run`` or ``chain.stream`` inside a Python hop):
    while it waits, it runs the pool work of that call's runs (their Python hops, templates, graph loads) that no hop
    thread took.

    With every hop thread waiting on such a call (a map at concurrency >= ``hop_threads``), that work would find
    no thread, and the calls would wait for ever. Each piece goes to the pool as well, so a free hop thread may run
    it first; whichever takes it runs it once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._loop = loop

    def offer(self, job: Callable[[], None]) -> None:
        if self._loop is None:
            self._work.put(job)
            return
        try:  # the hop thread runs an event loop that awaits the call: that loop runs the work between its steps
            self._loop.call_soon_threadsafe(job)
        except RuntimeError:  # that loop closed (its call was cancelled): a hop thread takes the work from the pool
            pass

    def run_next(self, timeout: float | None = None) -> bool:
        """Run the next piece of work offered here, waiting at most ``timeout`` for one; False if none came."""
        try:
            job = self._work.get(timeout=timeout)
        except queue.Empty:
            return False
        if job is not None:
            job()
        return True

    def wait(self, future: Future[T]) -> None:
        """Run the work offered here until ``future`` is done."""
        future.add_done_callback(lambda _: self._work.put(None))
        while not future.done():
            self.run_next()


# The Lender of the blocking call a run was started from, if a hop thread waits on it: a context variable, so
# it travels onto the workbench's loop with the call, and to every task of its runs.
LENDER: ContextVar[Lender | None] = ContextVar("workbench_lender", default=None)


@contextmanager
def lending(loop: asyncio.AbstractEventLoop | None = None) -> Iterator[Lender | None]:
    """A Lender for the chain call started in this block, if this thread is a hop thread running a Python hop (else
    None): the runs started in the block offer it their pool work, to run while the call waits. A blocking call
    waits in :meth:`Lender.wait`; an awaited one (``asyncio.run(chain.arun(...))`` in the hop) names the ``loop``
    it is awaited on, which runs the work."""
    if not _hop_thread.running:
        yield None
        return
    lent = Lender(loop)
    token = LENDER.set(lent)
    try:
        yield lent
    finally:
        LENDER.reset(token)


class _Job:
    """A piece of pool work run once, by whichever thread takes it first: a hop thread, or the one lent to its run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        self._loop, self._function, self._args = loop, function, args
        self._taken = threading.Lock()

    def __call__(self) -> None:
        if not self._taken.acquire(blocking=False) or self.future.cancelled():
            return
        try:
            value, error = self._function(*self._args), None
        except BaseException as exc:  # handed to the awaiting hop, as run_in_executor hands it
            value, error = None, exc
        try:
            self._loop.call_soon_threadsafe(_settle, self.future, value, error)
        except RuntimeError:  # the loop closed (bench.close()): nobody awaits it any more
            pass


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


def check_inputs(spec: ChainSpec, inputs: Mapping[str, Any], session: str | None = None) -> None:
    """Refuse a run before any hop starts if an input is missing, misspelt or not valid text, or its session id is."""
    odd = [name for name in inputs if not isinstance(name, str)]
    if odd:  # a map's row read from a CSV without a header, say: its keys are column numbers
        example = ", ".join(f"{name!r}: ..." for name in spec.inputs)
        raise InvalidInput(
            f"chain {spec.name!r} takes inputs by name, and {type(odd[0]).__name__} {odd[0]!r:.80} is not a name",
            hint=f"its inputs: {', '.join(spec.inputs) or 'none'}; e.g. {{{example}}}",
        )
    missing = [name for name in spec.inputs if name not in inputs]
    extra = [name for name in inputs if name not in spec.inputs]
    if missing:
        users = {m: [h.name for h in spec.hops if m in h.inputs] for m in missing}
        detail = "; ".join(f"{m!r} (used by {', '.join(users[m]) or 'the spec'})" for m in missing)
        # A misspelt input shows up both as missing and as extra; name the likely typo.
        # Only the first few: each match is a fuzzy comparison with every missing name, and a request may send
        # thousands of stray names (its check runs on the loop that every run walks on).
        typos = [(e, close[0]) for e in extra[:16] if (close := difflib.get_close_matches(e, missing, n=1))]
        if typos:
            detail += f"; got {typos[0][0]!r:.80} (did you mean {typos[0][1]!r}?)"
        else:  # a template's typo for a hop ({{ paln }}) reads as an input the spec never meant to take
            hops = [h.name for h in spec.hops]
            misspelt = [(m, close[0]) for m in missing[:16] if (close := difflib.get_close_matches(m, hops, n=1))]
            if misspelt:
                name, hop = misspelt[0]
                reader = next(h for h in spec.hops if name in h.inputs)
                where = f"hop {reader.name!r}" + (f" (line {reader.line})" if reader.line else "")
                raise MissingInputError(
                    f"chain {spec.name!r} needs input {detail}; {name!r} is no hop either (did you mean hop {hop!r}?)",
                    hint=f"if {where} means the output of hop {hop!r}, " + (
                        f"name its parameter {hop}" if reader.kind == "python" else
                        f"write {{{{ {hop} }}}} in its {reader.text_field}"),
                )
        raise MissingInputError(
            f"chain {spec.name!r} needs input {detail}",
            hint=f"run it as chain.run({', '.join(f'{n}=...' for n in spec.inputs)})",
        )
    if extra:
        raise MissingInputError(
            f"chain {spec.name!r} takes no input {extra[0]!r:.80}{did_you_mean(extra[0], spec.inputs)}",
            hint=f"its inputs: {', '.join(spec.inputs) or 'none'}",
        )
    for name, value in inputs.items():
        if isinstance(value, str):
            check_text(value, f"input {name!r:.80} of chain {spec.name!r}")
    check_session(session)


def check_session(session: Any) -> None:
    if session is not None and not isinstance(session, str):
        # Stored as its text, True, 1 and "1" were one conversation (and the in-memory store could not list them).
        raise InvalidInput(f"the session id must be text, not {type(session).__name__} {session!r:.40}",
                           hint="name the conversation: session='alice', or session=str(user_id)")
    if isinstance(session, str):
        if not session.strip():
            # Empty, it would run as no session at all (no history read, nothing kept, nothing said); blank, as one
            # nobody can tell apart from the next blank one in a table or a store listing.
            raise InvalidInput(f"the session id {session!r} is blank" if session else "the session id is empty",
                               hint="session=None runs without a session; "
                               "to keep a conversation's history, name it: session='alice'")
        check_text(session, "the session id")


@dataclass
class RunState:
    """What one run's hops share as it walks: its spec, inputs, history, the outputs so far, its root span."""

    spec: ChainSpec
    inputs: dict[str, Any]
    history: History
    root: Span
    run_id: str
    events: EventSink | None = None
    session: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    def emit(self, event: Event) -> None:
        if self.events is not None:
            self.events(event)


def _failed(hop: HopSpec, exc: BaseException, state: RunState) -> HopFailed:
    """The run's failure at ``hop``. A prompt past the model's window that holds the session's history says so in its
    hint: each run of a session adds to what the next one's prompt holds, so past the window every later run fails
    alike, and shortening the prompt is not what helps."""
    if isinstance(exc, ContextWindowExceeded) and state.session is not None and state.history \
            and "history" in hop.needs():
        runs = len(state.history)
        exc.hint = (f"its prompt holds the last {runs} run{'s' if runs != 1 else ''} of session {state.session!r}, "
                    f"and each run adds to the next one's: lower the chain's history: ({state.spec.history} now), "
                    f"set truncate: left on the hop, or start the session again (bench.session({state.session!r})"
                    ".forget())")
    return HopFailed(hop.name, exc)


class Runner:
    """Runs chains against an engine, a tracer, a context store, a pool for Python hops and knowledge hops' graphs."""

    def __init__(
        self,
        engine: Engine,
        tracing: Tracing,
        store: ContextStore,
        hop_pool: Executor,
        io_pool: Executor,
        graphs: GraphStore | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.engine = engine
        self.tracing = tracing
        self.store = store
        self.sessions = SessionWrites(store)  # a session's forget and its runs' appends, in one order
        self.hop_pool = hop_pool  # Python hops and templates: the chain's own code, which may block
        self.io_pool = io_pool  # the run's bookkeeping: session history and records, the response cache, prompts
        self.graphs = graphs if graphs is not None else GraphStore()  # knowledge hops' graphs, loaded once
        self.cache = cache  # the exact response cache of ``cache: exact`` hops (None: they call the model every time)
        # Exact-cache misses whose model call is under way, by cache and key: the same call from another run waits
        # for its answer (None if it failed) rather than calling the model again. Touched on the loop only.
        self._calling: dict[tuple[ResponseCache, str], asyncio.Future[_Hit | None]] = {}

    async def arun(
        self, spec: ChainSpec, inputs: Mapping[str, Any], session: str | None = None, events: EventSink | None = None
    ) -> Run:
        """Run once; a failing hop gives a Run whose ``error`` is HopFailed and whose finished outputs stay.

        ``events`` hears the run as it goes: hops starting and finishing, tokens of LLM hops, the end.
        """
        check_inputs(spec, inputs, session)
        loop = asyncio.get_running_loop()
        run_id = uuid.uuid4().hex[:12]
        records, mark = (await loop.run_in_executor(self.io_pool, self.sessions.read, session, spec.history)
                         if session is not None else ([], (0, None)))
        started_at, started = now_ns() / 1e9, time.perf_counter()  # on the spans' clock, which never jumps
        root = self.tracing.start_span(
            f"chain {spec.name}",
            TRACE_PARENT.get(),
            attributes={
                attr.SPAN_KIND: attr.KIND_CHAIN,
                attr.CHAIN_NAME: spec.name,
                attr.RUN_ID: run_id,
                **openinference.input_value(dict(inputs)),
                **({attr.SESSION_ID: session, attr.OI_SESSION_ID: session} if session is not None else {}),
                **({attr.CONFIG_VERSION: spec.version.number, attr.CONFIG_HASH: spec.version.digest}
                   if spec.version is not None else {}),
            },
            run=True,
        )
        state = RunState(spec, dict(inputs), History(records), root, run_id, events, session)
        try:
            failure = await self._walk(state)
        except BaseException as exc:  # an interrupt or a cancel included: the trace must still close
            cause = exc.__cause__ if isinstance(exc, Interrupted) else exc
            root.record_exception(exc)
            root.set_status(Status(StatusCode.ERROR, f"interrupted: {type(cause).__name__}"))
            root.end()
            keeper = INTERRUPTED_RUNS.get()
            if keeper is not None:  # the partial run, failed at the first hop that had not finished
                stopped = next((h.name for h in spec.hops if not h.standby and h.name not in state.outputs),
                               spec.hops[-1].name)
                interrupted = HopFailed(stopped, RunCancelled(f"the run was interrupted ({type(cause).__name__})"))
                keeper.runs.append(self._run_of(state, started_at, started, interrupted))
            raise
        output = state.outputs.get(spec.output)
        if failure is None:
            root.set_attributes(openinference.output_value(output))
            root.set_status(Status(StatusCode.OK))
        else:
            root.set_status(Status(StatusCode.ERROR, failure.message))
        root.end()
        run = self._run_of(state, started_at, started, failure)
        if session is not None:
            try:
                kept = await loop.run_in_executor(self.io_pool, self.sessions.append, session, RunRecord.of(run), mark)
                if not kept:
                    log.info("run %s of session %r is not kept: the session was forgotten while it ran", run_id, session)
            except StoreError as exc:
                # The run is done and its answer stands: losing it for its history's sake would lose more.
                # Its session's next run will not see it, which the warning says.
                warnings.warn(f"run {run_id} of session {session!r} finished, but the session store could not keep "
                              f"it, so the session's next runs will not see it: {exc}", RuntimeWarning, stacklevel=2)
                log.warning("run %s of session %r was not kept in the session store: %s", run_id, session, exc)
        state.emit(RunFinished(run))
        return run

    def _run_of(self, state: RunState, started_at: float, started: float, failure: HopFailed | None) -> Run:
        """The Run of ``state``'s walk, which ended now, with ``failure`` (its ``.run`` set to it) if it failed."""
        run = Run(
            id=state.run_id,
            chain=state.spec.name,
            inputs=state.inputs,
            outputs=state.outputs,
            output=state.outputs.get(state.spec.output),
            trace_id=state.root.get_span_context().trace_id,
            started_at=started_at,
            duration_ms=(time.perf_counter() - started) * 1e3,
            session=state.session,
            error=failure,
            config_version=state.spec.version,
            _index=self.tracing.index,
        )
        if failure is not None:
            failure.run = run
        return run

    async def _walk(self, state: RunState) -> HopFailed | None:
        """Start each hop once its dependencies are done; the first failure stops new starts."""
        outputs = state.outputs
        pending = [h for h in state.spec.hops if not h.standby]  # standby hops run only in place of a failed hop
        running: dict[asyncio.Future[Any], HopSpec] = {}
        failure: HopFailed | None = None
        try:
            while pending or running:
                ready = [h for h in pending if all(d in outputs for d in h.deps)] if failure is None else []
                for hop in ready:
                    pending.remove(hop)
                if len(ready) == 1 and not running:
                    # The common sequential step: await it here, without a task of its own.
                    hop = ready[0]
                    try:
                        outputs[hop.name] = await self._hop(hop, state, state.root)
                    except Exception as exc:
                        if isinstance(exc, Interrupted):
                            raise
                        failure = _failed(hop, exc, state)
                    continue
                for hop in ready:
                    running[asyncio.ensure_future(self._hop(hop, state, state.root))] = hop
                if not running:
                    break  # nothing runs and nothing can start: a failure stopped the walk
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    hop = running.pop(future)
                    exc = future.exception()
                    if isinstance(exc, Interrupted):
                        raise exc
                    if exc is None:
                        outputs[hop.name] = future.result()
                    elif failure is None:
                        failure = _failed(hop, exc, state)
        finally:
            for future in running:  # an interrupt or a cancel: hops still running stop too
                future.cancel()
        return failure

    async def _hop(self, hop: HopSpec, state: RunState, parent: Span) -> Any:
        spec = state.spec
        # ``session`` is reserved for the run's session id (None without one), as ``history`` is for its past runs.
        values: dict[str, Any] = {**state.inputs, "history": state.history, "session": state.session}
        values.update({d: state.outputs[d] for d in hop.deps})
        attributes: dict[str, object] = {
            attr.SPAN_KIND: {"llm": attr.KIND_CHAIN, "knowledge": attr.KIND_RETRIEVER}.get(hop.kind, attr.KIND_TOOL),
            attr.HOP_NAME: hop.name,
            attr.HOP_KIND: hop.kind,
            attr.CHAIN_NAME: spec.name,
            attr.RUN_ID: state.run_id,
        }
        if hop.model:
            attributes[attr.MODEL_NAME] = hop.model
        if hop.call:
            attributes[attr.TOOL_NAME] = openinference.tool_name(hop.call)
        state.emit(HopStarted(hop.name))
        started = time.perf_counter()
        with self.tracing.span(f"hop {hop.name}", parent, attributes) as span:
            if self.engine.preloader.prefetching:  # load what later hops need while this one runs
                self.engine.preloader.hop_started(hop.model, spec.models_after(hop.name), span, parent)
            prompt, messages = await self._prompt(hop, values, span)
            failed = None if state.events is None else (
                lambda attempt, route, exc: state.emit(AttemptFailed(hop.name, attempt, route, describe(exc))))
            value = await serve(self._routes(hop, state, values, span, prompt, messages), hop.resilience, span, failed)
            span.set_attributes(openinference.output_value(value))
            span.set_status(Status(StatusCode.OK))
        state.emit(HopFinished(hop.name, value, (time.perf_counter() - started) * 1e3))
        return value

    async def _prompt(self, hop: HopSpec, values: dict[str, Any], span: Span) -> tuple[str, Messages | None]:
        """An LLM hop's prompt, or a chat hop's messages ("" and None for a Python hop), bounded by its timeout_s.

        A template that is more than text and ``{{ name }}``s renders in the hop pool: a slow one
        (a spec may be someone else's) must not hold up the loop every run walks on.
        """
        if hop.kind != "llm":
            return "", None
        if hop.messages is None:
            assert hop.template is not None
            prompt = await self._render(hop.template, values, hop.resilience.timeout_s)
            check_text(prompt, f"the prompt of hop {hop.name!r}")  # a hop's output may carry a lone surrogate
            span.set_attributes(openinference.input_value(prompt))
            return prompt, None
        messages = []
        for index, (role, template) in enumerate(hop.messages):
            content = await self._render(template, values, hop.resilience.timeout_s)
            check_text(content, f"message #{index + 1} of hop {hop.name!r}")
            messages.append({"role": role, "content": content})
        span.set_attributes(openinference.input_value(messages))
        return "", messages

    async def _render(self, template: PromptTemplate, values: dict[str, Any], timeout_s: float | None) -> str:
        render = partial(template.render, values, timeout_s=timeout_s)
        if template.plain:
            return render()
        return await self._in_pool(render)  # type: ignore[no-any-return]

    async def _in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the hop pool; for a run that a hop thread waits on, offered to that thread too."""
        job = _Job(asyncio.get_running_loop(), function, args)  # lighter than run_in_executor's chained futures
        self.hop_pool.submit(job)
        lent = LENDER.get()
        if lent is not None:
            lent.offer(job)
        return await job.future

    def _routes(
        self, hop: HopSpec, state: RunState, values: dict[str, Any], span: Span, prompt: str, messages: Messages | None
    ) -> list[Route]:
        """The ways to serve ``hop``, in the order to try them: its own model or call, then its fallbacks."""

        prefix = fixed_prefix(hop.template) if hop.cache.prefix and hop.template is not None else None
        if hop.kind == "llm":
            span.set_attribute(attr.CACHE_MODE, hop.cache.mode)

        def model(name: str) -> Route:
            label = f"model:{name}"

            async def call(attempt: int, timeout: float | None) -> Any:
                cache = self.cache if hop.cache.exact else None
                key = await self._cached(cache, hop, name, prompt, messages, span, timeout) if cache is not None else None
                if isinstance(key, _Hit):
                    if state.events is not None and key.text:  # a stream shows the stored answer, in one piece
                        state.emit(Token(hop.name, key.text, NO_TOKEN_ID))
                    return key.text
                if cache is None or key is None:
                    return (await answer(attempt, timeout)).text
                calling = self._calling[cache, key]  # _cached put it there: this run calls the model for it
                answered = None
                try:
                    result = await answer(attempt, timeout, cache, key)
                    answered = _Hit(key, result.text, result.e2e_ms, result.tokens_out)
                    return result.text
                finally:
                    if self._calling.get((cache, key)) is calling:
                        del self._calling[cache, key]
                    calling.set_result(answered)  # the runs that wait for it: the answer, or None to call themselves

            async def answer(attempt: int, timeout: float | None, cache: ResponseCache | None = None,
                             key: str | None = None) -> GenerationResult:
                """The model's answer; with ``key``, stored under it in ``cache``."""
                on_token = _TokenSink(state, hop.name) if state.events is not None else None
                call = Call(name, prompt, hop.params, span, hop.name, {attr.ATTEMPT: attempt, attr.ROUTE: label},
                            timeout, on_token=on_token, session=state.session, messages=messages, prefix=prefix,
                            adapter=hop.adapter if name == hop.model else None)  # a fallback model runs bare
                try:
                    result = await self.engine.acall(call)
                except BaseException:
                    if on_token is not None:
                        on_token.void()  # what its request still streams (it stops at its next step) is no answer
                    raise
                if result.prefix_tokens:
                    span.set_attributes({attr.PREFIX_TOKENS: result.prefix_tokens,
                                         attr.PREFIX_SAVED_MS: result.prefix_saved_ms})
                if cache is None or key is None:
                    return result
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self.io_pool, cache.put, key, state.spec.name, hop.name, name, result.text,
                        result.tokens_out, result.e2e_ms)
                except StoreError as exc:
                    # The model answered: losing that for the cache's sake (or calling it again on a retry)
                    # would lose more. The next such call goes to the model again, which the warning says.
                    warnings.warn(f"hop {hop.name!r} answered, but the response cache could not keep its answer, "
                                  f"so the model will be called again for it: {exc}", RuntimeWarning, stacklevel=2)
                    log.warning("an answer of hop %r was not kept in the response cache: %s", hop.name, exc)
                return result

            return Route(label, call)

        def standby(name: str) -> Route:
            # In place of the failed hop: a child of its span, reading the same values.
            fallback = state.spec.hop(name)
            return Route(f"hop:{name}", lambda attempt, timeout: self._hop(fallback, state, span))

        if hop.model:
            own = model(hop.model)
        elif hop.knowledge is not None:
            own = Route(f"graph:{hop.knowledge.source}",
                        lambda attempt, timeout: self._look_up(hop, state, values, span))
        else:
            span.set_attributes(openinference.input_value(_arguments(hop, values)))
            own = Route(f"hop:{hop.name}", lambda attempt, timeout: self._call(hop, values, timeout))
        routes = [own]
        routes += [model(f.name) if f.kind == "model" else standby(f.name) for f in hop.resilience.fallback]
        return routes

    async def _cached(
        self, cache: ResponseCache, hop: HopSpec, model: str, prompt: str, messages: Messages | None, span: Span,
        timeout_s: float | None,
    ) -> _Hit | str | None:
        """Look the call up in the exact cache: a hit, else the key to store its answer under (None: no cache).

        A miss whose same call another run is making waits for that answer (up to ``timeout_s``), and counts as a
        hit; a miss that makes the call is marked in ``_calling``, which the caller settles when it ends.
        """
        loop = asyncio.get_running_loop()
        scope = CACHE_SCOPE.get()  # here, in the run's context: the pool's thread has none

        def look() -> _Hit | str | None:
            # A fallback model runs bare; a hop's adapter counts by the files of its live version. With no live
            # version known (the model loads on this call, say) the call goes to the model uncached: keyed without
            # one, it would share the base model's answers.
            adapter = None
            if hop.adapter and model == hop.model:
                adapter = self.engine.adapter_identity(model, hop.adapter)
                if adapter is None:
                    return None
            identity = self.engine.identity(model)
            if identity is None:
                return None  # the model loads on this call: uncached, as for an adapter, until it is known
            key = response_key(identity, prompt, messages, hop.params, adapter=adapter, scope=scope)
            found = cache.get(key, hop.name, model, count=False)
            return key if found is None else _Hit(key, found.text, found.cost_ms, found.tokens_out)

        answer = await loop.run_in_executor(self.io_pool, look)
        if answer is None:
            return None
        shared = False
        while isinstance(answer, str):
            calling = self._calling.get((cache, answer))
            if calling is None:
                self._calling[cache, answer] = loop.create_future()
                break
            try:  # shielded: a wait that times out or is cancelled leaves the call it waits for going
                found = await asyncio.wait_for(asyncio.shield(calling), timeout_s)
            except TimeoutError:
                raise HopTimeout(f"hop {hop.name!r}: the same call of model {model!r}, made by another run, gave no "
                                 f"answer within {timeout_s:g} s", hint="raise the hop's timeout_s, or give the hop "
                                 "retry or a fallback") from None
            answer, shared = (found, True) if found is not None else (answer, False)  # None: it failed; call again
        cache.count(hop.name, model, answer.cost_ms if isinstance(answer, _Hit) else None)
        if isinstance(answer, _Hit):
            span.set_attributes({attr.CACHE_HIT: True, attr.CACHE_KEY: answer.key, attr.CACHE_SAVED_MS: answer.cost_ms,
                                 attr.CACHE_TOKENS_OUT: answer.tokens_out,
                                 **({attr.CACHE_SHARED: True} if shared else {})})
        else:
            span.set_attributes({attr.CACHE_HIT: False, attr.CACHE_KEY: answer})
        return answer

    async def prepare(self, spec: ChainSpec, inputs: Mapping[str, Any]) -> int:
        """Get a run's first hops ready before it starts (a map's prefetch): render their prompts, tokenize them,
        and warm the prefix KV of ``cache: prefix`` hops. Best effort: a failure here is left for the run to meet.
        Returns how many hops it prepared."""
        loop = asyncio.get_running_loop()
        values: dict[str, Any] = {**inputs, "history": History([]), "session": None}
        prepared = 0
        for hop in spec.hops:
            if hop.kind != "llm" or hop.deps or hop.standby or hop.template is None or hop.model is None:
                continue
            try:
                prompt = await self._render(hop.template, values, hop.resilience.timeout_s)
                prefix = fixed_prefix(hop.template) if hop.cache.prefix else None
                await loop.run_in_executor(self.io_pool, self.engine.prepare_prompt, hop.model, prompt, prefix,
                                           hop.params, hop.name)
            except Exception:  # the run itself meets (and reports) whatever went wrong
                continue
            prepared += 1
        return prepared

    async def _call(self, hop: HopSpec, values: dict[str, Any], timeout_s: float | None = None) -> Any:
        """Call a Python hop: by parameter name where it names any (none if it takes none), else with the whole context.

        An ``async def`` hop is awaited on the loop, and cancelled past ``timeout_s`` (HopTimeout); any other runs
        in the hop pool, so it may block. A coroutine that one returns (an object whose ``__call__`` is
        ``async def``, a lambda around an async function) is awaited on the loop too: its value is the hop's
        output, not the coroutine.
        """
        assert hop.call is not None
        arguments = _arguments(hop, values)
        by_keyword = hop.call_by_name is not None or hop.context_as_keywords
        args, kwargs = ((), arguments) if by_keyword else ((arguments,), {})
        if inspect.iscoroutinefunction(hop.call):
            if timeout_s is None:
                return await _awaited(hop.call(*args, **kwargs))
            # Not wait_for: a TimeoutError the hop raised itself would read as its timeout_s running out.
            task = asyncio.ensure_future(_awaited(hop.call(*args, **kwargs)))
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout_s)
            except BaseException:  # the run was cancelled: so is its hop
                task.cancel()
                raise
            if not done:
                task.cancel()
                # Whatever it raises as it stops is no one's to read (not "Task exception was never retrieved").
                task.add_done_callback(lambda stopped: stopped.cancelled() or stopped.exception())
                raise HopTimeout(f"its async function gave no answer within {timeout_s:g} s, so it was cancelled",
                                 hint="raise the hop's timeout_s, or give the hop retry or a fallback")
            return task.result()
        value = await self._in_pool(_interruptible, hop.call, args, kwargs)
        return await _awaited(value) if inspect.iscoroutine(value) else value

    async def _look_up(self, hop: HopSpec, state: RunState, values: dict[str, Any], span: Span) -> Facts:
        """A knowledge hop: render the query, link and walk the graph; the span gets the timings and the cost."""
        assert hop.knowledge is not None
        knowledge = hop.knowledge
        query = await self._render(knowledge.query, values, None)
        check_text(query, f"the query of hop {hop.name!r}")
        span.set_attributes(openinference.input_value(query))
        span.set_attributes({attr.KNOWLEDGE_GRAPH: str(knowledge.source), attr.KNOWLEDGE_HOPS: knowledge.hops,
                             attr.KNOWLEDGE_MAX_TRIPLES: knowledge.max_triples})
        graph = self.graphs.cached(knowledge.source)
        inline = graph is not None and len(query) <= INLINE_QUERY_CHARS and knowledge.max_triples <= INLINE_MAX_TRIPLES
        if graph is None:
            started = time.perf_counter()
            served = await self._in_pool(self.graphs.serve, knowledge.source)
            span.set_attribute(attr.KNOWLEDGE_LOAD_MS, (time.perf_counter() - started) * 1e3)
            graph = served.graph
            if served.stale is not None:  # the file changed and cannot be read: the last good graph answers
                span.set_attributes({attr.KNOWLEDGE_STALE: True, attr.KNOWLEDGE_RELOAD_ERROR: served.stale.message})
        look_up = partial(graph.lookup, query, knowledge.hops, knowledge.max_triples)
        lookup = look_up() if inline else await self._in_pool(look_up)
        span.set_attributes({
            attr.KNOWLEDGE_INLINE: inline,
            attr.KNOWLEDGE_LINK_MS: lookup.link_ms,
            attr.KNOWLEDGE_TRAVERSE_MS: lookup.traverse_ms,
            attr.KNOWLEDGE_ENTITIES: list(lookup.entities),
            attr.KNOWLEDGE_TRIPLES: len(lookup.triples),
            attr.KNOWLEDGE_TRUNCATED: lookup.truncated,
            **self._prompt_cost(lookup, state.spec.models_after(hop.name)),
        })
        return lookup.facts

    def _prompt_cost(self, lookup: Lookup, models: list[str]) -> dict[str, object]:
        """What the facts add to the next prompt: characters, and tokens by the next LLM hop's tokenizer if it is here.
        """
        cost: dict[str, object] = {attr.KNOWLEDGE_PROMPT_CHARS: len(lookup.facts)}
        if not models:
            return cost
        try:
            # The model's own backend counts (its tokenizer is on this machine for every backend but a bare server);
            # a model not loaded yet is not loaded for this: the characters say it.
            backend = self.engine.replicas_of(models[0])[0].backend
            tokens = len(backend.tokenize([str(lookup.facts)], special_tokens=False)[0]) if lookup.facts else 0
        except Exception:  # not loaded, no tokenizer here, or a fast tokenizer busy on another thread
            return cost
        return {**cost, attr.KNOWLEDGE_PROMPT_TOKENS: tokens, attr.KNOWLEDGE_TOKENIZER: models[0]}


@dataclass(frozen=True)
class _Hit:
    """An exact-cache hit: the key it was found under, the stored answer, what it cost when the model made it."""

    key: str
    text: str
    cost_ms: float
    tokens_out: int


async def _awaited(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Await a Python hop's coroutine on the loop; a KeyboardInterrupt, sys.exit() or CancelledError of its own
    fails the hop."""
    try:
        return await coroutine
    except KeyboardInterrupt as exc:  # on the loop it would stop every run: carry it out instead
        raise Interrupted("a hop raised KeyboardInterrupt") from exc
    except SystemExit as exc:  # on the loop it would stop the loop, and every later run would find it closed
        raise _exited(exc) from exc
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+: was this run's task cancelled?
        if cancelling is None or cancelling():
            raise
        # The hop's own (a task or future it awaited was cancelled): raised as it is, it would end the run, or a
        # whole map, with a bare CancelledError and no Run, as if the caller had cancelled it.
        raise _cancelled_inside() from exc


def _interruptible(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a Python hop in a pool thread; a KeyboardInterrupt it raises travels as Interrupted, a sys.exit() or a
    CancelledError as the hop's failure."""
    was_running, _hop_thread.running = _hop_thread.running, True  # a chain call made in it lends this thread
    try:
        return function(*args, **kwargs)
    except KeyboardInterrupt as exc:
        raise Interrupted("a hop raised KeyboardInterrupt") from exc
    except SystemExit as exc:  # carried to the loop, it would stop it, and every later run would find it closed
        raise _exited(exc) from exc
    except asyncio.CancelledError as exc:  # nothing cancels a pool thread: the hop's own
        raise _cancelled_inside() from exc
    finally:
        _hop_thread.running = was_running


def _exited(exc: SystemExit) -> RunError:
    """A Python hop's sys.exit(), as the failure of its hop: it ends neither the workbench's loop nor the program."""
    return RunError(f"its code called sys.exit({exc.code!r}) (raised SystemExit)",
                    hint="a command-line entry point (main(), argparse) exits when done or on bad arguments: call the "
                    "function under it, or catch SystemExit in the hop")


def _cancelled_inside() -> RunError:
    """A Python hop's own CancelledError, as the failure of its hop (the run was not cancelled)."""
    return RunError("its code raised CancelledError, though nothing cancelled the run",
                    hint="a task or future the hop awaited was cancelled; catch asyncio.CancelledError in the hop "
                    "to answer without it")


class _TokenSink:
    """Hands each token of one attempt of ``hop`` (from a worker thread) to the run's events, on the run's loop,
    until the attempt failed (:meth:`void`)."""

    def __init__(self, state: RunState, hop: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._state, self._hop = state, hop
        self._void = False

    def __call__(self, token: int, text: str) -> None:
        self._loop.call_soon_threadsafe(self._emit, Token(self._hop, text, token))

    def _emit(self, token: Token) -> None:
        if not self._void:  # on the loop, as void() is: a token that arrives after the failure is dropped
            self._state.emit(token)

    def void(self) -> None:
        self._void = True


def _arguments(hop: HopSpec, values: dict[str, Any]) -> dict[str, Any]:
    """What a Python hop is called with (a fresh dict each time): the parameters it names, else the whole context."""
    if hop.call_by_name is None:
        return dict(values)
    return {name: values[name] for name in hop.call_by_name if name in values}
