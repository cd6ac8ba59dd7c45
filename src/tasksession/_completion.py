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

:func:`run_to_completion` runs the cleanup in a task of its own, so neither can
interrupt it, and waits for it. Only once a cancellation actually arrives does
it enter a shielded :class:`anyio.CancelScope` (so that anyio stops
re-delivering); the happy path costs what SQLAlchemy's own
``async with AsyncSession()`` exit costs, a task and a shield. The caller never
returns before the cleanup finished.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

__all__ = ["run_to_completion"]

_T = TypeVar("_T")


async def run_to_completion(
    cleanup: Coroutine[Any, Any, _T], loop: asyncio.AbstractEventLoop | None = None
) -> _T:
    """Await ``cleanup`` in its own task, so that no cancellation can cut it short.

    A cancellation from an anyio cancel scope is not re-raised here: the cleanup
    ends as if shielded, its result or error is returned or raised (so an
    exception being handled is never replaced by the cancellation), and anyio
    delivers the cancellation again at the caller's next checkpoint. A native
    ``Task.cancel()`` is re-raised once the cleanup finished.
    """
    # ``loop``: the running loop, when the caller knows it (get_running_loop()
    # costs a getpid() system call on CPython 3.11).
    task = (loop or asyncio.get_running_loop()).create_task(cleanup)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as error:
        if task.done():
            raise  # the cleanup itself was cancelled: nothing left to wait for
        # -inf: the innermost anyio cancel scope was cancelled (anyio re-delivers);
        # otherwise the cancellation came from Task.cancel() and must be kept.
        native = anyio.current_effective_deadline() != -math.inf
        cancelled: BaseException | None = error if native else None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as error:
                if not task.done():  # delivered to us, not the cleanup's own
                    cancelled = error  # inside the shield only Task.cancel() arrives
            except BaseException:  # noqa: BLE001 - the cleanup's error is read below
                pass
    if cancelled is None:
        return task.result()
    # The caller is being cancelled: that wins. A failure of the cleanup is kept
    # as a note (its own code logged it), never raised in place of the cancellation.
    failure = None if task.cancelled() else task.exception()
    if failure is not None:
        cancelled.add_note(f"tasksession: cleanup after this cancellation failed: {failure!r}")
    raise cancelled
