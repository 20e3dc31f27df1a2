"""What a streamed run tells as it goes: hops starting and finishing, tokens as they arrive, failed attempts, the run
at its end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.chains.run import Run


@dataclass(frozen=True)
class HopStarted:
    """A hop began (its template rendered next, then its model or call)."""

    hop: str
    kind: str = "hop_started"


@dataclass(frozen=True)
class Token:
    """One token of an LLM hop's answer, with the text it adds (may be empty mid-character).

    ``token_id`` is -1 (``NO_TOKEN_ID``) for text that came without ids: a server's chunk, or a whole answer
    from the exact cache, streamed as one piece.
    """

    hop: str
    text: str
    token_id: int
    kind: str = "token"


@dataclass(frozen=True)
class AttemptFailed:
    """One attempt of a hop failed (``route``: ``model:NAME`` or ``hop:NAME``, ``error`` says why). Tokens it
    streamed are void: the hop's next attempt or fallback answers afresh, or, with none left, the hop fails."""

    hop: str
    attempt: int
    route: str
    error: str
    kind: str = "attempt_failed"


@dataclass(frozen=True)
class HopFinished:
    """A hop ended with ``output`` after ``duration_ms``."""

    hop: str
    output: Any
    duration_ms: float
    kind: str = "hop_finished"


@dataclass(frozen=True)
class RunFinished:
    """The run ended; ``run`` is the Run (with ``error`` set if a hop failed)."""

    run: Run
    kind: str = "run_finished"


Event = HopStarted | Token | AttemptFailed | HopFinished | RunFinished
