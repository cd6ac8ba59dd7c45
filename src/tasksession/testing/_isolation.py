"""``isolated(db)``: every scope of ``db`` inside the block runs on a database state the block throws away.

Two modes (docs/testing.md says which to choose):

* ``"savepoint"`` (default): one connection, one outer transaction, rolled back
  at the end; every scope's session joins it in SAVEPOINTs, and scopes take turns
  on the connection (:meth:`SessionManager.bound_to`). Under a millisecond per
  test. One transaction at a time.
* ``"clone"``: a database of its own, cloned from a template built once
  (:mod:`._clone`), dropped at the end (unless the caller passed ``clone=``, a
  clone it shares between tests). Real concurrency: row locks, ``SKIP LOCKED``,
  SERIALIZABLE retries between transactions.

In both, the stray-engine guard (:mod:`._stray`) is on for the block. Nothing
in here is tied to a task: pytest-asyncio enters the block in one task (a
fixture's setup) and leaves it in another (its teardown).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tasksession import SessionManager

from ._clone import Clone, SchemaHook, create_clone
from ._leaks import test_connections
from ._stray import only_these_pools, own_checkouts, pools_of
from ._turns import WAIT_TIMEOUT, SharedConnection, turn_taking_class

__all__ = ["Mode", "isolated"]

Mode = Literal["savepoint", "clone"]


# loop -> {id(pool): a suspended async generator that disposes the engine when the loop ends}
_AT_LOOP_END: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Any]] = (
    weakref.WeakKeyDictionary()
)


async def _dispose_at_loop_end(engine: AsyncEngine) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await engine.dispose()


async def _close_pool_with_loop(engine: AsyncEngine) -> None:
    """Close the pool's connections when the running loop ends, not before.

    A pooled asyncpg connection serves only the loop it was made on, and test
    runners give tests new loops (pytest-asyncio per loop scope, anyio's plugin when
    no fixture outlives the test). Tests on the same loop keep the warm connection;
    when the loop ends, the runner finalizes its async generators
    (``loop.shutdown_asyncgens()``, which ``asyncio.Runner`` calls), and this one
    closes the pool there, on the loop its connections belong to.
    """
    loop = asyncio.get_running_loop()
    pending = _AT_LOOP_END.setdefault(loop, {})
    key = id(engine.sync_engine.pool)
    if key in pending:
        return
    finalizer = _dispose_at_loop_end(engine)
    await finalizer.__anext__()  # now the loop knows it (it holds it weakly: we hold it)
    pending[key] = finalizer


class _OuterTransactionCommitted(AssertionError):
    pass


_COMMITTED = "tasksession.testing.outer_commit"
_OUTER_COMMIT = (
    "tasksession.testing: code under test committed the test's outer transaction "
    "(connection.commit() on the connection of a session, or a COMMIT statement): "
    "in savepoint isolation everything runs in SAVEPOINTs of one transaction that "
    "the test rolls back. Commit through the session (session.commit() is a RELEASE "
    "SAVEPOINT here), or run this test in clone mode: isolated(db, mode='clone')."
)


def _refuse_outer_commit(connection: Connection) -> None:
    # Fires for the outer transaction only (a session's commit is a RELEASE here).
    # SQLAlchemy ends the transaction even so: the isolated block reports it again
    # when it ends, above whatever failed after it.
    connection.info[_COMMITTED] = True
    raise _OuterTransactionCommitted(_OUTER_COMMIT)


def _label_of(db: SessionManager) -> str | None:
    """How the user's code names ``db`` (a scope object knows; creating one costs nothing)."""
    return db.scope().label


@asynccontextmanager
async def isolated(
    db: SessionManager,
    mode: Mode = "savepoint",
    *,
    schema: SchemaHook | None = None,
    clone: Clone | None = None,
    allow: Iterable[AsyncEngine] = (),
    wait_timeout: float = WAIT_TIMEOUT,
) -> AsyncIterator[SessionManager]:
    """Run the block against a database state that is thrown away at its end.

    ::

        async with isolated(db):                       # savepoint mode
            await create_user("ada")                   # commits... a SAVEPOINT
        # nothing of it persists

    Every scope of ``db`` opened inside, by any task (plain, joined, savepoint,
    independent, ``task_group()`` children, worker steps, Tornado requests,
    code that calls ``commit()`` or ``rollback()`` itself), is isolated.

    :param mode: ``"savepoint"`` (one connection and transaction, scopes take
        turns on it) or ``"clone"`` (a database of its own, real concurrency).
    :param schema: (clone mode) builds the template's schema once per process:
        ``Base.metadata.create_all``, or ``async def (connection)``.
    :param clone: (clone mode) a clone to use and keep (shared by several
        tests), instead of a new one dropped at the end.
    :param allow: engines the block may use besides the isolated database (the
        stray-engine guard refuses every other one).
    :param wait_timeout: (savepoint mode) seconds a scope waits for its turn on the
        connection before :class:`SharedConnectionTimeoutError`.
    """
    if mode == "savepoint":
        if schema is not None or clone is not None:
            raise TypeError("schema= and clone= apply to mode='clone' only")
        async with _savepoint(db, pools_of(allow), wait_timeout):
            yield db
    elif mode == "clone":
        async with _clone(db, schema, clone, pools_of(allow)):
            yield db
    else:
        raise ValueError(f"mode={mode!r}: use 'savepoint' (the default) or 'clone'")


@asynccontextmanager
async def _savepoint(db: SessionManager, allowed: Any, wait_timeout: float) -> AsyncIterator[None]:
    with own_checkouts(db.engine):  # another isolated block may be open (a second manager)
        connection = await db.engine.connect()
    try:
        outer = await connection.begin()
        event.listen(connection.sync_connection, "commit", _refuse_outer_commit)
        test_connections()[db] = connection
        shared = SharedConnection(connection, wait_timeout)
        session_class = turn_taking_class(db.options.session_class)
        committed = False
        try:
            async with db.bound_to(connection, session_class=session_class):
                with only_these_pools(allowed, _label_of(db)):
                    yield
        except BaseException as error:
            committed = connection.info.pop(_COMMITTED, False)
            if committed and not isinstance(error, _OuterTransactionCommitted):
                raise _OuterTransactionCommitted(_OUTER_COMMIT) from error
            raise
        else:
            committed = connection.info.pop(_COMMITTED, False)
            if committed:  # refused, and the refusal swallowed by the code under test
                raise _OuterTransactionCommitted(_OUTER_COMMIT)
        finally:
            shared.close()
            test_connections().pop(db, None)
            if committed:
                # SQLAlchemy ended the transaction it was refused to commit; the server
                # may still hold it: the connection must not serve anyone again.
                await connection.invalidate()
            elif not connection.invalidated and outer.is_active:
                await outer.rollback()
    finally:
        await connection.close()
        await _close_pool_with_loop(db.engine)


@asynccontextmanager
async def _clone(
    db: SessionManager, schema: SchemaHook | None, clone: Clone | None, allowed: Any
) -> AsyncIterator[None]:
    own = clone is None
    if clone is None:
        clone = await create_clone(db.engine.url, schema)
    try:
        async with db.bound_to(clone.url) as engines:
            with only_these_pools(allowed | pools_of(engines), _label_of(db)):
                yield
    finally:
        if own:
            await clone.drop()
