"""Background worker loops: one fresh unit of work per step, retried, stoppable.

::

    from tasksession import RetryPolicy, SessionManager
    from tasksession.workers import run_worker

    async def process_one(session: AsyncSession) -> bool:
        job = await session.scalar(
            select(Job).where(Job.status == "pending").limit(1).with_for_update(skip_locked=True)
        )
        if job is None:
            return False            # nothing to do: wait idle_delay
        job.status = "done"
        return True                 # did work: run the next step at once

    stop = anyio.Event()
    await run_worker(db, process_one, concurrency=4, stop=stop)

Every step runs in a fresh scope (a new session with an empty identity map,
committed when the step returns, rolled back when it raises), so a worker that
runs for months never accumulates objects. This module uses only the public
API of :mod:`tasksession`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
from sqlalchemy.ext.asyncio import AsyncSession

from . import RetryPolicy, SessionManager

__all__ = ["run_worker"]

logger = logging.getLogger("tasksession.workers")

Step = Callable[[AsyncSession], Awaitable[bool | None]]

#: How long a loop of steps that never wait may run before it yields to other tasks.
_YIELD_EVERY = 0.05


async def run_worker(
    db: SessionManager,
    step: Step,
    *,
    concurrency: int = 1,
    idle_delay: float = 1.0,
    retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - immutable
    stop: anyio.Event | None = None,
    name: str | None = None,
) -> None:
    """Run ``step`` over and over, each time as its own unit of work, until stopped.

    ``step(session)`` does one piece of work with the session it is given and
    returns whether it found any: ``True`` runs the next step at once, ``False``
    (or ``None``) waits ``idle_delay`` seconds first (less if ``stop`` is set).

    * Each step runs in a fresh scope: committed when it returns, rolled back
      when it raises. Inside it, :attr:`SessionManager.session` is the same session.
    * A step that fails with a serialization failure, a deadlock, a lost
      connection, or a connection that could not be opened (refused or reset
      while connecting: nothing was sent) is re-run per ``retry`` (a new scope
      each time).
    * A step that still fails is logged with its traceback on the
      ``tasksession.workers`` logger, the loop waits (``retry``'s backoff,
      growing with consecutive failures) and goes on. A COMMIT that got no
      answer is logged the same way, as :class:`~tasksession.CommitOutcomeUnknownError`,
      and never re-run (the step may have been applied).
    * ``stop.set()`` lets the running steps finish, then ``run_worker`` returns.
    * Cancelling ``run_worker`` cancels the running steps: their scopes roll back
      (nothing half-committed) and the cancellation propagates.

    :param db: the manager whose scopes the steps run in.
    :param step: ``async def step(session) -> bool``.
    :param concurrency: number of loops running ``step`` side by side, each with its
        own scopes (and connection while a step runs).
    :param idle_delay: seconds to wait after a step that found no work.
    :param retry: how a step failing with a transient database error is re-run;
        ``None`` never re-runs a step (failures are still logged and backed off).
    :param stop: set it to shut down gracefully.
    :param name: label for the scopes, tasks and log lines (default: the step's name).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency!r} must be at least 1")
    if idle_delay < 0:
        raise ValueError(f"idle_delay={idle_delay!r} must not be negative")
    label = name if name is not None else getattr(step, "__qualname__", repr(step))
    stopping = stop if stop is not None else anyio.Event()
    backoff = retry if retry is not None else RetryPolicy(attempts=1)

    async def unit() -> bool:
        return bool(await step(db.session))

    run_step = db.transactional(retry=retry, name=label)(unit)

    async def loop(number: int) -> None:
        failures = 0
        yielded = time.monotonic()
        while not stopping.is_set():
            try:
                busy = await run_step()
            except Exception:
                failures += 1
                delay = backoff.delay(failures)
                logger.exception(
                    "worker %r (loop %d): step failed (%d in a row); next step in %.2fs",
                    label,
                    number,
                    failures,
                    delay,
                )
                await _wait(stopping, delay)
                continue
            failures = 0
            if not busy:
                await _wait(stopping, idle_delay)
                yielded = time.monotonic()
            elif time.monotonic() - yielded > _YIELD_EVERY:
                # A step that never awaits would starve the event loop (and this
                # loop's own cancellation); yield now and then.
                await anyio.lowlevel.checkpoint()
                yielded = time.monotonic()

    # Loops run in tasks of their own even when there is one: called inside an
    # open scope, a loop in this task would join that scope instead of getting
    # a fresh one per step.
    async with anyio.create_task_group() as group:
        for number in range(concurrency):
            group.start_soon(loop, number, name=f"{label} worker {number}")


async def _wait(stop: anyio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with anyio.move_on_after(seconds):
        await stop.wait()
