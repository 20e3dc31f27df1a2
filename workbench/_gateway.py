"""The slot through which ``Workbench.serve`` reaches the gateway, a layer above it (``workbench.fronts.server``).

Layers import downward only, so ``workbench.bench`` may not import the gateway. The root package
(``workbench/__init__.py``, which Python runs before any of its submodules) fills this slot with a
function that imports the gateway on its first call; ``bench.serve`` calls whatever is here. So
the one upward step happens at run time, through the root package, and import-linter's layers hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``start_server(bench, chains=..., port=..., host=..., auth=..., **options)`` -> a running Server.
start_server: Callable[..., Any] | None = None
