"""A chain bound to a workbench: run it once, or map it over many inputs."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from workbench.chains.batch import Errors, RunBatch, reuse, run_all
from workbench.chains.run import Run
from workbench.chains.runner import check_session
from workbench.chains.spec import ChainSpec
from workbench.errors import InvalidInput, WorkbenchError, WorkloadError

if TYPE_CHECKING:
    from workbench.bench import Workbench


class Chain:
    """A validated chain spec plus the workbench that runs it."""

    def __init__(self, spec: ChainSpec, bench: Workbench) -> None:
        self.spec = spec
        self._bench = bench
        self.last_batch: RunBatch | None = None  # the latest map's runs, filled in as they finish

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bench(self) -> Workbench:
        """The workbench this chain runs on."""
        return self._bench

    @property
    def hops(self) -> list[str]:
        return [h.name for h in self.spec.hops]

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.spec.inputs

    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each hop and the hops whose outputs it reads."""
        return self.spec.deps()

    def run(self, session: str | None = None, **inputs: Any) -> Run:
        """Run the chain once; raises HopFailed (holding the partial run) if a hop fails."""
        run = self._bench._execute(self.spec, inputs, session)
        if run.error is not None:
            raise run.error
        return run

    def map(
        self,
        inputs: Iterable[Mapping[str, Any]],
        concurrency: int = 8,
        session: str | None = None,
        *,
        errors: Errors = "keep",
        resume: Iterable[Run | None] | None = None,
    ) -> RunBatch:
        """Run once per input mapping, ``concurrency`` at a time; the RunBatch lists Runs in input order.

        ``errors="keep"``: a failing run does not stop the others; its Run has ``error`` set and
        keeps the outputs of the hops that finished. ``errors="raise"``: the first failure
        cancels the inputs not yet started and raises its HopFailed.

        Each run is kept as it finishes, in ``chain.last_batch``: a Ctrl-C raises MapInterrupted
        (a KeyboardInterrupt) whose ``.batch`` is that batch, with ``None`` for inputs not run.
        ``resume=`` a previous batch (or any Runs, e.g. ``bench.runs()``) reuses the successful
        runs of equal inputs and runs only the others.
        """
        if errors not in ("keep", "raise"):
            raise WorkbenchError(f"errors={errors!r} is not a choice", hint="errors='keep' (default) or 'raise'")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise WorkloadError(f"concurrency must be a whole number >= 1, not {concurrency!r:.80}",
                                hint="the number of runs in flight at once, e.g. concurrency=8")
        self._bench._check_open(f"run chain {self.name!r}")
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
            self._bench._check_inputs(self.spec, items[-1])
        batch = RunBatch(self.name, items)
        if resume is not None:
            reuse(batch, resume)
        self.last_batch = batch
        execute = partial(self._bench._execute, self.spec, session=session)
        return run_all(batch, execute, concurrency, errors, self._bench._chain_threads)

    def __repr__(self) -> str:
        arrows = ", ".join(f"{h.name}<-[{','.join(h.deps)}]" if h.deps else h.name for h in self.spec.hops)
        return f"<Chain {self.name!r}: {arrows}; inputs {list(self.inputs)}; output {self.spec.output!r}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>"
            f"<td><b>{html.escape(h.name)}</b></td><td>{h.kind}</td><td>{html.escape(h.model or '')}</td>"
            f"<td>{html.escape(', '.join(h.deps) or '—')}</td>"
            f"<td><pre style='margin:0'>{html.escape(h.prompt or getattr(h.call, '__qualname__', ''))}</pre></td>"
            "</tr>"
            for h in self.spec.hops
        )
        return (
            f"<div><p>Chain <b>{html.escape(self.name)}</b>: inputs {html.escape(', '.join(self.inputs) or 'none')}, "
            f"output <b>{html.escape(self.spec.output)}</b></p>"
            "<table><tr><th>hop</th><th>kind</th><th>model</th><th>uses</th><th>prompt / call</th></tr>"
            f"{rows}</table></div>"
        )
