"""What the widgets share: one job at a time off the kernel's thread, status and error lines, a text fallback."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as w
import traitlets

from workbench.errors import describe


def text_fallback(widget: object, summary: str) -> str:
    """What a widget shows where no widget can be drawn: a saved notebook not yet run, a terminal."""
    # ipywidgets and anywidget put repr() in the text/plain output, which a notebook keeps when saved.
    return f"{type(widget).__name__} widget: {summary} (run the cell to see it)"


def discard(widgets: Iterable[w.Widget]) -> None:
    """Close widgets a view no longer shows, with their children, layouts and styles.

    ipywidgets keeps every widget it made (and its comm, and its model in the browser) until it is closed: a table
    redrawn on each refresh otherwise grows the kernel's memory by every cell it ever drew.
    """
    for widget in widgets:
        discard(getattr(widget, "children", ()))
        for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
            if isinstance(part, w.Widget):
                part.close()
        widget.close()


class Background:
    """Runs a widget's long job (a load, a chain run, a comparison) in a daemon thread.

    The kernel stays free while the job runs; ipywidgets traits may be set from that thread
    and reach the browser as they change. A job that raises reports ``describe(error)`` to
    ``on_error`` instead of printing a traceback.
    """

    def __init__(self, name: str, on_error: Callable[[str], None]) -> None:
        self._name = name
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, job: Callable[[], Any], on_done: Callable[[], None] | None = None) -> bool:
        """Start ``job`` unless one is still running (then returns False: a double click does nothing)."""
        with self._lock:
            if self.running:
                return False
            self._thread = threading.Thread(target=self._main, args=(job, on_done), name=self._name, daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running job (if any) has finished; for scripts, tests and notebook cells."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _main(self, job: Callable[[], Any], on_done: Callable[[], None] | None) -> None:
        try:
            job()
        except Exception as error:  # noqa: BLE001 - every failure belongs in the widget, not on stderr
            self._on_error(describe(error, hint=True))
        finally:
            if on_done is not None:
                on_done()


class StatusBox(w.VBox):
    """A widget with a status line and an error line: set ``status`` or ``error`` and the line shows it.

    Subclasses create ``self._status`` and ``self._error`` (``w.HTML``) where their layout wants them.
    """

    status = traitlets.Unicode("")
    error = traitlets.Unicode("")
    _status: w.HTML
    _error: w.HTML

    @traitlets.observe("status")
    def _show_status(self, change: dict[str, Any]) -> None:
        self._status.value = html.escape(change["new"])

    @traitlets.observe("error")
    def _show_error(self, change: dict[str, Any]) -> None:
        message = change["new"]
        self._error.value = f"<span style='color:#c00'>{html.escape(message)}</span>" if message else ""

    def _refuse_while_busy(self, message: str) -> None:
        """Say a click came while a job runs; the line goes when that job ends (it said nothing about the job)."""
        self.error = self._busy_message = message

    def _job_ended(self) -> None:
        if self.error and self.error == getattr(self, "_busy_message", None):
            self.error = ""
