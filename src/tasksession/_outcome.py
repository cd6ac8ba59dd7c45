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

from typing import Final, Literal

__all__ = [
    "COMMITTED",
    "OUTCOME_ATTRIBUTE",
    "ROLLED_BACK",
    "UNKNOWN",
    "Outcome",
    "mark_cancellation",
]

Outcome = Literal["committed", "rolled back", "unknown"]

COMMITTED: Final = "committed"
ROLLED_BACK: Final = "rolled back"
UNKNOWN: Final = "unknown"

#: Attribute set on a cancellation re-raised by a scope's exit: the unit's outcome.
OUTCOME_ATTRIBUTE: Final = "tasksession_outcome"


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
