"""What a chain needs from whoever runs it: the small protocol the Workbench implements, so chains hold no Workbench."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from workbench.chains.events import Event
    from workbench.chains.run import Run
    from workbench.chains.spec import ChainSpec

T = TypeVar("T")
HOP_THREADS = "workbench-hop"  # how the threads that Python hops and templates run in are named


class ChainHost(Protocol):
    """Runs chain specs on its event loop; checks that it is still open."""

    def check_open(self, doing: str) -> None:
        """Raise WorkbenchClosed (saying ``doing``) once the host is closed."""
        ...

    def arun_spec(
        self,
        spec: ChainSpec,
        inputs: Mapping[str, Any],
        session: str | None = None,
        events: Callable[[Event], None] | None = None,
    ) -> Awaitable[Run]:
        """Run ``spec`` once on the host's loop (awaitable from any loop)."""
        ...

    def check_blocking(self) -> None:
        """Raise WorkbenchError when called on the host's own loop, where a blocking wait would wait for itself."""
        ...

    def run_sync(self, coroutine: Coroutine[Any, Any, T], on_interrupt: Callable[[], None] | None = None) -> T:
        """Run ``coroutine`` on the host's loop and wait for it in this thread.

        On Ctrl-C: ``on_interrupt()`` when given (the coroutine goes on), else the coroutine is cancelled;
        then the KeyboardInterrupt is raised here.
        """
        ...

    def start(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coroutine`` on the host's loop and return at once; the future answers when it ends."""
        ...

    def run_async(self, coroutine: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run ``coroutine`` on the host's loop, awaited from whichever loop the caller is on."""
        ...
