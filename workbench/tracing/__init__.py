"""Tracing: the workbench's own OpenTelemetry provider, GenAI attributes, and trace tables and plots."""

from workbench.tracing.provider import Tracing, mark_error
from workbench.tracing.trace import Trace

__all__ = ["Trace", "Tracing", "mark_error"]
