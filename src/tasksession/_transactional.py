"""``@db.transactional()``: a coroutine function that runs as one unit of work, retried if asked.

Each call opens a scope around the function (so ``db.session`` works inside
it), commits when it returns, rolls back when it raises. With a
:class:`~tasksession.RetryPolicy`, a call that failed with a retryable error
(serialization failure, deadlock, lost connection, a connection that could
not be opened) is run again **from the start, in a new scope**, after a
jittered backoff.

Two cases are never retried:

* **inside an open scope of the same task** the function joins that scope
  (like a nested ``db.scope()``): it cannot re-run a transaction that began
  before it was called. The error propagates to the outer unit, which is
  where a retry belongs (an outer ``@db.transactional(retry=...)`` re-runs
  everything, the inner call included);
* **a COMMIT that got no answer** (lost connection, timeout): the database
  may or may not have committed. The scope raises
  :class:`~tasksession.CommitOutcomeUnknownError`, which is never retried,
  whatever the policy's ``exceptions`` say.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio

from ._errors import CommitOutcomeUnknownError
from ._retry import RetryPolicy


class UnitScope(Protocol):
    """What :func:`run_unit` needs of a scope: ``async with``, and whether it joined another."""

    @property
    def joined(self) -> bool: ...
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Any: ...


#: ``open_scope(name=..., readonly=...)``: the manager's ``scope`` method.
OpenScope = Callable[..., UnitScope]

__all__ = ["OpenScope", "UnitScope", "run_unit", "transactional"]

logger = logging.getLogger("tasksession")

P = ParamSpec("P")
R = TypeVar("R")

_JOINED_NOTE = (
    "tasksession: {name!r} ran inside an open scope of the same task, so it joined that "
    "unit and was not retried; only the outermost unit can be re-run (decorate it with "
    "@{label}.transactional(retry=...), or call this function outside any scope)."
)


def transactional(
    open_scope: OpenScope,
    label: str,
    retry: RetryPolicy | None,
    name: str | None,
    readonly: bool,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Build the decorator :meth:`SessionManager.transactional` returns.

    :param open_scope: opens the scope of each call (the manager's ``scope``).
    :param label: the manager's name in messages (``db`` for ``db = SessionManager()``).
    """
    if retry is not None and not isinstance(retry, RetryPolicy):
        if callable(retry):
            raise TypeError(
                f"@{label}.transactional needs parentheses: write "
                f"@{label}.transactional() or "
                f"@{label}.transactional(retry=RetryPolicy(...))"
            )
        raise TypeError(f"retry={retry!r} must be a tasksession.RetryPolicy or None")

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(
                f"@{label}.transactional() decorates coroutine functions "
                f"(async def); {function!r} is not one"
            )
        unit_name = name if name is not None else function.__qualname__

        @functools.wraps(function)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            return await run_unit(
                open_scope,
                functools.partial(function, *args, **kwargs),
                retry,
                unit_name,
                readonly,
                label,
            )

        return run

    return decorate


async def run_unit(
    open_scope: OpenScope,
    body: Callable[[], Awaitable[R]],
    policy: RetryPolicy | None,
    name: str,
    readonly: bool,
    label: str,
) -> R:
    """Run ``body()`` in a scope ``open_scope`` opens; re-run it in a new scope per ``policy``.

    :raises CommitOutcomeUnknownError: the connection was lost during COMMIT.
    :raises Exception: the error of the last attempt, with a note saying how many
        attempts were made when retries ran out.
    """
    attempt = 0
    while True:
        attempt += 1
        scope = open_scope(name=name, readonly=readonly)
        try:
            async with scope:
                result = await body()
            return result
        except CommitOutcomeUnknownError as error:
            # Committed or not, nobody knows: never run it again, whatever the policy.
            error.attempt = attempt
            if policy is not None and policy.attempts > 1:
                error.add_note(
                    f"tasksession: unit {name!r} was not retried (attempt {attempt} of "
                    f"{policy.attempts}): its COMMIT may have been applied."
                )
            raise
        except Exception as error:
            reason = policy.reason(error) if policy is not None else None
            if scope.joined:  # joined the caller's open scope: it owns the transaction
                if reason is not None:
                    error.add_note(_JOINED_NOTE.format(name=name, label=label))
                raise
            if reason is None or policy is None:
                raise
            if attempt >= policy.attempts:
                error.add_note(
                    f"tasksession: unit {name!r} failed {attempt} time(s) with a retryable "
                    f"error ({reason}); RetryPolicy(attempts={policy.attempts}) gave up."
                )
                raise
            delay = policy.delay(attempt)
            logger.info(
                "tasksession: unit %r failed with a %s (attempt %d of %d); retrying in %.3fs",
                name,
                reason,
                attempt,
                policy.attempts,
                delay,
            )
        await anyio.sleep(delay)
