"""A chain bound to a workbench: run it once, or map it over many inputs."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from workbench.chains.run import Run
from workbench.chains.spec import ChainSpec

if TYPE_CHECKING:
    from workbench.bench import Workbench


class Chain:
    """A validated chain spec plus the workbench that runs it."""

    def __init__(self, spec: ChainSpec, bench: Workbench) -> None:
        self.spec = spec
        self._bench = bench

    @property
    def name(self) -> str:
        return self.spec.name

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
    ) -> list[Run]:
        """Run once per input mapping, ``concurrency`` at a time; Runs come back in input order.

        A failing run does not stop the others: its Run has ``error`` set and keeps the
        outputs of the hops that finished.
        """
        items = [dict(i) for i in inputs]
        if not items:
            return []
        for item in items:  # refuse bad input before any run starts
            self._bench._check_inputs(self.spec, item)
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix=f"chain-{self.name}") as pool:
            futures = [pool.submit(self._bench._execute, self.spec, item, session) for item in items]
            return [f.result() for f in futures]

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
