"""Which modules a chain spec's ``call:`` may name: the user's own code, and the modules they allowed besides."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# The workbench's own example hops, which the README's specs and the demo name.
DEMO_MODULE = "workbench.demo"
_INSTALLED_DIRS = frozenset({"site-packages", "dist-packages"})
# True while a spec that came over the wire is parsed (a gateway's POST /v1/chains): see :func:`served_spec`.
_SERVED: ContextVar[bool] = ContextVar("workbench_served_spec", default=False)


@contextmanager
def served_spec() -> Iterator[None]:
    """Parse chain specs in this block as a server must: ``call:`` may name only the allowed modules.

    A spec a client sent is not the server owner's code, so the server's own modules (its
    ``__main__``, its working directory, PYTHONPATH) are refused too, not only installed packages.
    """
    token = _SERVED.set(True)
    try:
        yield
    finally:
        _SERVED.reset(token)


def serving() -> bool:
    """True while a spec that came over the wire is parsed (inside :func:`served_spec`)."""
    return _SERVED.get()


def listed(module: str, allowed: Collection[str]) -> bool:
    """True if ``module`` or a package above it is in ``allowed``."""
    return any(module == name or module.startswith(name + ".") for name in allowed)


def refusal(module: str, allowed: Collection[str]) -> str | None:
    """Why a spec may not call into ``module`` (None: it may), decided without importing it.

    A spec may call into the notebook (``__main__``), the user's own modules (files outside the
    standard library and outside site-packages: the working directory, PYTHONPATH, a project
    installed in editable mode) and ``workbench.demo``; into anything else only if ``allowed``
    lists it or a package above it. Deciding by where a module lives, not by a list of dangerous
    names, means a module nobody thought of is refused too.
    """
    if module == DEMO_MODULE or listed(module, allowed):
        return None
    if _SERVED.get():
        return "a spec sent to a server may call only the modules the server allows (autoglm serve --allow-module)"
    if module == "__main__":
        return None
    top = module.partition(".")[0]
    if top == "workbench":
        return "it is part of the workbench itself"
    if top in sys.stdlib_module_names:
        return "it is part of Python's standard library"
    locations = _locations(top)
    if locations is None:
        return None  # no such module: importing it says so
    if locations == [""]:
        return "it is built into Python"
    # A namespace package spans folders: one of them installed (google, opentelemetry) is enough to refuse it, as
    # a folder of that name in the working directory would otherwise let the spec reach the installed parts.
    for location in locations:
        if _INSTALLED_DIRS.intersection(Path(location).parts):
            return "it is an installed package"
        if any(_under(location, sysconfig.get_path(key)) for key in ("stdlib", "platstdlib")):
            return "it is part of Python's standard library"
    return None


def _locations(top: str) -> list[str] | None:
    """The file, or the folders, a top-level module comes from; [""] if it has none (built in, frozen); None if not
    found.

    ``find_spec`` of a top-level name searches the path without running any of the module's code.
    """
    module = sys.modules.get(top)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None if module is None else [str(getattr(module, "__file__", "") or "")]
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return [spec.origin]
    return list(spec.submodule_search_locations or ()) or [""]


def _under(path: str, folder: str | None) -> bool:
    if not folder:
        return False
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False
