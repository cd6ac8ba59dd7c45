"""How a savepoint scope ends: RELEASE, or ROLLBACK TO SAVEPOINT, run to its end.

``db.scope(savepoint=True)`` inside an open scope runs its block in a SAVEPOINT
of the enclosing transaction (SQLAlchemy's ``begin_nested()``). Its end is not
the end of a unit: nothing commits or closes, the enclosing scope does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ._outcome import COMMITTED, ROLLED_BACK, Outcome

__all__ = ["SavepointUnit", "end_savepoint"]

logger = logging.getLogger("tasksession")


class SavepointUnit(Protocol):
    """What ending a savepoint reads and records of its scope."""

    nested: Any  # the AsyncSessionTransaction of begin_nested(); taken by the end
    session: Any
    outcome: Outcome | None

    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str | None: ...


async def end_savepoint(unit: SavepointUnit, clean: bool, exc: BaseException | None) -> None:
    """Release the block's savepoint on a clean exit, roll back to it on an exception.

    Each round trip runs to its end in a task of its own, as a COMMIT does (see
    :mod:`._completion`): a native ``Task.cancel()`` (``asyncio.timeout``) cutting
    RELEASE / ROLLBACK TO SAVEPOINT short costs the connection and leaves
    SQLAlchemy's savepoint stack out of step with it, so that every enclosing
    savepoint's rollback then warns "nested transaction already deassociated from
    connection". Such a cancellation is re-raised once the round trip is done,
    never swallowed.

    A savepoint already ended inside the block (``session.commit()`` there commits
    the whole enclosing transaction) is reported: logged, and noted on the
    exception; on an exception the block's work after that call is rolled back.
    """
    nested = unit.nested
    unit.nested = None
    session = unit.session
    savepoint = nested.sync_transaction
    # Guarded steps of the session: the guard is entered in the task leaving the
    # block (to the guard, the helper task that runs the round trip is a stranger).
    release = session._ts_release_savepoint
    rollback = session._ts_rollback_savepoint

    if savepoint._rollback_can_be_called():
        if clean:
            try:
                await release(savepoint.commit)
            except asyncio.CancelledError as cancelled:
                if not savepoint._rollback_can_be_called():  # released
                    cancelled.add_note(
                        f"tasksession: this cancellation arrived while the savepoint of "
                        f"scope {unit.name!r} was being released; the release ran to its "
                        "end first: the block's work is in the enclosing transaction (its "
                        "scope rolls it back when this cancellation reaches it)"
                    )
                raise
            unit.outcome = COMMITTED  # released into the enclosing unit
            return
        unit.outcome = ROLLED_BACK
        try:
            # A failed flush leaves the savepoint deactivated, not closed: it
            # still needs its ROLLBACK TO SAVEPOINT (is_active is False then).
            await rollback(savepoint.rollback)
        except Exception as failure:  # a cancellation is no failure: it goes on
            logger.error(
                "tasksession: rolling back savepoint of scope %r failed",
                unit.name,
                exc_info=failure,
            )
            if exc is not None:
                exc.add_note(f"tasksession: rolling back the savepoint also failed: {failure!r}")
        return
    # The savepoint was closed inside the block (COMMITTED is only transient).
    unit.outcome = COMMITTED if exc is None else ROLLED_BACK
    root = savepoint
    while root.parent is not None:
        root = root.parent
    if root._rollback_can_be_called():
        # Its own transaction object's commit() / rollback() ended just the
        # savepoint: the later work went into the enclosing transaction, inseparably.
        what = (
            f"the savepoint of scope {unit.name!r} (savepoint=True) was ended inside the "
            "block (commit() or rollback() of its transaction object); the block's later "
            "work went into the enclosing transaction and "
            + (
                "is committed or rolled back with it."
                if exc is None
                else "could not be rolled back on its own: it stays there."
            )
        )
    else:
        # session.commit() / rollback() / close(): SQLAlchemy 2 ends the whole
        # transaction, savepoints included. What the session holds now was begun
        # after that call, by this block: on an exception, roll it back.
        sync = session.sync_session
        if exc is not None and sync.in_transaction():
            try:
                await rollback(sync.rollback)
            except Exception as failure:
                logger.error(
                    "tasksession: rolling back the later work of scope %r failed",
                    unit.name,
                    exc_info=failure,
                )
                exc.add_note(
                    f"tasksession: rolling back the block's later work failed: {failure!r}"
                )
        what = (
            f"session.commit() or rollback() was called inside scope {unit.name!r} "
            "(savepoint=True): it ended the whole enclosing transaction, not the savepoint "
            "(commit() committed the enclosing unit's work up to that point, rollback() "
            "discarded it, work from before the block included; a savepoint cannot be "
            "committed on its own). "
            + (
                "The block's later work is in a new transaction, which the enclosing "
                "scope commits or rolls back."
                if exc is None
                else "The block's later work was rolled back, as the block raised "
                "(what a commit() committed stays committed)."
            )
        )
    message = (
        f"tasksession: {what} Instead, let the block end (a clean exit releases the "
        "savepoint into the enclosing unit, an exception rolls it back), or use "
        f"{unit.label or 'manager'}.scope(independent=True) for work that must commit on "
        "its own."
    )
    logger.warning("%s", message)
    if exc is not None:
        exc.add_note(message)
