"""A unit's COMMIT: awaited once, bounded, its outcome recorded; a doubtful connection discarded.

:func:`commit_once` awaits a commit (SQLAlchemy's, or one of the short ways of
:mod:`._shortcuts`) and records how the unit ended: committed, rolled back (the
failure came before the COMMIT, or the server rejected it) or unknown (the
COMMIT got no answer). A connection whose COMMIT is in doubt is never reused.

A COMMIT is never cut off by a cancellation (see :mod:`._completion`), so without
a bound a stalled server (a paused backend, a silent network partition) would
hold the unit until TCP gives up: ``commit_timeout=``. A timer per COMMIT
(``loop.call_later``) costs some 40,000 instructions, 5% of a whole one-query
unit of work; instead each COMMIT records its deadline in the configuration's
:class:`CommitWatchdog`, whose one task sleeps until the earliest deadline among
those still in flight, gives up on the expired ones, and ends when none is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Literal, Protocol

from sqlalchemy.engine import Connection
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.util import greenlet_spawn

from ._errors import CommitOutcomeUnknownError
from ._outcome import COMMITTED, ROLLED_BACK, UNKNOWN, Outcome
from ._retry import explain_lost_connection, server_rejected
from ._shortcuts import held_connections, is_asyncpg, terminate_asyncpg
from ._stats import Ledger, NamedScope

__all__ = [
    "CommitWatchdog",
    "CommittingUnit",
    "abandon_commit",
    "close_quietly",
    "commit_once",
    "count_end",
    "discard_soon",
    "outcome_of_failed_commit",
]

logger = logging.getLogger("tasksession")

_monotonic = time.monotonic


class CommittingUnit(NamedScope, Protocol):
    """What ending a unit reads and records of its scope."""

    outcome: Outcome | None
    commit_abandoned: bool  # commit_timeout ran out: the COMMIT's outcome is unknown
    binding: Any  # the scope's configuration (a _config.Binding): options, commit_watchdog

    @property
    def guard_mode(self) -> str: ...
    @property
    def ledger(self) -> Ledger: ...


def outcome_of_failed_commit(sync_session: Any, error: BaseException, *, sent: bool) -> Outcome:
    """The outcome of a unit whose commit raised ``error``.

    :param sync_session: the unit's :class:`~sqlalchemy.orm.Session`, before it is closed.
    :param sent: the failure came from the COMMIT round trip itself (the short
        commit ways send nothing else); otherwise the transaction's state says
        whether SQLAlchemy had got as far as sending it.
    """
    if not sent:
        transaction = sync_session._transaction
        while transaction is not None and transaction._parent is not None:
            transaction = transaction._parent
        state = transaction._state if transaction is not None else None
        if state is SessionTransactionState.COMMITTED:
            return COMMITTED  # a listener after the COMMIT failed; the unit is durable
        # Prepared: flushed and about to, or busy, committing its connections.
        sent = state is SessionTransactionState.PREPARED
    if not sent:
        return ROLLED_BACK  # failed before COMMIT (flush, a before_commit listener)
    return ROLLED_BACK if server_rejected(error) else UNKNOWN


def count_end(unit: CommittingUnit, outcome: Literal["commit", "rollback"] | None) -> None:
    """Count how ``unit`` ended (``None``: it held no connection); warn if it lasted too long."""
    ledger = unit.ledger
    if outcome == "commit":
        ledger.commits += 1
    elif outcome == "rollback":
        ledger.rollbacks += 1
    warn_after = unit.binding.options.warn_after if unit.binding is not None else None
    if warn_after is not None:
        age = unit.age
        if age > warn_after:
            logger.warning(
                "scope %r (task %r, opened at %s) was open for %.1fs (warn_after=%s): "
                "it held a session%s that long",
                unit.name,
                unit.owner_name,
                unit.opened_at,
                age,
                warn_after,
                " and a connection" if outcome is not None else "",
            )


async def commit_once(
    unit: CommittingUnit, session: Any, commit: Coroutine[Any, Any, None], *, sent: bool = False
) -> None:
    """Await ``commit``, bounded by ``commit_timeout``, and record the outcome.

    If it fails: a failure before the COMMIT or the server's rejection of it
    rolls back and closes, and raises the failure; a COMMIT that got no answer
    discards the connection and raises :class:`CommitOutcomeUnknownError`.

    :param sent: ``commit`` starts with the COMMIT (the short ways); otherwise
        SQLAlchemy's transaction state says whether it got that far.
    """
    binding = unit.binding
    timeout = binding.options.commit_timeout
    if timeout is not None:
        binding.commit_watchdog.watch(unit, session, timeout, session._ts_loop)
    try:
        await commit
    except BaseException as error:
        explain_lost_connection(error, unit.guard_mode)
        sync = session.sync_session
        outcome = (
            UNKNOWN if unit.commit_abandoned else outcome_of_failed_commit(sync, error, sent=sent)
        )
        unit.outcome = outcome
        if outcome == UNKNOWN:
            count_end(unit, None)
            # The connection is in doubt (a reply may still arrive): never reuse it.
            await discard_soon(held_connections(sync))
            if isinstance(error, Exception):
                reason = (
                    f"no answer to its COMMIT within commit_timeout={timeout}s"
                    if unit.commit_abandoned
                    else f"its COMMIT failed with {type(error).__name__}"
                )
                raise CommitOutcomeUnknownError(unit.name, error, reason=reason) from error
            raise
        count_end(unit, "commit" if outcome == COMMITTED else "rollback")
        await close_quietly(unit, session, error)
        if outcome == COMMITTED:
            error.add_note(
                f"tasksession: scope {unit.name!r} was COMMITTED before this error "
                "(raised after the COMMIT, e.g. by an after_commit listener)"
            )
        raise
    finally:
        if timeout is not None:
            binding.commit_watchdog.done(session)
    unit.outcome = COMMITTED
    count_end(unit, "commit")


def abandon_commit(unit: CommittingUnit, session: Any) -> None:
    """``commit_timeout`` ran out: cut the connection so that the waiting COMMIT ends.

    The server may have committed or not; its answer will never be read. A
    connection that cannot be cut at once (not asyncpg) is waited for.
    """
    connections = held_connections(session.sync_session)
    cut = [connection for connection in connections if terminate_asyncpg(connection)]
    if not cut:
        return
    unit.commit_abandoned = True
    logger.error(
        "tasksession: the COMMIT of scope %r (task %r, opened at %s) got no answer "
        "within commit_timeout=%ss: its connection was cut and the outcome is unknown",
        unit.name,
        unit.owner_name,
        unit.opened_at,
        unit.binding.options.commit_timeout,
    )


async def close_quietly(unit: CommittingUnit, session: Any, original: BaseException | None) -> None:
    """Roll back and close; if that fails, discard the connections anyway.

    With an ``original`` exception the failure is logged and noted on it,
    never raised in its place; on a clean exit it is raised (after the
    connections were discarded, so nothing leaks either way).
    """
    held = held_connections(session.sync_session)
    try:
        await session._ts_base.close(session)
    except asyncio.CancelledError:
        # A Task.cancel() cut the ROLLBACK short (anyio's are shielded off):
        # discard the connections (the server rolls back when they close)
        # and let the cancellation go on; a cancellation is never swallowed.
        await discard_soon(held)
        raise
    except BaseException as failure:
        unit.ledger.teardown_failures += 1
        await discard_soon(held)
        if original is None:
            raise
        logger.error(
            "tasksession: closing the session of scope %r failed while handling %r",
            unit.name,
            original,
            exc_info=failure,
        )
        original.add_note(
            f"tasksession: while this was being handled, closing the session of scope "
            f"{unit.name!r} also failed: {failure!r}; its connection was invalidated"
        )


def _discard(connections: list[Connection]) -> None:
    """Invalidate ``connections`` and give them back to their pool (the server rolls back).

    Run it in a greenlet unless every connection is an asyncpg one: those are
    terminated at once, without the graceful close (up to 2 s over a stalled
    network) that SQLAlchemy would attempt inside a greenlet. Each step may
    fail on a broken connection; none may stop the rest.
    """
    for connection in connections:
        for step, what in (
            (terminate_asyncpg, "terminating"),
            (Connection.invalidate, "invalidating"),
            (Connection.close, "returning"),
        ):
            try:
                step(connection)
            except Exception:
                logger.debug("tasksession: %s a connection failed", what, exc_info=True)


async def discard_soon(connections: list[Connection]) -> None:
    """:func:`_discard` ``connections``: at once for asyncpg ones, else in a greenlet."""
    if all(is_asyncpg(connection) for connection in connections):
        _discard(connections)
    else:
        await greenlet_spawn(_discard, connections)


class CommitWatchdog:
    """Calls :func:`abandon_commit` for COMMITs past their deadline (one per configuration)."""

    __slots__ = ("_deadlines", "_task")

    def __init__(self) -> None:
        # session -> (monotonic deadline, its unit)
        self._deadlines: dict[Any, tuple[float, CommittingUnit]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(
        self, unit: CommittingUnit, session: Any, timeout: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Start watching the COMMIT of ``unit``'s ``session``, due within ``timeout`` seconds."""
        self._deadlines[session] = (_monotonic() + timeout, unit)
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
                for session, (deadline, unit) in list(deadlines.items()):
                    if deadline <= now:
                        del deadlines[session]
                        abandon_commit(unit, session)
                if deadlines:
                    await asyncio.sleep(min(deadline for deadline, _ in deadlines.values()) - now)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
