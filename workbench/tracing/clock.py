"""The clock spans are stamped with: epoch nanoseconds that never jump.

``time.time_ns()`` follows the wall clock, which an NTP step, a user setting the time or a laptop waking
can move by hours; a span that began before such a jump and ended after it had a duration of minus an
hour. Here the epoch time is read once, when the workbench is imported, and the monotonic clock counts on
from it, so every difference between two stamps is a true duration. Absolute stamps stay within the
clock's slew of the wall clock (a few parts per million).
"""

from __future__ import annotations

import time

_WALL0_NS = time.time_ns()
_PERF0_NS = time.perf_counter_ns()


def now_ns() -> int:
    """Epoch nanoseconds now, on the monotonic clock (see the module's docstring)."""
    return _WALL0_NS + time.perf_counter_ns() - _PERF0_NS


def from_perf(perf_s: float) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds on the same clock as :func:`now_ns`."""
    return _WALL0_NS + int(perf_s * 1e9) - _PERF0_NS
