"""Experiments: workloads and the strategy comparison harness."""

from workbench.experiments.compare import CompareInterrupted, Comparison, compare
from workbench.experiments.workloads import ClosedLoop, PoissonArrivals, Workload, WorkloadResult, read_inputs

__all__ = [
    "ClosedLoop", "CompareInterrupted", "Comparison", "PoissonArrivals", "Workload", "WorkloadResult", "compare",
    "read_inputs",
]
