"""What a streamed run tells as it goes: hops starting and finishing, tokens as they arrive, the run at its end."""

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


Event = HopStarted | Token | HopFinished | RunFinished
