"""A bound on the wait for COMMITs (``commit_timeout=``), two dict operations per COMMIT.

A COMMIT is never cut off by a cancellation (see :mod:`._completion`), so without
a bound a stalled server (a paused backend, a silent network partition) would
hold the unit until TCP gives up. A timer per COMMIT (``loop.call_later``) costs
some 40,000 instructions, 5% of a whole one-query unit of work; instead each
COMMIT records its deadline here, and one task per watchdog sleeps until the
earliest deadline among those still in flight, gives up on the expired ones,
and ends when none is left.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

__all__ = ["CommitWatchdog"]

_monotonic = time.monotonic


class _Abandons(Protocol):
    def abandon_commit(self, session: Any) -> None: ...


class CommitWatchdog:
    """Calls ``session._ts_scope.abandon_commit(session)`` for COMMITs past their deadline."""

    __slots__ = ("_deadlines", "_task")

    def __init__(self) -> None:
        self._deadlines: dict[Any, float] = {}  # session -> monotonic deadline
        self._task: asyncio.Task[None] | None = None

    def watch(self, session: Any, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the COMMIT of ``session``, due within ``timeout`` seconds."""
        self._deadlines[session] = _monotonic() + timeout
        task = self._task
        if task is None or task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="tasksession: commit watchdog")

    def done(self, session: Any) -> None:
        """The COMMIT of ``session`` ended (answered, failed or abandoned)."""
        self._deadlines.pop(session, None)

    async def _run(self) -> None:
        deadlines = self._deadlines
        try:
            while deadlines:
                now = _monotonic()
                for session in [s for s, deadline in deadlines.items() if deadline <= now]:
                    del deadlines[session]
                    scope: _Abandons = session._ts_scope
                    scope.abandon_commit(session)
                if deadlines:
                    await asyncio.sleep(min(deadlines.values()) - now)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
