"""matplotlib Figures that show themselves in a notebook without pyplot or an inline backend."""

from __future__ import annotations

from io import BytesIO

from matplotlib.figure import Figure


class DisplayFigure(Figure):
    """A Figure with a PNG repr, so Jupyter draws it even when pyplot was never imported.

    The workbench builds figures without pyplot (no global state, nothing left open in a
    long-running kernel); IPython only knows how to draw plain Figures once an inline
    backend is active, so this one carries its own ``_repr_png_``.
    """

    def _repr_png_(self) -> bytes:
        buffer = BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
