"""Widgets for the notebook: model manager, chain builder, trace viewer, comparison dashboard."""

from workbench.notebook.widgets._builder import ChainBuilder
from workbench.notebook.widgets._compare import ComparisonDashboard
from workbench.notebook.widgets._models import ModelManager
from workbench.notebook.widgets._trace import TraceViewer

__all__ = ["ChainBuilder", "ComparisonDashboard", "ModelManager", "TraceViewer"]
