"""What became of a unit of work: committed, rolled back, or unknown.

A unit's COMMIT is one round trip. If the server answered it with an error (a
deferred constraint, a serialization failure), the transaction was rolled back:
the outcome is known. If the answer never came (a timeout, a lost or
invalidated connection, a cancellation that cut the wait short), the server may
have committed or not, and nothing on the client can tell: the outcome is
**unknown**, and running the unit again could apply it twice.

:func:`outcome_of_failed_commit` tells the two apart from where the failure
happened (SQLAlchemy's transaction state: the COMMIT was sent once the
transaction is ``PREPARED``) and what failed (an error the server reported
carries an SQLSTATE). :func:`mark_cancellation` records the outcome on a
cancellation that passes a scope's exit, so that "committed, then cancelled"
can be told from "rolled back".
"""

from __future__ import annotations

from typing import Any, Final, Literal

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.session import SessionTransactionState

from ._retry import is_disconnect, sqlstate_of

__all__ = [
    "COMMITTED",
    "OUTCOME_ATTRIBUTE",
    "ROLLED_BACK",
    "UNKNOWN",
    "Outcome",
    "mark_cancellation",
    "outcome_of_failed_commit",
    "server_rejected",
]

Outcome = Literal["committed", "rolled back", "unknown"]

COMMITTED: Final = "committed"
ROLLED_BACK: Final = "rolled back"
UNKNOWN: Final = "unknown"

#: Attribute set on a cancellation re-raised by a scope's exit: the unit's outcome.
OUTCOME_ATTRIBUTE: Final = "tasksession_outcome"


def server_rejected(error: BaseException) -> bool:
    """Whether ``error`` is the server's own answer: an error with an SQLSTATE, not a disconnect.

    Such an answer to COMMIT means the server rolled the transaction back.
    """
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return False
    return sqlstate_of(error) is not None and not is_disconnect(error)


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


def mark_cancellation(cancelled: BaseException, outcome: Outcome, scope_name: str) -> None:
    """Record ``outcome`` on a cancellation re-raised by the exit of scope ``scope_name``.

    The innermost scope the cancellation leaves is the one recorded; outer
    scopes it passes afterwards leave it alone.
    """
    if getattr(cancelled, OUTCOME_ATTRIBUTE, None) is not None:
        return
    setattr(cancelled, OUTCOME_ATTRIBUTE, outcome)
    if outcome == COMMITTED:
        cancelled.add_note(
            f"tasksession: scope {scope_name!r} COMMITTED before this cancellation reached "
            "it: its work is stored (the cancellation arrived while the COMMIT was under "
            "way, and a COMMIT is never cut off half-way)."
        )
    elif outcome == UNKNOWN:
        cancelled.add_note(
            f"tasksession: the outcome of scope {scope_name!r} is UNKNOWN: its COMMIT got "
            "no answer, so the database may or may not have stored its work."
        )
