"""Streamed results: closed with their scope, refused after it.

``session.stream()`` (and ``stream_scalars()``, which goes through it) returns an
:class:`~sqlalchemy.ext.asyncio.AsyncResult` reading rows through a server-side
cursor on the scope's connection. Left unconsumed, it would keep that cursor open
past the scope; read later, it would use a connection that is back in the pool,
perhaps serving another task by then (on asyncpg it fails with a raw
``NoActiveSQLTransactionError``, on aiosqlite it silently works).

So the scope remembers each stream its session opened, and its teardown, before
committing or rolling back, closes those still open (:func:`close_streams`) and
marks all of them so that reading one afterwards raises
:class:`~tasksession._errors.StreamClosedError` (a ``ScopeClosedError``) instead.

Buffered results (``execute()``, ``scalars()``) need none of this: SQLAlchemy's
``AsyncSession`` always fetches their rows before returning them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import StreamClosedError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncResult

__all__ = ["StreamingScope", "close_streams", "tracking"]


class StreamingScope(Protocol):
    """What this module reads and keeps on a scope: its open ``stream()`` results."""

    streams: list[Any] | None  # None until the first stream(): most scopes never stream

    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str | None: ...


logger = logging.getLogger("tasksession")

# Every fetch of an AsyncResult and of the results derived from it (scalars(),
# mappings(), ...) ends in one of these methods of the shared sync result.
_FETCH_METHODS = ("_fetchiter_impl", "_fetchone_impl", "_fetchmany_impl", "_fetchall_impl")

# Streams kept per scope before already-closed ones are dropped from the list.
_PRUNE_AT = 16


def tracking(
    stream: Callable[..., Coroutine[Any, Any, AsyncResult[Any]]],
) -> Callable[..., Coroutine[Any, Any, AsyncResult[Any]]]:
    """Wrap the (guarded) ``stream`` method so its results are registered with the scope."""

    @functools.wraps(stream)
    async def tracked(self: Any, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        result = await stream(self, *args, **kwargs)
        _register(self._ts_scope, result)
        return result

    return tracked


def _register(scope: StreamingScope, result: AsyncResult[Any]) -> None:
    streams = scope.streams
    if streams is None:
        scope.streams = [result]
        return
    if len(streams) >= _PRUNE_AT:
        # A long scope streaming many times: forget those the code closed itself.
        streams[:] = [stream for stream in streams if not stream.closed]
    streams.append(result)


async def close_streams(scope: StreamingScope) -> None:
    """Close the scope's open streams and make every one of them refuse further reads.

    Runs in the scope's teardown, before the commit or rollback returns the
    connection. A failure to close is logged, never raised: the rollback or
    close that follows releases the cursor with its transaction anyway.
    """
    streams = scope.streams
    if not streams:
        return
    scope.streams = None
    name = scope.name
    for result in streams:
        try:
            if not result.closed:
                await result.close()
        except Exception:
            logger.warning(
                "tasksession: closing a stream() result of scope %r failed", name, exc_info=True
            )
        _refuse_reads(result, name, scope.label)


def _refuse_reads(result: AsyncResult[Any], scope_name: str, label: str | None) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise StreamClosedError(scope_name, manager=label)

    # sqlalchemy.engine.Result has a __dict__ (its __slots__ include it), so
    # instance attributes shadow the fetch methods for this one result only.
    real = result._real_result
    for method in _FETCH_METHODS:
        setattr(real, method, refuse)
