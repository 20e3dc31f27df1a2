"""The model manager: what is loaded where, load and unload buttons, and memory per device."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import traitlets

from workbench.bench import Workbench, current
from workbench.models.devices import available_devices, device_capacity, supported_dtypes
from workbench.fronts.notebook.widgets._background import Background, StatusBox, discard, text_fallback
from workbench.models.tiny import resolve_source
from workbench.tables import Readable

# Columns of bench.models() shown in the table, in order; "health" appears when the engine reports it.
COLUMNS = ("name", "device", "dtype", "params", "memory_mb", "health", "state")
_GRID = "minmax(6em, 1.2fr) 0.8fr 0.8fr 0.9fr 0.9fr 0.8fr 0.8fr 6.5em"


class ModelManager(StatusBox):
    """Known models with their device, dtype, memory, health and state, and the means to change them.

    ``bench`` defaults to ``wb.current()``. Loading runs off the kernel's thread; a failure shows
    in the widget's error line (``error``). ``refresh()`` re-reads the models after changes made
    elsewhere (the refresh button does the same).
    """

    busy = traitlets.Bool(False)

    def __init__(self, bench: Workbench | None = None, **kwargs: Any) -> None:
        self.bench = bench if bench is not None else current()
        self._job = Background("workbench-model-manager", self._fail)
        self.table = w.GridBox(layout=w.Layout(grid_template_columns=_GRID, grid_gap="2px 8px", width="100%"))
        self.memory = w.VBox()
        self.actions: dict[str, w.Button] = {}
        self.name = w.Text(value="tiny", description="name", layout=w.Layout(width="14em"))
        self.source = w.Text(
            value="tiny", description="source", placeholder="directory, hub id, or tiny",
            layout=w.Layout(width="24em"),
        )
        self.device = w.Dropdown(options=["auto", *available_devices()], value="auto", description="device",
                                 layout=w.Layout(width="12em"))
        self.dtype = w.Dropdown(options=supported_dtypes("auto"), value="auto", description="dtype",
                                layout=w.Layout(width="12em"))
        self.load_button = w.Button(description="load", button_style="primary", icon="upload")
        self.refresh_button = w.Button(description="refresh", icon="refresh", layout=w.Layout(width="7em"))
        self._status = w.HTML()
        self._error = w.HTML()
        self.device.observe(self._device_changed, "value")
        self.load_button.on_click(lambda _: self.load())
        self.refresh_button.on_click(lambda _: self.refresh())
        form = w.HBox([self.name, self.source, self.device, self.dtype, self.load_button, self.refresh_button],
                      layout=w.Layout(flex_flow="row wrap"))
        super().__init__(
            [w.HTML("<b>Models</b>"), self.table, w.HTML("<b>Memory</b>"), self.memory, form, self._status,
             self._error],
            **kwargs,
        )
        self.add_class("autoglm-model-manager")
        self.refresh()

    # -- actions -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the model the form describes, off the kernel's thread; False if a job is already running."""
        name, source = self.name.value.strip(), self.source.value.strip()
        device, dtype = self.device.value, self.dtype.value

        def job() -> None:
            model = self.bench.load(name, resolve_source(source), device=device, dtype=dtype)
            self.status = f"loaded {name!r} on {model.device} in {model.load_s:.2f} s"

        return self._start(job, f"loading {name!r} from {source} ...")

    def unload(self, name: str) -> bool:
        """Unload ``name`` (its worker finishes the batch in flight first), off the kernel's thread."""

        def job() -> None:
            freed = self.bench.unload(name)
            self.status = f"unloaded {name!r}, freed {freed / 2**20:.1f} MiB"

        return self._start(job, f"unloading {name!r} ...")

    def load_registered(self, name: str) -> bool:
        """Load a model that was registered (known, not loaded yet) with its registered settings."""

        def job() -> None:
            model = self.bench.load(name)
            self.status = f"loaded {name!r} on {model.device} in {model.load_s:.2f} s"

        return self._start(job, f"loading {name!r} ...")

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a load or unload started from the widget to finish."""
        self._job.wait(timeout)

    def refresh(self) -> None:
        """Redraw the table and the memory bars from the workbench's current models."""
        models = self.bench.models()
        self._summary = ", ".join(
            f"{row['name']} {row['state']}" + (f" on {row['device']}" if row["state"] == "loaded" else "")
            for row in models.to_dict("records")
        ) or "no models yet"
        columns = [c for c in COLUMNS if c in models.columns]
        header = [w.HTML(f"<b>{c}</b>") for c in columns]
        cells: list[w.Widget] = [*header, *[w.HTML("") for _ in range(len(COLUMNS) - len(columns))], w.HTML("")]
        self.actions = {}
        shown = Readable(models[columns])
        for index, row in enumerate(models.to_dict("records")):
            cells += [w.HTML(html.escape(text)) for text in shown.row(index).values()]
            cells += [w.HTML("") for _ in range(len(COLUMNS) - len(columns))]
            button = self._action_button(row["name"], row["state"])
            self.actions[row["name"]] = button
            cells.append(button)
        if models.empty:
            cells.append(w.HTML("<i>no models yet: fill in the form below and press load</i>",
                                layout=w.Layout(grid_column="1 / -1")))
        drawn = self.table.children
        self.table.children = cells
        discard(drawn)
        self._draw_memory(models)

    def __repr__(self) -> str:
        return text_fallback(self, self._summary)

    # -- drawing -------------------------------------------------------------------------------

    def _action_button(self, name: str, state: str) -> w.Button:
        if state == "loaded":
            button = w.Button(description="unload", icon="eject", button_style="warning",
                              tooltip=f"unload {name}", layout=w.Layout(width="6.5em"))
            button.on_click(lambda _: self.unload(name))
        else:
            button = w.Button(description="load", icon="upload", tooltip=f"load {name} as registered",
                              layout=w.Layout(width="6.5em"))
            button.on_click(lambda _: self.load_registered(name))
        button.disabled = self.busy
        return button

    def _draw_memory(self, models: Any) -> None:
        loaded = models[models["state"] == "loaded"]
        bars = []
        for device in available_devices():
            used_mb = float(loaded.loc[loaded["device"] == device, "memory_mb"].fillna(0).sum())
            capacity = device_capacity(device)
            total_mb = capacity / 2**20 if capacity else max(used_mb, 1.0)
            bar = w.FloatProgress(value=min(used_mb, total_mb), min=0.0, max=total_mb, description=device,
                                  bar_style="info", layout=w.Layout(width="24em"))
            of = f" of {total_mb / 1024:.1f} GiB" if capacity else ""
            count = int((loaded["device"] == device).sum())
            label = w.HTML(f"models: {used_mb:,.1f} MiB{of} ({count} loaded)")
            bars.append(w.HBox([bar, label]))
        drawn = self.memory.children
        self.memory.children = bars
        discard(drawn)

    def _device_changed(self, change: dict[str, Any]) -> None:
        options = supported_dtypes(change["new"])
        self.dtype.options = options
        self.dtype.value = "auto"

    # -- jobs ----------------------------------------------------------------------------------

    def _start(self, job: Any, status: str) -> bool:
        if self._job.running:
            self._refuse_while_busy("a load or unload is still running; wait for it to finish")
            return False
        self.error = ""
        self.status = status
        self.busy = True
        return self._job.start(job, on_done=self._done)

    def _done(self) -> None:
        self.busy = False
        self._job_ended()
        self.refresh()

    def _fail(self, message: str) -> None:
        self.status = ""
        self.error = message

    @traitlets.observe("busy")
    def _disable_while_busy(self, change: dict[str, Any]) -> None:
        self.load_button.disabled = change["new"]
        for button in self.actions.values():
            button.disabled = change["new"]
