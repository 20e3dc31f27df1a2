"""The gateway: served chains over REST + SSE, JSON-RPC, OpenAI-compatible routes and gRPC, behind auth.

``bench.serve(chains=[chain], port=8000)`` or ``autoglm serve --spec qa.yaml --model tiny=tiny``.
Names import on first use, so ``autoglm keys ...`` (which needs only ``auth``) never loads the web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.fronts.server.app import Gateway, create_app
    from workbench.fronts.server.server import Server, ServeError, serve

_HOMES = {"Gateway": "app", "create_app": "app", "Server": "server", "ServeError": "server", "serve": "server"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'workbench.fronts.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
