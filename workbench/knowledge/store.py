"""Which graph a spec's ``graph:`` names (a demo graph or a file), and a per-workbench cache of loaded graphs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import GraphError, did_you_mean
from workbench.knowledge.countries import countries
from workbench.knowledge.files import check_path, load_file
from workbench.knowledge.graph import KnowledgeGraph

logger = logging.getLogger(__name__)

# The graphs that ship with the workbench, built offline on first use.
DEMO_GRAPHS: dict[str, Callable[[], KnowledgeGraph]] = {"countries": countries}
MAX_GRAPHS_KEPT = 16  # per workbench; past it the graph used least recently goes (specs may name many files)
# And at most this many triples in all (~1 GB, by files.py's measure), past which the graph used least recently goes,
# though never the one just loaded: 16 graph files at their size limit would hold ~3 GB.
MAX_TRIPLES_KEPT = 1_000_000


@dataclass(frozen=True)
class GraphSource:
    """A demo graph by ``name``, or a file of triples by its absolute ``path``."""

    name: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.path)


def resolve(value: object, base_dir: Path | None = None) -> GraphSource:
    """What ``graph:`` names: a demo graph's name, else a path to a .csv or .json file.

    A relative path is read from ``base_dir`` (the folder of the spec file that names it), else from the working
    directory, and made absolute now, so a later ``%cd`` does not move it. Checks the file is there, regular and not
    too big; reading it is :meth:`GraphStore.get`'s.
    """
    hint = f"demo graphs: {', '.join(DEMO_GRAPHS)}; or a path to a .csv or .json file of triples"
    if not isinstance(value, str) or not value.strip():
        raise GraphError(f"graph must name a demo graph or a file, got {value!r:.80}", hint=hint)
    text = value.strip()
    # Demo graphs are plain words; anything with a folder, a home or a suffix (notes.txt) is a file.
    looks_like_path = any(sep in text for sep in ("/", "\\")) or text.startswith(("~", ".")) or bool(Path(text).suffix)
    if not looks_like_path:
        if text not in DEMO_GRAPHS:
            raise GraphError(f"unknown graph {text!r}{did_you_mean(text, DEMO_GRAPHS)}", hint=hint)
        return GraphSource(name=text)
    try:
        given = Path(text).expanduser()
    except RuntimeError:  # ~someone, with no such user
        raise GraphError(f"graph file {text[:200]!r}: no home directory for {text.partition('/')[0][:100]!r}",
                         hint=hint) from None
    relative_to = None
    if not given.is_absolute():
        relative_to = "the spec file's folder" if base_dir is not None else "the working directory"
    path = ((base_dir or Path()) / given).absolute()
    check_path(path, given=text if relative_to else None, relative_to=relative_to)
    return GraphSource(path=path)


@dataclass(frozen=True)
class Served:
    """The graph a run looks facts up in, and, where its file changed but could not be read again, why (the graph is
    then the last version that loaded)."""

    graph: KnowledgeGraph
    stale: GraphError | None = None


class GraphStore:
    """The graphs one workbench has loaded: each demo graph once, each file once per version (size, mtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: dict[object, KnowledgeGraph] = {}
        # path -> the version of the file (its key) that could not be read, and why: read once, said once.
        self._broken: dict[Path, tuple[object, GraphError]] = {}

    def cached(self, source: GraphSource) -> KnowledgeGraph | None:
        """The graph if it is loaded and (for a file) unchanged since; None if :meth:`get` would read it."""
        try:
            key = self._key(source)
        except GraphError:
            return None
        graph = self._graphs.get(key)
        if graph is not None:
            self._used(key)
        return graph

    def get(self, source: GraphSource) -> KnowledgeGraph:
        """The graph ``source`` names, loaded on first use; a file edited since is read again."""
        key = self._key(source)
        graph = self._graphs.get(key)
        if graph is not None:
            self._used(key)
            return graph
        with self._lock:  # one load per graph, however many hops ask at once
            graph = self._graphs.get(key)
            if graph is None:
                if source.name is not None:
                    graph = DEMO_GRAPHS[source.name]()
                else:
                    assert source.path is not None
                    graph = load_file(source.path)
                    self._graphs = {  # an older version of the file goes
                        k: g for k, g in self._graphs.items() if not (isinstance(k, tuple) and k[0] == source.path)
                    }
                # A new dict, never one changed in place: cached() and loaded() read it without the lock.
                self._graphs = {**self._graphs, key: graph}
                while len(self._graphs) > 1 and (len(self._graphs) > MAX_GRAPHS_KEPT
                                                 or sum(len(g) for g in self._graphs.values()) > MAX_TRIPLES_KEPT):
                    self._graphs = dict(list(self._graphs.items())[1:])
            return graph

    def _used(self, key: object) -> None:
        """Put the graph under ``key`` last in the order a full store lets graphs go in (the least recently used first),
        so a chain's graph stays however many others were looked at since it loaded."""
        if next(reversed(self._graphs), None) == key:
            return  # last already: one graph, or the same one again
        # Never waiting: the lock may be held for a file's load, and cached() runs on the event loop. A skipped move
        # only leaves this graph where it was.
        if not self._lock.acquire(blocking=False):
            return
        try:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs = {**{k: g for k, g in self._graphs.items() if k != key}, key: graph}
        finally:
            self._lock.release()

    def serve(self, source: GraphSource) -> Served:
        """The graph for a run: as :meth:`get`, but a file that changed and cannot be read now (an editor's save half
        done, a bad edit, the file gone) leaves the last version that loaded serving, and says why (logged, and read,
        once per version of the file) instead of failing every run until the file is mended. With no earlier
        version: raises.
        """
        path = source.path
        if path is not None:
            broken = self._broken.get(path)
            last = self._last_good(path)
            if broken is not None and last is not None and broken[0] == self._version(source):
                return Served(last, broken[1])
        try:
            graph = self.get(source)
        except GraphError as error:
            last = self._last_good(path) if path is not None else None
            if path is None or last is None:
                raise
            with self._lock:
                self._broken[path] = (self._version(source), error)
            logger.warning("%s; knowledge hops keep the graph it held before (%d triples) until it is mended",
                           error.message, len(last))
            return Served(last, error)
        if path is not None and path in self._broken:
            with self._lock:
                self._broken.pop(path, None)
        return Served(graph)

    def _version(self, source: GraphSource) -> object:
        """The version of ``source``'s file as :meth:`get` keys it; None while it is gone or no file."""
        try:
            return self._key(source)
        except (GraphError, OSError):
            return None

    def _last_good(self, path: Path) -> KnowledgeGraph | None:
        with self._lock:  # another run's get() may be adding a graph: iterating the dict then would raise
            versions = [g for k, g in self._graphs.items() if isinstance(k, tuple) and k[0] == path]
        return versions[-1] if versions else None

    def loaded(self) -> dict[str, KnowledgeGraph]:
        """The graphs loaded so far, by demo name or path."""
        return {str(k[0]) if isinstance(k, tuple) else str(k): g for k, g in self._graphs.items()}

    @staticmethod
    def _key(source: GraphSource) -> object:
        if source.name is not None:
            return source.name
        assert source.path is not None
        try:
            info = source.path.stat()
        except OSError:
            check_path(source.path)  # says why
            raise
        return (source.path, info.st_size, info.st_mtime_ns)
