"""The gateway: served chains over REST + SSE, JSON-RPC, OpenAI-compatible routes and gRPC, behind auth.

``bench.serve(chains=[chain], port=8000)`` or ``autoglm serve --spec qa.yaml --model tiny=tiny``.
Names import on first use, so ``autoglm keys ...`` (which needs only ``auth``) never loads the web stack.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.fronts.server.app import Gateway, create_app
    from workbench.fronts.server.server import Server, ServeError, serve

_HOMES = {"Gateway": "app", "create_app": "app", "Server": "server", "ServeError": "server", "serve": "server"}
__all__ = sorted([*_HOMES, "check_serve_extra"])

# What serving imports beyond the core install: the ``serve`` extra (pyproject.toml).
_SERVE_MODULES = ("uvicorn", "starlette", "fastapi", "msgspec", "zstandard", "jwt", "grpc", "google.protobuf",
                  "prometheus_client")


def check_serve_extra() -> None:
    """Refuse, with the install that fixes it, to serve where the ``serve`` extra is missing: else a bare
    ModuleNotFoundError from the middle of the web stack's imports."""
    from workbench.errors import WorkbenchError

    missing = []
    for module in _SERVE_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing (google, for google.protobuf)
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise WorkbenchError(f"serving chains needs packages this environment lacks: {', '.join(missing)}",
                             hint="pip install 'autoglm-workbench[serve]'")


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'workbench.fronts.server' has no attribute {name!r}")
    check_serve_extra()
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
