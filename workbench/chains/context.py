"""Run records and the context store that keeps a session's history between runs."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from workbench.chains.run import Run


@dataclass(frozen=True)
class RunRecord:
    """What a session remembers of one run."""

    run_id: str
    chain: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    output: Any
    started_at: float
    duration_ms: float
    status: str = "ok"
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        """What a session keeps of ``run``."""
        return cls(
            run_id=run.id, chain=run.chain, inputs=run.inputs, outputs=dict(run.outputs), output=run.output,
            started_at=run.started_at, duration_ms=run.duration_ms, status=run.status,
            error=run.error.message if run.error is not None else None,
            meta={"config_version": run.config_version.number, "config_hash": run.config_version.digest}
            if run.config_version is not None else {},
        )


class History(Sequence[RunRecord]):
    """A session's past runs as a template sees them: iterable, and readable as plain text."""

    def __init__(self, records: Sequence[RunRecord]) -> None:
        self._records = list(records)

    @overload
    def __getitem__(self, index: int) -> RunRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RunRecord]: ...
    def __getitem__(self, index: int | slice) -> RunRecord | Sequence[RunRecord]:
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self._records)

    def __str__(self) -> str:
        turns = []
        for record in self._records:
            lines = [f"{key}: {value}" for key, value in record.inputs.items()]
            lines.append(f"output: {record.output}")
            turns.append("\n".join(lines))
        return "\n\n".join(turns)


class ContextStore(ABC):
    """Where sessions keep their run history: SQLite by default (sqlite_store.py), or in memory."""

    @abstractmethod
    def append(self, session: str, record: RunRecord) -> None:
        """Add a finished run to a session."""

    @abstractmethod
    def history(self, session: str, limit: int | None = None) -> list[RunRecord]:
        """A session's runs, oldest first; the last ``limit`` if given."""

    @abstractmethod
    def sessions(self) -> list[str]:
        """Every session with at least one run."""

    def forget(self, session: str) -> int:
        """Delete a session's runs (the conversation starts over); returns how many there were.

        A store of your own that keeps sessions for good need not: it raises NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot forget a session")

    def marked_history(self, session: str, limit: int | None = None) -> tuple[list[RunRecord], object]:
        """:meth:`history`, and a mark that :meth:`append_marked` takes back, to see whether the session was forgotten
        since (by anyone: another process on the same file). By default none: a store only this workbench uses,
        whose own forgets :class:`SessionWrites` counts."""
        return self.history(session, limit), None

    def append_marked(self, session: str, record: RunRecord, mark: object) -> bool:
        """:meth:`append`, unless the session was forgotten since :meth:`marked_history` gave ``mark``; whether the
        record was kept. By default it always is."""
        self.append(session, record)
        return True

    def close(self) -> None:
        """Release what the store holds open (the workbench calls it on close); a later use reopens."""


class InMemoryContextStore(ContextStore):
    """A thread-safe store that lives as long as the workbench."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, list[RunRecord]] = defaultdict(list)

    def append(self, session: str, record: RunRecord) -> None:
        with self._lock:
            self._runs[session].append(record)

    def history(self, session: str, limit: int | None = None) -> list[RunRecord]:
        with self._lock:
            runs = list(self._runs.get(session, ()))
        if limit is None:
            return runs
        return runs[-limit:] if limit > 0 else []

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(s for s, runs in self._runs.items() if runs)

    def forget(self, session: str) -> int:
        with self._lock:
            return len(self._runs.pop(session, ()))


class SessionWrites:
    """A store's appends and forgets, in one order: a run whose session was forgotten while it ran (between reading
    its history and finishing) is not written back, for it was built on the history that was forgotten."""

    def __init__(self, store: ContextStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._forgets: dict[str, int] = {}  # per session forgotten in this workbench: how many times

    def read(self, session: str, limit: int | None) -> tuple[list[RunRecord], tuple[int, object]]:
        """A run's session history (its last ``limit`` runs), and the mark that :meth:`append` takes back."""
        with self._lock:
            forgets = self._forgets.get(session, 0)
        records, marked = self.store.marked_history(session, limit)
        return records, (forgets, marked)

    def append(self, session: str, record: RunRecord, mark: tuple[int, object]) -> bool:
        """Keep ``record`` unless its session was forgotten since ``mark`` (here, or by another process on the
        store's file); whether it was kept."""
        forgets, marked = mark
        with self._lock:  # held through the write, so a forget cannot come between the check and the append
            if self._forgets.get(session, 0) != forgets:
                return False
            return self.store.append_marked(session, record, marked)

    def forget(self, session: str) -> int:
        """Delete the session's runs, and keep out those in flight now; returns how many were deleted."""
        with self._lock:
            forgotten = self.store.forget(session)  # first: a store that cannot forget keeps every run as before
            self._forgets[session] = self._forgets.get(session, 0) + 1
            return forgotten
