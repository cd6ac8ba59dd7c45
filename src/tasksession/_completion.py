"""Run cleanup to its end, whatever cancels the caller.

Cleanup that talks to the database (COMMIT, ROLLBACK, closing a session) must
never be cut off half-way: a COMMIT interrupted after it was sent leaves the
outcome unknown, a ROLLBACK interrupted leaves a connection in doubt. Two kinds
of cancellation can arrive while it runs:

* anyio cancel scopes, which re-deliver the cancellation on every loop
  iteration until the task leaves the scope (``asyncio.shield`` alone does not
  stop them: the waiting task is cancelled again and again);
* a native ``Task.cancel()`` (``asyncio.timeout``, an asyncio TaskGroup, a
  framework), which goes through anyio's shield.

:func:`run_to_completion` runs the cleanup in a task of its own that refuses
cancellation from outside, and waits for it: a cancellation of the caller
(either kind) is delivered to the caller once the cleanup finished. The happy
path costs less than SQLAlchemy's own ``async with AsyncSession()`` exit (a
task and an ``asyncio.shield``): a task. The caller never returns before the
cleanup finished.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

__all__ = ["run_to_completion"]

T = TypeVar("T")


class _Unstoppable(asyncio.Task[T]):
    """A task that refuses to be cancelled from outside: the cleanup runs to its end.

    A task awaiting it that gets cancelled (anyio's cancel scopes and
    ``Task.cancel()`` both call ``cancel()`` on what it awaits) keeps waiting,
    and the cancellation is delivered to it once the cleanup finished: what
    ``asyncio.shield`` does, without its extra future and loop iteration.
    Shutting the loop down (``asyncio.run`` cancels every task) waits for it
    too: a COMMIT under way is never abandoned.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        return False


async def run_to_completion(
    cleanup: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None
) -> T:
    """Await ``cleanup`` in its own task, so that no cancellation can cut it short.

    A cancellation from an anyio cancel scope is not re-raised here: the cleanup
    ends as if shielded, its result or error is returned or raised (so an
    exception being handled is never replaced by the cancellation), and anyio
    delivers the cancellation again at the caller's next checkpoint. A native
    ``Task.cancel()`` is re-raised once the cleanup finished.
    """
    # ``loop``: the running loop, when the caller knows it (get_running_loop()
    # costs a getpid() system call on CPython 3.11).
    task = _Unstoppable(cleanup, loop=loop or asyncio.get_running_loop())
    try:
        return await task
    except asyncio.CancelledError as cancelled:
        if task.cancelled():
            raise  # the cleanup itself was cancelled (from within)
        # The caller was cancelled meanwhile; the cleanup has finished.
        # -inf: the innermost anyio cancel scope was cancelled (anyio re-delivers);
        # otherwise the cancellation came from Task.cancel() and must be kept.
        if anyio.current_effective_deadline() == -math.inf:
            return task.result()
        # The cancellation wins. A failure of the cleanup is kept as a note (its
        # own code logged it), never raised in place of the cancellation.
        failure = task.exception()
        if failure is not None:
            cancelled.add_note(f"tasksession: cleanup after this cancellation failed: {failure!r}")
        raise
