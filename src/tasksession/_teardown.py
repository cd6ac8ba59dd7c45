"""How a unit of work ends: commit or roll back, close, and give the connection back.

:func:`end_unit` is the one way an own scope's unit ends once its session was
used (the scope ends an untouched one itself: there is nothing to close). In
order of preference:

* nothing happened (no transaction, nothing to flush): the session closes with
  no I/O, synchronously;
* a readonly unit on the AUTOCOMMIT pool: nothing to roll back either;
* a commit with nothing for the ORM to do: the short ways of :mod:`._shortcuts`
  (the connections' COMMIT, or asyncpg's directly);
* otherwise SQLAlchemy's ``commit()`` / ``close()`` (the user's overrides
  included), after waiting for another task's operation in flight and closing
  the unit's ``stream()`` results.

A COMMIT runs in a task of its own (:mod:`._completion`) so that no cancellation,
anyio's or a native ``Task.cancel()``, cuts it off half-way; a ROLLBACK is shielded
from anyio (cut short by ``Task.cancel()`` it costs only its connection). How the
unit ended is recorded on it (:mod:`._commit`), and a cancellation re-raised here
carries the outcome (:mod:`._outcome`). A failure while handling an exception is
logged and noted on it, never raised in its place.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator
from typing import Any, Protocol

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ._commit import CommittingUnit, close_quietly, commit_once, count_end
from ._compat import current_task_of
from ._completion import run_to_completion
from ._errors import ReadOnlyScopeError
from ._guard import in_operation
from ._interrupt import cancel_orphans_soon, has_orphans
from ._outcome import COMMITTED, ROLLED_BACK, UNKNOWN, mark_cancellation
from ._shortcuts import (
    closes_without_io,
    commit_connections_and_close,
    commit_through_the_driver,
    commits_like_its_connections,
    driver_commit,
)
from ._streams import StreamingScope, close_streams

__all__ = ["TeardownUnit", "end_unit"]

_current_task_of = current_task_of
_async_commit = AsyncSession.commit


class TeardownUnit(CommittingUnit, StreamingScope, Protocol):
    """What ending a unit reads and records of its scope (besides the commit's needs)."""

    readonly: bool
    teardown_task: asyncio.Task[Any] | None  # the guard lets it use the ended scope's session
    idle_waiter: anyio.Event | None  # set by the guard when the last operation ends

    def note_write(self) -> None: ...


@types.coroutine
def _yield() -> Generator[None, None, None]:
    """One pass through the event loop: ``asyncio.sleep(0)`` without its argument checks."""
    yield


async def end_unit(
    unit: TeardownUnit, session: Any, clean: bool, exc: BaseException | None
) -> None:
    """End ``unit``, whose ``session`` was used: commit if ``clean`` (and not readonly), else roll back.

    :param exc: the exception that ended the block, if any (notes go on it).
    :raises Exception: the commit failed (the unit was rolled back, or its
        outcome is unknown: :class:`CommitOutcomeUnknownError`).
    """
    commit = clean and not unit.readonly
    sync = session.sync_session
    if unit.readonly and clean and not sync._is_clean():
        # Objects added, changed or deleted and never flushed: a readonly scope
        # would drop them without a word. Refuse, as a flush would have.
        await _refuse_unflushed_writes(unit, session, sync)
    # Nobody inside an operation: the short ways (see _shortcuts) may apply.
    quiet = unit.streams is None and not in_operation(session)
    if (
        quiet
        and not sync.in_transaction()
        and not (commit and (sync.new or sync.deleted or sync.dirty))
    ):
        # No transaction and nothing to flush: closing does no I/O.
        sync.close()
        unit.outcome = COMMITTED if commit else ROLLED_BACK
        count_end(unit, None)
        return
    if quiet and not commit and clean and closes_without_io(sync):
        # A read-only unit on the AUTOCOMMIT pool: nothing to roll back.
        sync.close()
        unit.outcome = ROLLED_BACK
        count_end(unit, "rollback")
        # The connection went back without a suspension, unlike every other
        # exit (a COMMIT or ROLLBACK awaits the server): yield once, so that
        # tasks waiting for a connection take it before this task goes on
        # (under pool contention, 50 clients on 10 connections, this cut the
        # requests that had to wait for a connection from 30-70% to ~1%, and
        # server CPU per request by ~9%: benchmarks/bench_tornado).
        await _yield()
        return
    if commit:
        short = (
            quiet
            and session._ts_base.commit is _async_commit
            and commits_like_its_connections(sync)
        )
        cleanup = (
            _commit_short(unit, session, sync) if short else _teardown(unit, session, True, exc)
        )
        # A COMMIT cut off after it was sent leaves the outcome unknown: run it
        # where no cancellation, anyio's or Task.cancel(), can reach it.
        try:
            await run_to_completion(cleanup, session._ts_loop)
        except asyncio.CancelledError as cancelled:
            # A Task.cancel() arrived meanwhile; it is re-raised once the
            # COMMIT has ended: say how it ended.
            mark_cancellation(cancelled, unit.outcome or UNKNOWN, unit.name)
            raise
        if unit.binding.replica_engines:
            unit.note_write()
    else:
        # A ROLLBACK needs no such care: if a Task.cancel() cuts it off, the
        # connection is invalidated and the server rolls back. Shielding it
        # from anyio is enough, and cheaper than a task of its own.
        try:
            with anyio.CancelScope(shield=True):
                await _teardown(unit, session, False, exc)
        except asyncio.CancelledError as cancelled:
            mark_cancellation(cancelled, ROLLED_BACK, unit.name)
            raise
        if isinstance(exc, asyncio.CancelledError):
            mark_cancellation(exc, ROLLED_BACK, unit.name)


async def _refuse_unflushed_writes(unit: TeardownUnit, session: Any, sync: Session) -> None:
    """Roll back and close a readonly scope left with unflushed writes; raise the refusal."""
    kinds = sorted({type(obj).__name__ for obj in (*sync.new, *sync.dirty, *sync.deleted)})
    error = ReadOnlyScopeError(
        unit.name,
        f"ending with {len(sync.new)} new, {len(sync.dirty)} changed and "
        f"{len(sync.deleted)} deleted object(s) never flushed ({', '.join(kinds)})",
        manager=unit.label,
    )
    with anyio.CancelScope(shield=True):
        await _teardown(unit, session, False, error)
    raise error


async def _teardown(
    unit: TeardownUnit, session: Any, commit: bool, exc: BaseException | None
) -> None:
    # The user's commit()/close() overrides may use the session: the guard lets
    # this task do so while, and only while, the teardown runs.
    # (Asked of the session's loop, which this runs on: no getpid() system call.)
    unit.teardown_task = _current_task_of(session._ts_loop)
    try:
        if in_operation(session):
            # Another task is inside an operation on this session (the scope is
            # already closed to new ones): let it finish before closing under it.
            waiter = anyio.Event()
            unit.idle_waiter = waiter
            await waiter.wait()
        if unit.streams is not None:
            # Before the commit or rollback returns the connection they read from.
            await close_streams(unit)
        if commit:
            await commit_once(unit, session, session._ts_base.commit(session))
        else:
            unit.outcome = ROLLED_BACK
            count_end(unit, "rollback")
        if exc is not None:
            await close_quietly(unit, session, exc)
            if has_orphans(session.bind):
                # A cancellation cut a statement off mid-flight: stop it on the
                # server, in the background (the caller's deadline has passed).
                cancel_orphans_soon(session.bind)
        elif session.sync_session.in_transaction():
            await close_quietly(unit, session, None)
        else:
            # Committed: the connection is back in the pool; closing does no I/O.
            session.sync_session.close()
    finally:
        unit.teardown_task = None


async def _commit_short(unit: TeardownUnit, session: Any, sync: Session) -> None:
    """Commit the connections and close (nothing for the ORM to do: see _shortcuts)."""
    through_driver = driver_commit(sync)
    if through_driver is not None:
        commit = commit_through_the_driver(sync, *through_driver)
    else:
        commit = greenlet_spawn(commit_connections_and_close, sync)
    await commit_once(unit, session, commit, sent=True)
