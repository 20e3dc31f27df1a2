"""The comparison dashboard: pick strategies, run them with a progress bar, watch the table and plot fill in."""

from __future__ import annotations

import html
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import traitlets

from workbench.errors import StrategyError, describe
from workbench.experiments import Comparison, compare
from workbench.experiments.workloads import as_inputs
from workbench.fronts.notebook.widgets._background import Background, StatusBox, text_fallback

if TYPE_CHECKING:
    from workbench.chains.chain import Chain
    from workbench.engine.batching import BatchingPolicy
    from workbench.engine.preloading import PreloadingStrategy

# Offered by default; any name parse_policy or set_preloading reads may be passed in instead.
BATCHING_CHOICES = ("none", "static:8", "dynamic:16:5ms", "continuous")
PRELOADING_CHOICES = ("lazy", "eager", "prefetch")


def _name(strategy: BatchingPolicy | PreloadingStrategy | str) -> str:
    """The short name a picker lists: a strategy object's ``name``, or the name as given."""
    return strategy if isinstance(strategy, str) else strategy.name


def _slider(value: int, low: int, high: int, description: str) -> w.IntSlider:
    """A slider from ``low`` to ``high`` that reaches ``value`` too: a slider clamps a value outside its range, and
    the workload asked for (``--concurrency 100``) must be the one that runs, or be refused by compare."""
    return w.IntSlider(value=value, min=min(low, value), max=max(high, value), description=description)


class ComparisonDashboard(StatusBox):
    """Compare batching policies and preloading strategies on a chain, from a form.

    Pick strategies and the workload, press run: :func:`workbench.compare` runs off the
    kernel's thread, the progress bar counts passes, and the table and the throughput/latency
    plot redraw after every pass. The finished :class:`Comparison` is ``comparison``; a run refused before its
    first pass (a strategy a model cannot run) leaves the last one there, as its table stays shown.
    ``batching`` and ``preloading`` are picked at first; like :func:`workbench.compare`, they
    take strategy objects or names.
    ``arrival_rate`` and ``seed`` go to :func:`workbench.compare` as they are (open loop);
    ``save`` is a ``.csv`` or ``.parquet`` path the finished table is written to.
    """

    running = traitlets.Bool(False)

    def __init__(
        self,
        chain: Chain,
        inputs: Iterable[Mapping[str, Any]],
        *,
        batching: Sequence[BatchingPolicy | str] = ("none", "dynamic:16:5ms"),
        preloading: Sequence[PreloadingStrategy | str] = (),
        concurrency: int = 8,
        repeats: int = 2,
        warmup: int = 1,
        arrival_rate: float | None = None,
        seed: int = 0,
        save: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.chain = chain
        self.inputs = as_inputs(inputs)
        self._open_loop = {"arrival_rate": arrival_rate, "seed": seed}
        self._save = save
        self.comparison: Comparison | None = None
        self._last: Comparison | None = None
        self._job = Background("workbench-compare", self._fail)
        has_preloading = hasattr(chain.bench, "set_preloading")
        # As wb.compare takes them: objects or names; the pickers list names.
        batching, preloading = [_name(b) for b in batching], [_name(p) for p in preloading]
        self.batching = w.SelectMultiple(options=list(dict.fromkeys([*BATCHING_CHOICES, *batching])),
                                         value=tuple(batching), description="batching", rows=5)
        self.preloading = w.SelectMultiple(options=list(dict.fromkeys([*PRELOADING_CHOICES, *preloading])),
                                           value=tuple(preloading), description="preloading", rows=5,
                                           disabled=not has_preloading,
                                           tooltip="none picked: leave preloading as the workbench has it")
        self.concurrency = _slider(concurrency, 1, 64, "concurrency")
        self.repeats = _slider(repeats, 1, 10, "repeats")
        self.warmup = _slider(warmup, 0, 10, "warm-up")
        self.run_button = w.Button(description="run comparison", icon="play", button_style="success",
                                   layout=w.Layout(width="12em"))
        self.progress = w.IntProgress(value=0, min=0, max=1, description="passes", bar_style="info")
        self.table = w.HTML(layout=w.Layout(overflow="auto", max_width="100%"))
        self.plot = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self._status = w.HTML()
        self._error = w.HTML()
        self.run_button.on_click(lambda _: self.run())
        # Only a rate that is a number is said here; any other is refused by compare, in the error line, at run.
        rated = isinstance(arrival_rate, numbers.Real) and not isinstance(arrival_rate, bool) and arrival_rate
        load = f", Poisson arrivals at {arrival_rate:g}/s" if rated else ""
        header = w.HTML(f"<b>Compare strategies on chain {html.escape(chain.name)}</b>: {len(self.inputs)} inputs{load}")
        super().__init__(
            [
                header,
                w.HBox([self.batching, self.preloading]),
                w.HBox([self.concurrency, self.repeats, self.warmup], layout=w.Layout(flex_flow="row wrap")),
                w.HBox([self.run_button, self.progress, self._status]),
                self._error,
                self.table,
                self.plot,
            ],
            **kwargs,
        )
        self.add_class("autoglm-comparison")

    def __repr__(self) -> str:
        inputs = f"{len(self.inputs)} input{'s' if len(self.inputs) != 1 else ''}"
        axes = (self.batching, self.preloading)
        picked = [f"{axis.description} {', '.join(axis.value)}" for axis in axes if axis.value]
        return text_fallback(self, "; ".join([f"chain {self.chain.name!r}, {inputs}", *picked]))

    def run(self) -> bool:
        """Start the comparison off the kernel's thread; False (and a message) if one is still running."""
        if self._job.running:
            self._refuse_while_busy("a comparison is still running; wait for it to finish")
            return False
        batching = list(self.batching.value) or None
        preloading = list(self.preloading.value) or None
        strategies = len(batching or [None]) * len(preloading or [None])
        self.progress.max = strategies * self.repeats.value
        self.progress.value = 0
        self.progress.bar_style = "info"
        # Put back if this run fails before its first pass (a strategy refused): the table still shows it.
        self._last, self.comparison = self.comparison, None
        self.error = ""
        self.status = f"running {strategies} strategies x {self.repeats.value} repeats ..."
        self.running = True
        settings = {"concurrency": self.concurrency.value, "repeats": self.repeats.value, "warmup": self.warmup.value,
                    **self._open_loop}

        def job() -> None:
            comparison = compare(self.chain, self.inputs, batching=batching, preloading=preloading, progress=False,
                                 on_pass=self._show, **settings)
            self._show(comparison)
            self.comparison = comparison
            self.progress.bar_style = "success"
            self.status = "done"
            if self._save:
                try:
                    self.status = f"done; saved to {comparison.save(self._save)}"
                except StrategyError as exc:  # the comparison finished, and stays in .comparison: only the file failed
                    self.error = describe(exc, hint=True)

        return self._job.start(job, on_done=self._done)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a comparison started from the widget to finish."""
        self._job.wait(timeout)

    def _show(self, partial: Comparison) -> None:
        # Table and plot first: whoever watches the progress bar then sees them include this pass.
        self.table.value = partial.readable().to_html("autoglm-comparison-table")
        self.plot.value = partial.plot()._repr_png_()
        self.progress.value = len(partial.passes())
        self.status = f"{self.progress.value} of {self.progress.max} passes"

    def _done(self) -> None:
        self.running = False
        self._job_ended()

    def _fail(self, message: str) -> None:
        self.progress.bar_style = "danger"
        self.status = ""
        if self.progress.value == 0 and self._last is not None:  # no pass of this run replaced it in the table
            self.comparison = self._last
            self.status = "the table shows the last comparison that finished"
        self.error = message

    @traitlets.observe("running")
    def _disable_while_running(self, change: dict[str, Any]) -> None:
        self.run_button.disabled = change["new"]
