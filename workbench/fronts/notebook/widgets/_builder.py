"""The chain builder: edit hops in forms, see the hop graph, run with inputs and read the result in place."""

from __future__ import annotations

import graphlib
import html
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ipywidgets as w
import traitlets
import yaml

from workbench.bench import Workbench, current
from workbench.chains.chain import Chain
from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
from workbench.chains.run import Run
from workbench.chains.spec import MAX_KNOWLEDGE_HOPS, MAX_TRIPLES_PER_HOP, ChainSpec, HopSpec, parse_spec
from workbench.engine.requests import GenerationParams
from workbench.errors import WorkbenchError, describe
from workbench.fronts.notebook.widgets._background import Background, StatusBox, discard, text_fallback
from workbench.knowledge import DEFAULT_MAX_TRIPLES
from workbench.tables import Readable

_DEFAULTS = GenerationParams()
# What the hop form edits; any other field of a hop loaded from a chain is kept as it was.
_FORM_FIELDS = frozenset({"name", "kind", "model", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "call",
                          "graph", "query", "hops", "max_triples"})
_LLM_ONLY = frozenset({"seed", "truncate"})
_SPAN_INDENT = "· "
_NODE_W, _NODE_H, _GAP_X, _GAP_Y = 120, 34, 60, 14


def call_path(hop: HopSpec) -> str:
    """The dotted path of a Python hop's function, as a spec's ``call`` field writes it."""
    call = hop.call
    return f"{getattr(call, '__module__', '?')}:{getattr(call, '__qualname__', '?')}"


_S = TypeVar("_S", w.IntSlider, w.FloatSlider)


def _reaching(slider: type[_S], value: float, low: float, high: float, **kwargs: Any) -> _S:
    """A slider from ``low`` to ``high`` that reaches ``value`` too: a slider clamps a value outside its range, so a
    chain's ``max_new_tokens: 400`` or ``temperature: 3.5`` came back from the form as 256 and 2.0, and a run wrote
    them into the chain."""
    return slider(value=value, min=min(low, value), max=max(high, value), continuous_update=False,
                  style={"description_width": "9em"}, **kwargs)


class HopEditor(w.VBox):
    """One hop of the builder: its name and kind, then model, prompt and sliders, a Python call, or a graph query."""

    def __init__(
        self,
        name: str,
        models: list[str],
        *,
        kind: str = "llm",
        model: str | None = None,
        prompt: str = "",
        params: GenerationParams = _DEFAULTS,
        call: str = "",
        function: Callable[..., Any] | None = None,
        graph: str = "countries",
        query: str = "{{ question }}",
        hops: int = 1,
        max_triples: int = DEFAULT_MAX_TRIPLES,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.hop_name = w.Text(value=name, description="hop", continuous_update=False, layout=w.Layout(width="16em"))
        self.kind = w.ToggleButtons(options=["llm", "python", "knowledge"], value=kind, style={"button_width": "6em"})
        options = list(dict.fromkeys([*models, *([model] if model else [])]))
        self.model = w.Dropdown(options=options, value=model if model else (options[0] if options else None),
                                description="model", layout=w.Layout(width="14em"))
        self.prompt = w.Textarea(value=prompt, description="prompt", continuous_update=False,
                                 placeholder="Question: {{ question }}\\nAnswer:",
                                 layout=w.Layout(width="46em", height="4.5em"))
        self.max_new_tokens = _reaching(w.IntSlider, params.max_new_tokens, 1, 256, description="max_new_tokens")
        self.temperature = _reaching(w.FloatSlider, params.temperature, 0.0, 2.0, step=0.05, description="temperature")
        self.top_p = _reaching(w.FloatSlider, params.top_p, 0.05, 1.0, step=0.05, description="top_p")
        self.top_k = _reaching(w.IntSlider, params.top_k, 0, 200, description="top_k")
        # Spec fields the form has no control for (seed, retry, fallback, ...) ride along unchanged.
        self.extra = dict(extra or {})
        # A Python hop loaded from a chain keeps its function while the call box still shows its path: a function
        # defined in a notebook cell or inside another (a lambda, a closure) has a path no import can reach.
        self._function = (call, function) if function is not None else None
        self.call = w.Text(value=call, description="call", placeholder="package.module:function",
                           continuous_update=False, layout=w.Layout(width="30em"))
        self.graph = w.Text(value=graph, description="graph", placeholder="countries, or a .csv / .json of triples",
                            continuous_update=False, layout=w.Layout(width="30em"))
        self.query = w.Textarea(value=query, description="query", continuous_update=False,
                                placeholder="{{ question }}", layout=w.Layout(width="46em", height="3em"))
        self.hops_slider = w.IntSlider(value=hops, min=1, max=MAX_KNOWLEDGE_HOPS, description="hops",
                                       continuous_update=False, style={"description_width": "9em"})
        self.max_triples = w.IntSlider(value=max_triples, min=1, max=MAX_TRIPLES_PER_HOP, description="max_triples",
                                       continuous_update=False, style={"description_width": "9em"})
        self.up = w.Button(icon="arrow-up", tooltip="move up", layout=w.Layout(width="3em"))
        self.down = w.Button(icon="arrow-down", tooltip="move down", layout=w.Layout(width="3em"))
        self.remove = w.Button(icon="trash", tooltip="remove this hop", button_style="danger",
                               layout=w.Layout(width="3em"))
        self._llm = w.VBox([self.model, self.prompt,
                            w.HBox([self.max_new_tokens, self.temperature]), w.HBox([self.top_p, self.top_k])])
        self._python = w.VBox([self.call])
        self._knowledge = w.VBox([self.graph, self.query, w.HBox([self.hops_slider, self.max_triples])])
        self._head = w.HBox([self.hop_name, self.kind, self.up, self.down, self.remove])
        super().__init__(layout=w.Layout(border="1px solid #ddd", padding="4px", margin="2px 0"))
        self.kind.observe(lambda _: self._show_kind(), "value")
        self._show_kind()

    @property
    def controls(self) -> list[w.Widget]:
        """The value widgets whose changes alter the spec."""
        return [self.hop_name, self.kind, self.model, self.prompt, self.max_new_tokens, self.temperature,
                self.top_p, self.top_k, self.call, self.graph, self.query, self.hops_slider, self.max_triples]

    def spec(self) -> dict[str, Any]:
        """This hop as a chain spec entry."""
        name = self.hop_name.value.strip()
        if self.kind.value == "python":
            kept = {k: v for k, v in self.extra.items() if k not in _LLM_ONLY}
            call: str | Callable[..., Any] = self.call.value.strip()
            if self._function is not None and call == self._function[0]:
                call = self._function[1]
            return {"name": name, "call": call, **kept}
        if self.kind.value == "knowledge":  # the form edits every field a knowledge hop has
            return {"name": name, "kind": "knowledge", "graph": self.graph.value.strip(), "query": self.query.value,
                    "hops": self.hops_slider.value, "max_triples": self.max_triples.value}
        # A chat hop's messages ride along in extra; its prompt box stays empty, and an empty prompt beside them
        # would make the spec invalid (a hop takes one or the other).
        chat = "messages" in self.extra and not self.prompt.value
        return {
            "name": name,
            "model": self.model.value,
            **({} if chat else {"prompt": self.prompt.value}),
            "max_new_tokens": self.max_new_tokens.value,
            "temperature": round(self.temperature.value, 4),
            "top_p": round(self.top_p.value, 4),
            "top_k": self.top_k.value,
            **{k: v for k, v in self.extra.items() if k != "uses"},
        }

    def set_models(self, models: list[str]) -> None:
        current_model = self.model.value
        self.model.options = list(dict.fromkeys([*models, *([current_model] if current_model else [])]))
        self.model.value = current_model if current_model else (models[0] if models else None)

    def close(self) -> None:
        """Close the editor and every control it made, the forms of the kinds it does not show too."""
        discard([self._head, self._llm, self._python, self._knowledge])
        super().close()

    def _show_kind(self) -> None:
        self.children = [self._head,
                         {"llm": self._llm, "knowledge": self._knowledge}.get(self.kind.value, self._python)]


def graph_svg(spec: ChainSpec) -> str:
    """The hop graph as SVG: hops in columns by dependency depth, arrows from the hops they read."""
    deps = spec.deps()
    depth: dict[str, int] = {}
    for name in graphlib.TopologicalSorter(deps).static_order():
        depth[name] = 1 + max((depth[d] for d in deps[name]), default=-1)
    columns: dict[int, list[str]] = {}
    for hop in spec.hops:
        columns.setdefault(depth[hop.name], []).append(hop.name)
    position = {
        name: (10 + col * (_NODE_W + _GAP_X), 10 + row * (_NODE_H + _GAP_Y))
        for col, names in columns.items()
        for row, name in enumerate(names)
    }
    width = 20 + len(columns) * (_NODE_W + _GAP_X) - _GAP_X
    height = 20 + max(len(n) for n in columns.values()) * (_NODE_H + _GAP_Y) - _GAP_Y
    parts = [
        f"<svg class='autoglm-hop-graph' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>",
        (
            "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' markerHeight='7' "
            "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker></defs>"
        ),
    ]
    for hop in spec.hops:
        x2, y2 = position[hop.name]
        for dep in hop.deps:
            x1, y1 = position[dep]
            parts.append(
                f"<line x1='{x1 + _NODE_W}' y1='{y1 + _NODE_H / 2}' x2='{x2}' y2='{y2 + _NODE_H / 2}' "
                "stroke='#555' marker-end='url(#arrow)'/>"
            )
    for hop in spec.hops:
        x, y = position[hop.name]
        fill = {"llm": "#dbe5f3", "knowledge": "#f3e9d2"}.get(hop.kind, "#dcefe0")
        stroke = "stroke='#000' stroke-width='2'" if hop.name == spec.output else "stroke='#888'"
        detail = hop.model if hop.kind == "llm" else "python" if hop.knowledge is None else \
            f"graph {hop.knowledge.source.name or hop.knowledge.source.path.name}"  # type: ignore[union-attr]
        parts.append(
            f"<g class='autoglm-hop' data-hop='{html.escape(hop.name)}'>"
            f"<rect x='{x}' y='{y}' width='{_NODE_W}' height='{_NODE_H}' rx='5' fill='{fill}' {stroke}/>"
            f"<text x='{x + _NODE_W / 2}' y='{y + 14}' text-anchor='middle' font-size='12' font-weight='600'>"
            f"{html.escape(hop.name)}</text>"
            f"<text x='{x + _NODE_W / 2}' y='{y + 27}' text-anchor='middle' font-size='10' fill='#555'>"
            f"{html.escape(str(detail))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


class ChainBuilder(StatusBox):
    """Build a chain in forms and run it, without leaving the notebook.

    Add, remove, reorder and edit hops (model, prompt template, generation parameters); the hop
    graph and the spec check follow every edit. ``run()`` (the run button) builds the chain
    from the forms and runs it off the kernel's thread; the output and span table then update
    in place. Slider values apply to the next run without reloading any model, and each
    request's span records the values it ran with (``gen_ai.request.temperature``, ...).
    Start from an existing chain with ``ChainBuilder(chain=qa)``: the builder's runs then replace it on the
    workbench; another chain of the builder's name is replaced only by ``run(replace=True)``.

    The stop button (:meth:`stop`) cancels the run going. A hop's answer shows as it arrives, redrawn at most every
    ``redraw_s`` (and whole as each hop ends): the output
    is one HTML value sent whole, so a redraw per token sent 189,340 characters for a 1,254-character answer.
    """

    running = traitlets.Bool(False)
    redraw_s = 0.05

    def __init__(self, bench: Workbench | None = None, chain: Chain | None = None, **kwargs: Any) -> None:
        self.bench = bench if bench is not None else current()
        self.last_run: Run | None = None
        self.chain: Chain | None = chain  # the chain the builder edits: its runs replace it on the workbench
        self._shown = chain.version if chain is not None else None  # the version of it the form was made from
        self._last_hop: str | None = None
        self._chain_extra: dict[str, Any] = {}
        self._job = Background("workbench-chain-builder", self._fail)
        self.chain_name = w.Text(value=chain.name if chain else "my_chain", description="chain",
                                 continuous_update=False, layout=w.Layout(width="18em"))
        self.output_hop = w.Dropdown(description="output", layout=w.Layout(width="14em"))
        self.hops = w.VBox()
        self.add_button = w.Button(description="add hop", icon="plus")
        self.run_button = w.Button(description="run", icon="play", button_style="success")
        self.stop_button = w.Button(description="stop", icon="stop", button_style="warning", disabled=True)
        self._stopping = threading.Event()
        self.inputs: dict[str, w.Text] = {}
        self._input_boxes: dict[str, w.Text] = {}  # every box made, so one that comes back keeps what was typed
        self._inputs_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.graph = w.HTML()
        self._check = w.HTML()
        self._status = w.HTML()
        self._error = w.HTML()
        self.output = w.HTML()
        self.span_table = w.HTML()
        self.add_button.on_click(lambda _: self.add_hop())
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.chain_name.observe(lambda _: self._changed(), "value")
        self.output_hop.observe(lambda _: self._changed(), "value")
        super().__init__(
            [
                w.HBox([self.chain_name, self.output_hop]),
                self.hops,
                self.add_button,
                w.HTML("<b>Hop graph</b>"),
                self.graph,
                self._check,
                w.HTML("<b>Inputs</b>"),
                self._inputs_box,
                w.HBox([self.run_button, self.stop_button, self._status]),
                self._error,
                self.output,
                self.span_table,
            ],
            **kwargs,
        )
        self.add_class("autoglm-chain-builder")
        if chain is not None:
            self._load_chain(chain)
        else:
            self.add_hop()

    def __repr__(self) -> str:
        hops = " -> ".join(e.hop_name.value for e in self.hop_editors) or "no hops"
        return text_fallback(self, f"chain {self.chain_name.value!r}: {hops}")

    # -- editing -------------------------------------------------------------------------------

    @property
    def hop_editors(self) -> list[HopEditor]:
        return list(self.hops.children)  # type: ignore[arg-type]

    def add_hop(self, name: str | None = None, **fields: Any) -> HopEditor:
        """Append a hop; by default an LLM hop on the first model, reading the hop above it."""
        editors = self.hop_editors
        taken = {e.hop_name.value for e in editors}
        if name is None:
            name = next(f"hop{i}" for i in range(1, len(editors) + 2) if f"hop{i}" not in taken)
        if "prompt" not in fields and fields.get("kind", "llm") == "llm":
            above = editors[-1].hop_name.value if editors else None
            fields["prompt"] = f"{{{{ {above} }}}}\nAnswer:" if above else "Question: {{ question }}\nAnswer:"
        editor = HopEditor(name, self.bench.registry.names(), **fields)
        editor.up.on_click(lambda _: self.move_hop(editor, -1))
        editor.down.on_click(lambda _: self.move_hop(editor, +1))
        editor.remove.on_click(lambda _: self.remove_hop(editor))
        for control in editor.controls:
            control.observe(lambda _: self._changed(), "value")
        self.hops.children = [*editors, editor]
        self._changed()
        return editor

    def remove_hop(self, editor: HopEditor) -> None:
        self.hops.children = [e for e in self.hop_editors if e is not editor]
        self._changed()
        discard([editor])

    def move_hop(self, editor: HopEditor, offset: int) -> None:
        """Move a hop up (-1) or down (+1) in spec order."""
        editors = self.hop_editors
        index = editors.index(editor)
        target = min(max(index + offset, 0), len(editors) - 1)
        editors.insert(target, editors.pop(index))
        self.hops.children = editors
        self._changed()

    def spec(self) -> dict[str, Any]:
        """The chain spec the forms describe, as a dict ``bench.chain`` accepts."""
        hops = [e.spec() for e in self.hop_editors]
        spec: dict[str, Any] = {**self._chain_extra, "name": self.chain_name.value.strip(), "hops": hops}
        names = [h["name"] for h in hops]
        if self.output_hop.value in names:
            spec["output"] = self.output_hop.value
        return spec

    def refresh_models(self) -> None:
        """Offer the models loaded since the builder was made in every hop's model picker."""
        models = self.bench.registry.names()
        for editor in self.hop_editors:
            editor.set_models(models)

    # -- running -------------------------------------------------------------------------------

    def run(self, replace: bool = False) -> bool:
        """Build the chain from the forms and run it with the inputs off the kernel's thread.

        Returns False (and shows why) if the spec does not validate, a run is still going, or the workbench has a
        chain of this name that the builder was not started from and did not build (``replace=True`` replaces it).
        """
        if self._job.running:
            self._refuse_while_busy("a run is still going; wait for it to finish")
            return False
        name = self.chain_name.value.strip()
        held = self.bench.chains().get(name)
        if held is not None and held is not self.chain and not replace:
            self.error = describe(WorkbenchError(
                f"chain {name!r} is built on this workbench already, not from this builder: running here would "
                f"replace it (for %autoglm run {name}, bench.chains() and serving)",
                hint=f"rename the chain here; to edit that chain, start from it: ChainBuilder(bench, "
                f"chain=bench.chains()[{name!r}]); to replace it, builder.run(replace=True)"), hint=True)
            return False
        if held is not None and held is self.chain and self._shown is not None and not replace \
                and held.version.digest != self._shown.digest:
            self.error = describe(WorkbenchError(
                f"chain {name!r} changed since this builder showed it ({self._shown} -> {held.version}: a "
                f"%autoglm set, chain.set or its spec file): running here would undo that",
                hint=f"start again from it: ChainBuilder(bench, chain=bench.chains()[{name!r}]); to run the form as "
                f"it is, builder.run(replace=True)"), hint=True)
            return False
        try:
            chain = self.bench.chain(self.spec())
        except WorkbenchError as error:
            self.error = describe(error, hint=True)
            return False
        self.chain, self._shown = chain, chain.version
        inputs = {name: self.inputs[name].value for name in chain.inputs if name in self.inputs}
        self.error = ""
        self.status = f"running {chain.name!r} ..."
        self._stopping.clear()
        self.running = True

        def job() -> None:
            run = self._stream(chain, inputs)
            if run is None:  # stop() cut it short: what it streamed stays shown
                self.status = f"stopped {chain.name!r}: the run was cancelled"
                return
            self._show_run(run)
            if run.error is not None:
                raise run.error
            self.status = f"run {run.id}: {run.duration_ms:.1f} ms, {len(run.trace)} spans"

        return self._job.start(job, on_done=self._done)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a run started from the widget to finish."""
        self._job.wait(timeout)

    def stop(self) -> bool:
        """Cancel the run going now (the stop button), within a tenth of a second, in the middle of a hop too. False
        if none is going. What it streamed stays shown; it leaves no Run (a cancelled run's hops stop where they
        are)."""
        if not self._job.running:
            return False
        self._stopping.set()
        self.status = "stopping ..."
        return True

    def _stream(self, chain: Chain, inputs: dict[str, Any]) -> Run | None:
        """Run ``chain``, showing each hop's answer in the output area token by token as it arrives; None if
        :meth:`stop` cancelled it (leaving the loop closes the stream, which cancels the run)."""
        texts: dict[str, str] = {}
        drawn = -math.inf  # when the output was last redrawn: the first token of a run shows at once

        def draw() -> None:
            nonlocal drawn
            drawn = time.perf_counter()
            self.output.value = "".join(
                f"<div><b>{html.escape(hop)}</b> <span>{html.escape(text)}</span></div>" for hop, text in texts.items()
            )

        # The stream hears the stop between events too: a hop that streams nothing for long (a Python hop, a long
        # prefill, a model that waits on a retry) was stopped only when it ended.
        for event in chain._stream(None, inputs, self._stopping):
            if isinstance(event, HopStarted):
                texts[event.hop] = ""
                self.status = f"running {chain.name!r}: hop {event.hop!r} ..."
            elif isinstance(event, AttemptFailed):
                texts[event.hop] = ""  # what the failed attempt streamed is no answer; the next one starts afresh
            elif isinstance(event, Token):
                texts[event.hop] += event.text
                if time.perf_counter() - drawn >= self.redraw_s:
                    draw()
            elif isinstance(event, HopFinished):
                if texts.get(event.hop):
                    draw()  # the hop's whole answer, whatever the last redraw left out
            elif isinstance(event, RunFinished):
                return event.run
        if not self._stopping.is_set():
            raise AssertionError("a stream ends with its run, or at a stop")
        if texts:
            draw()
        return None

    def _show_run(self, run: Run) -> None:
        self.last_run = run
        self.output.value = run._repr_html_()
        self.span_table.value = Readable(run.trace.compact(indent=_SPAN_INDENT)).to_html("autoglm-span-table")

    def _done(self) -> None:
        self.running = False
        self._job_ended()

    def _fail(self, message: str) -> None:
        self.status = ""
        self.error = message

    # -- keeping the views in step ---------------------------------------------------------------

    def _load_chain(self, chain: Chain) -> None:
        source = chain.spec.source
        raw = yaml.safe_load(source) if isinstance(source, str) else source
        raw = raw if isinstance(raw, Mapping) else {}
        self._chain_extra = {k: v for k, v in raw.items() if k not in ("name", "hops", "output")}
        raw_hops = {h.get("name"): h for h in raw.get("hops", []) if isinstance(h, Mapping)}
        for hop in chain.spec.hops:
            extra = {k: v for k, v in raw_hops.get(hop.name, {}).items() if k not in _FORM_FIELDS}
            if hop.kind == "llm":
                self.add_hop(hop.name, kind="llm", model=hop.model, prompt=hop.prompt or "", params=hop.params,
                             extra=extra)
            elif hop.knowledge is not None:
                k = hop.knowledge
                self.add_hop(hop.name, kind="knowledge", graph=str(raw_hops.get(hop.name, {}).get("graph", k.source)),
                             query=k.query.source, hops=k.hops, max_triples=k.max_triples, extra=extra)
            else:
                self.add_hop(hop.name, kind="python", call=call_path(hop), function=hop.call, extra=extra)
        self._changed()
        self.output_hop.value = chain.spec.output

    def _changed(self) -> None:
        names = [e.hop_name.value.strip() for e in self.hop_editors]
        chosen = self.output_hop.value
        # The output follows the last hop (the spec's default) until the user picks another one.
        follow = chosen not in names or chosen == self._last_hop
        self._last_hop = names[-1] if names else None
        self.output_hop.options = names
        self.output_hop.value = self._last_hop if follow else chosen
        try:
            parsed = parse_spec(self.spec(), known_models=self.bench.registry.names(),
                                allowed_modules=self.bench.allow_modules(), graphs=self.bench.graphs)
        except WorkbenchError as error:
            self._check.value = f"<span style='color:#c00'>{html.escape(describe(error, hint=True))}</span>"
            return
        self._check.value = (
            f"<span style='color:#2a7a2a'>spec ok: {len(parsed.hops)} hops, "
            f"inputs {html.escape(', '.join(parsed.inputs) or 'none')}, output {html.escape(parsed.output)}</span>"
        )
        self.graph.value = graph_svg(parsed)
        self._sync_inputs(parsed.inputs)

    def _sync_inputs(self, names: tuple[str, ...]) -> None:
        if list(self.inputs) == list(names):
            return
        for name in names:
            if name not in self._input_boxes:
                self._input_boxes[name] = w.Text(description=name, placeholder=f"value of {name}",
                                                 layout=w.Layout(width="32em"))
        self.inputs = {name: self._input_boxes[name] for name in names}
        self._inputs_box.children = list(self.inputs.values())

    @traitlets.observe("running")
    def _disable_while_running(self, change: dict[str, Any]) -> None:
        self.run_button.disabled = change["new"]
        self.stop_button.disabled = not change["new"]
