"""Walks a chain's hop graph for one set of inputs; hops whose inputs are ready run concurrently."""

from __future__ import annotations

import difflib
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, Status, StatusCode

from workbench.chains.context import ContextStore, History, RunRecord
from workbench.chains.run import Run
from workbench.chains.spec import ChainSpec, HopSpec
from workbench.engine.resilience import Route, serve
from workbench.errors import HopFailed, MissingInputError
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr
from workbench.tracing import openinference

if TYPE_CHECKING:
    from workbench.engine import Engine


def check_inputs(spec: ChainSpec, inputs: Mapping[str, Any]) -> None:
    """Refuse a run before any hop starts if an input is missing or misspelt."""
    missing = [name for name in spec.inputs if name not in inputs]
    extra = [name for name in inputs if name not in spec.inputs]
    if missing:
        users = {m: [h.name for h in spec.hops if m in h.inputs] for m in missing}
        detail = "; ".join(f"{m!r} (used by {', '.join(users[m]) or 'the spec'})" for m in missing)
        # A misspelt input shows up both as missing and as extra; name the likely typo.
        typos = [(e, close[0]) for e in extra if (close := difflib.get_close_matches(e, missing, n=1))]
        if typos:
            detail += f"; got {typos[0][0]!r} (did you mean {typos[0][1]!r}?)"
        raise MissingInputError(
            f"chain {spec.name!r} needs input {detail}",
            hint=f"run it as chain.run({', '.join(f'{n}=...' for n in spec.inputs)})",
        )
    if extra:
        close = difflib.get_close_matches(extra[0], spec.inputs, n=1)
        raise MissingInputError(
            f"chain {spec.name!r} takes no input {extra[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            hint=f"its inputs: {', '.join(spec.inputs) or 'none'}",
        )


class Runner:
    """Runs chains against an engine, a tracer, a context store and a pool for concurrent hops."""

    def __init__(self, engine: Engine, tracing: Tracing, store: ContextStore, hop_pool: Executor) -> None:
        self.engine = engine
        self.tracing = tracing
        self.store = store
        self.hop_pool = hop_pool

    def run(self, spec: ChainSpec, inputs: Mapping[str, Any], session: str | None = None) -> Run:
        """Run once; a failing hop gives a Run whose ``error`` is HopFailed and whose finished outputs stay."""
        check_inputs(spec, inputs)
        run_id = uuid.uuid4().hex[:12]
        history = History(self.store.history(session, spec.history) if session else [])
        started_at, started = time.time(), time.perf_counter()
        root = self.tracing.start_span(
            f"chain {spec.name}",
            attributes={
                attr.SPAN_KIND: attr.KIND_CHAIN,
                attr.CHAIN_NAME: spec.name,
                attr.RUN_ID: run_id,
                **openinference.input_value(dict(inputs)),
                **({attr.SESSION_ID: session, attr.OI_SESSION_ID: session} if session else {}),
            },
            run=True,
        )
        outputs: dict[str, Any] = {}
        failure: HopFailed | None = None
        try:
            failure = self._walk(spec, dict(inputs), history, outputs, root, run_id)
        except BaseException as exc:  # KeyboardInterrupt included: the trace must still close
            root.record_exception(exc)
            root.set_status(Status(StatusCode.ERROR, f"interrupted: {type(exc).__name__}"))
            root.end()
            raise
        output = outputs.get(spec.output)
        if failure is None:
            root.set_attributes(openinference.output_value(output))
            root.set_status(Status(StatusCode.OK))
        else:
            root.set_status(Status(StatusCode.ERROR, failure.message))
        root.end()
        run = Run(
            id=run_id,
            chain=spec.name,
            inputs=dict(inputs),
            outputs=outputs,
            output=output,
            trace_id=root.get_span_context().trace_id,
            started_at=started_at,
            duration_ms=(time.perf_counter() - started) * 1e3,
            session=session,
            error=failure,
            _index=self.tracing.index,
        )
        if failure is not None:
            failure.run = run
        if session:
            self.store.append(
                session,
                RunRecord(
                    run_id=run.id,
                    chain=run.chain,
                    inputs=run.inputs,
                    outputs=dict(outputs),
                    output=output,
                    started_at=started_at,
                    duration_ms=run.duration_ms,
                    status=run.status,
                    error=failure.message if failure else None,
                ),
            )
        return run

    def _walk(
        self,
        spec: ChainSpec,
        inputs: dict[str, Any],
        history: History,
        outputs: dict[str, Any],
        root: Span,
        run_id: str,
    ) -> HopFailed | None:
        """Start each hop once its dependencies are done; the first failure stops new starts."""
        pending = [h for h in spec.hops if not h.standby]  # standby hops run only in place of a failed hop
        running: dict[Future[Any], HopSpec] = {}
        failure: HopFailed | None = None
        while pending or running:
            ready = [h for h in pending if all(d in outputs for d in h.deps)] if failure is None else []
            for hop in ready:
                pending.remove(hop)
            if len(ready) == 1 and not running:
                # The common sequential step: run it here and skip a thread hand-off.
                hop = ready[0]
                try:
                    outputs[hop.name] = self._hop(hop, spec, inputs, history, outputs, root, run_id)
                except Exception as exc:
                    failure = HopFailed(hop.name, exc)
                continue
            for hop in ready:
                running[self.hop_pool.submit(self._hop, hop, spec, inputs, history, outputs, root, run_id)] = hop
            if not running:
                break  # nothing runs and nothing can start: a failure stopped the walk
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                hop = running.pop(future)
                exc = future.exception()
                if exc is None:
                    outputs[hop.name] = future.result()
                elif failure is None:
                    failure = HopFailed(hop.name, exc)
        return failure

    def _hop(
        self,
        hop: HopSpec,
        spec: ChainSpec,
        inputs: dict[str, Any],
        history: History,
        outputs: dict[str, Any],
        root: Span,
        run_id: str,
    ) -> Any:
        values: dict[str, Any] = {**inputs, "history": history}
        values.update({d: outputs[d] for d in hop.deps})
        attributes: dict[str, object] = {
            attr.SPAN_KIND: attr.KIND_CHAIN if hop.kind == "llm" else attr.KIND_TOOL,
            attr.HOP_NAME: hop.name,
            attr.HOP_KIND: hop.kind,
            attr.CHAIN_NAME: spec.name,
            attr.RUN_ID: run_id,
        }
        if hop.model:
            attributes[attr.MODEL_NAME] = hop.model
        if hop.call:
            attributes[attr.TOOL_NAME] = openinference.tool_name(hop.call)
        with self.tracing.span(f"hop {hop.name}", root, attributes) as span:
            if self.engine.preloader.prefetching:  # load what later hops need while this one runs
                self.engine.preloader.hop_started(hop.model, spec.models_after(hop.name), span, root)
            routes = self._routes(hop, spec, values, inputs, history, outputs, span, run_id)
            value = serve(routes, hop.resilience, span)
            span.set_attributes(openinference.output_value(value))
            span.set_status(Status(StatusCode.OK))
            return value


    def _routes(
        self,
        hop: HopSpec,
        spec: ChainSpec,
        values: dict[str, Any],
        inputs: dict[str, Any],
        history: History,
        outputs: dict[str, Any],
        span: Span,
        run_id: str,
    ) -> list[Route]:
        """The ways to serve ``hop``, in the order to try them: its own model or call, then its fallbacks."""
        prompt = ""
        if hop.kind == "llm":
            assert hop.template is not None and hop.model is not None
            prompt = hop.template.render(values)
            span.set_attributes(openinference.input_value(prompt))

        def model(name: str) -> Route:
            label = f"model:{name}"
            return Route(label, lambda attempt, timeout: self.engine.call(
                name, prompt, hop.params, span, hop.name, timeout_s=timeout,
                attributes={attr.ATTEMPT: attempt, attr.ROUTE: label},
            ).text)

        def standby(name: str) -> Route:
            # In place of the failed hop: a child of its span, reading the same values.
            fallback = spec.hop(name)
            return Route(f"hop:{name}", lambda attempt, timeout: self._hop(
                fallback, spec, inputs, history, outputs, span, run_id
            ))

        if hop.model:
            own = model(hop.model)
        else:
            arguments = _arguments(hop, values)
            span.set_attributes(openinference.input_value(arguments))
            own = Route(f"hop:{hop.name}", lambda attempt, timeout: _call(hop, arguments))
        routes = [own]
        routes += [model(f.name) if f.kind == "model" else standby(f.name) for f in hop.resilience.fallback]
        return routes


def _arguments(hop: HopSpec, values: dict[str, Any]) -> dict[str, Any]:
    """What a Python hop is called with: the parameters it names, else the whole context."""
    if hop.call_by_name is None:
        return dict(values)
    return {name: values[name] for name in hop.call_by_name if name in values}


def _call(hop: HopSpec, arguments: dict[str, Any]) -> Any:
    """Call a Python hop: by parameter name where it names them, else with the whole context (a copy per attempt)."""
    assert hop.call is not None
    return hop.call(dict(arguments)) if hop.call_by_name is None else hop.call(**arguments)
