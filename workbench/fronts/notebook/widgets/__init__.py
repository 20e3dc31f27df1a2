"""Widgets for the notebook: model manager, chain builder, trace viewer, comparison dashboard."""

from workbench.fronts.notebook.widgets._builder import ChainBuilder
from workbench.fronts.notebook.widgets._compare import ComparisonDashboard
from workbench.fronts.notebook.widgets._models import ModelManager
from workbench.fronts.notebook.widgets._trace import TraceViewer

__all__ = ["ChainBuilder", "ComparisonDashboard", "ModelManager", "TraceViewer"]
