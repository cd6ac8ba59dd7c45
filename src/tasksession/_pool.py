"""The manager's pools, as diagnostics see them: what is checked out, and who holds it.

SQLAlchemy reports a pool's size and checked-out count but not who holds a
connection; a scope knows whether its session does. A checkout that times out
becomes :class:`PoolExhaustedError`, which names the open scopes holding
connections *of the pool that timed out* (a readonly scope's session may use the
``readonly_autocommit`` pool or a replica's, not the primary's).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc

from ._errors import PoolExhaustedError
from ._stats import DescribedScope, Ledger, scope_info

__all__ = ["HoldingScope", "checked_out", "exhausted", "pool_of", "size_of"]


class HoldingScope(DescribedScope, Protocol):
    """What :func:`exhausted` reads of an open scope (besides :class:`DescribedScope`)."""

    session: Any


def pool_of(engine: Any) -> Any:
    """The pool of an ``AsyncEngine`` or ``AsyncConnection`` (``None`` if it has none)."""
    return getattr(getattr(engine, "sync_engine", None), "pool", None)


def _call_int(pool: Any, method: str) -> int | None:
    function = getattr(pool, method, None)
    if function is None:
        return None
    try:
        return int(function())
    except (TypeError, ValueError):  # pragma: no cover - exotic pools
        return None


def size_of(engine: Any) -> int | None:
    """The configured size of ``engine``'s pool (``None`` when the pool does not say)."""
    return _call_int(pool_of(engine), "size")


def checked_out(engines: Iterable[Any]) -> int | None:
    """Connections checked out of the pools of ``engines``, together.

    ``None`` when the first (the primary) does not report it; a later one that
    does not is left out.
    """
    total: int | None = None
    for index, engine in enumerate(engines):
        count = _call_int(pool_of(engine), "checkedout")
        if index == 0:
            total = count
        elif total is not None and count is not None:
            total += count
    return total


def exhausted(
    error: sa_exc.TimeoutError, bind: Any, scopes: Iterable[HoldingScope], ledger: Ledger
) -> PoolExhaustedError:
    """The :class:`PoolExhaustedError` for a checkout from ``bind``'s pool that timed out.

    :param bind: the engine whose checkout timed out: its pool's status is
        reported, and the ``scopes`` holding connections of that pool, oldest first.
    """
    if isinstance(error, PoolExhaustedError):
        return error
    ledger.pool_timeouts += 1
    pool = pool_of(bind)
    if pool is None:
        return PoolExhaustedError("no pool", [])

    def holds_from_pool(scope: HoldingScope) -> bool:
        # A scope's session is bound to one engine (Scope.engine): the
        # connections it holds come from that engine's pool.
        return scope.holds_connection and pool_of(scope.session.bind) is pool

    holders = [scope_info(scope) for scope in scopes if holds_from_pool(scope)]
    holders.sort(key=lambda info: -info.age)
    return PoolExhaustedError(pool.status(), holders)
