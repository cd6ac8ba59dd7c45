"""SQLite through aiosqlite: the setup that makes its transactions behave.

What tasksession does to a SQLite engine, its own or an application's engine=
(docs/concepts.md, "SQLite"):

* every connection: sqlite3's legacy transaction control off (isolation_level
  None: SQLAlchemy's documented fix for SAVEPOINTs), a busy timeout, WAL for a
  database file (persistent: the file stays in WAL mode);
* every transaction: tasksession emits the BEGIN itself. A writable scope's
  session begins IMMEDIATE (concurrent writers queue on the busy timeout
  instead of failing when a read lock cannot be upgraded); everything else
  (readonly scopes, the application's own engine.connect()) begins deferred,
  which never blocks readers; a connection in AUTOCOMMIT gets no BEGIN at all
  (and, in a readonly scope, PRAGMA query_only, so that it still cannot write);
* a pool that hands its one connection to overlapping users (StaticPool,
  SQLAlchemy's default for :memory:) would let one unit's ROLLBACK undo another's
  work: tasksession replaces it by a queue of one connection (url=) or refuses
  the engine (engine=); a pool that would give an in-memory database several
  connections (each a separate, empty database) is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

from greenlet import getcurrent  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, Pool, QueuePool, StaticPool

from ._interrupt import root_engine

__all__ = [
    "SQLITE_BUSY_TIMEOUT",
    "check_sqlite_engine",
    "sqlite_engine_kwargs",
    "sqlite_setup",
    "writer_sync_session_class",
]

#: Seconds a writer waits for SQLite's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 30.0

#: Record-info keys: the connection got the setup (engine=); PRAGMA query_only is on.
_PREPARED = "tasksession.sqlite"
_QUERY_ONLY = "tasksession.sqlite.query_only"
#: The greenlet attribute naming the writable session whose operation runs in it.
_WRITER = "_ts_sqlite_writer"
_PROVISIONING = SessionTransactionState.PROVISIONING_CONNECTION

# Root sync engines that have the listeners (installed once per engine).
_SET_UP: weakref.WeakSet[Engine] = weakref.WeakSet()
_WRITER_CLASSES: dict[type[Session], type[Session]] = {}


def _is_memory(url: URL) -> bool:
    """Whether ``url`` names an in-memory database (the dialect's own test for its pool)."""
    return not url.database or url.database == ":memory:" or url.query.get("mode") == "memory"


class _OneConnectionPool(AsyncAdaptedQueuePool):
    """The pool of a SQLite database that one connection must serve: units take turns."""

    _waiting = 0

    def waiting(self) -> int:
        """How many checkouts are waiting for the connection (or about to get it)."""
        return self._waiting

    def _do_get(self) -> Any:
        self._waiting += 1
        try:
            return super()._do_get()
        finally:
            self._waiting -= 1

    def status(self) -> str:
        return (
            "one SQLite connection, which overlapping units take in turn, each waiting up "
            f"to pool_timeout={self.timeout():g}s; {super().status()}"
        )


def sqlite_engine_kwargs(url: URL, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``create_async_engine`` arguments for a SQLite URL: the pool, and the busy timeout.

    :raises ValueError: the pool would give an in-memory database more than one
        connection (each would be a database of its own).
    """
    kwargs = dict(engine_kwargs)
    memory = _is_memory(url)
    poolclass = kwargs.get("poolclass")
    shares_one = isinstance(poolclass, type) and issubclass(poolclass, StaticPool)
    if shares_one or (memory and poolclass is None):
        # One connection handed to overlapping units means one unit's BEGIN fails
        # and its ROLLBACK undoes the other's work, which then "commits" nothing.
        # A queue of one connection makes them take turns instead, up to pool_timeout.
        for option, wanted in (("pool_size", 1), ("max_overflow", 0)):
            if kwargs.get(option, wanted) != wanted:
                raise ValueError(
                    f"{option}={kwargs[option]!r} cannot apply to "
                    f"{url.render_as_string(hide_password=True)}: it has one connection "
                    "(in memory, each further connection would be a separate, empty "
                    "database); overlapping units take turns on it. Leave out "
                    f"{option}, or use a database file for concurrent units."
                )
        kwargs.update(poolclass=_OneConnectionPool, pool_size=1, max_overflow=0)
    elif memory:
        _refuse_memory_pool(
            url, poolclass, kwargs.get("pool_size", 5), kwargs.get("max_overflow", 10)
        )
    if "timeout" not in url.query:
        connect_args = dict(kwargs.get("connect_args", {}))
        # sqlite3 sets the busy timeout when it connects: no PRAGMA needed.
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
        kwargs["connect_args"] = connect_args
    return kwargs


def _refuse_memory_pool(url: URL, poolclass: Any, size: Any, overflow: Any) -> None:
    """Refuse pools that would give an in-memory database more than one connection."""
    if poolclass is None:
        return
    if isinstance(poolclass, type) and issubclass(poolclass, NullPool):
        why = "NullPool opens a new connection for every unit"
    elif (
        isinstance(poolclass, type)
        and issubclass(poolclass, QueuePool)
        and (size != 1 or overflow != 0)
    ):
        why = f"{poolclass.__name__}(pool_size={size}, max_overflow={overflow}) opens several"
    else:
        return
    raise ValueError(
        f"{url.render_as_string(hide_password=True)} is an in-memory SQLite database, "
        f"which lives in one connection, but {why}: each new connection would be a "
        "separate, empty database, and what a unit committed would vanish with its "
        "connection. Leave out poolclass= (tasksession then serves the database from one "
        "connection that overlapping units take in turn), or use a database file."
    )


def check_sqlite_engine(engine: AsyncEngine) -> None:
    """Refuse an application's SQLite engine whose pool could lose committed work.

    :raises ValueError: the pool hands one connection to overlapping users, or
        gives an in-memory database several connections.
    """
    pool: Pool = engine.sync_engine.pool
    url = engine.url
    if isinstance(pool, StaticPool):
        raise ValueError(
            f"engine= ({url.render_as_string(hide_password=True)}) uses "
            f"{type(pool).__name__}, which hands its one connection to every unit at once: on SQLite a second unit's BEGIN fails and its ROLLBACK "
            "undoes the first unit's work, which then commits nothing. Create the engine "
            "with poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0 (overlapping "
            "units then wait their turn, up to pool_timeout), or pass the URL to "
            "SessionManager/configure(), which does that for you."
        )
    if _is_memory(url):
        size = pool.size() if isinstance(pool, QueuePool) else None
        overflow = getattr(pool, "_max_overflow", None)
        _refuse_memory_pool(url, type(pool), size, overflow)


def _prepare_connection(dbapi_connection: Any, memory: bool, raise_busy_timeout: bool) -> None:
    """Per-connection setup: no legacy transaction control, a busy timeout, WAL."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        if raise_busy_timeout:
            # An application's engine: keep a longer timeout it chose (sqlite3's
            # default is 5 s; tasksession's own engines set it when connecting).
            cursor.execute("PRAGMA busy_timeout")
            row = cursor.fetchone()
            wanted = int(SQLITE_BUSY_TIMEOUT * 1000)
            if row is None or row[0] < wanted:
                cursor.execute(f"PRAGMA busy_timeout = {wanted}")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _writer_is_connecting() -> bool:
    """Whether the connection being begun is the one a writable scope's session provisions.

    The session's ``get_bind()`` (see :func:`writer_sync_session_class`) names
    itself on the greenlet running the operation; the BEGIN it is about to get
    runs in that same greenlet, while its root transaction is provisioning the
    connection. Any other connection begun there (``run_sync`` code calling
    ``engine.connect()``) finds the session not provisioning.
    """
    writer = getattr(getcurrent(), _WRITER, None)
    if writer is None:
        return False
    transaction = writer._transaction
    if transaction is None:
        return False
    while transaction._parent is not None:
        transaction = transaction._parent
    return transaction._state is _PROVISIONING


def _set_query_only(connection: Connection, on: bool) -> None:
    connection.exec_driver_sql(f"PRAGMA query_only = {int(on)}")
    connection.info[_QUERY_ONLY] = on


def sqlite_setup(engine: AsyncEngine, *, application: bool) -> None:
    """Install the SQLite setup on ``engine``'s root engine (once): see the comment above.

    sqlite3's legacy transaction control emits no BEGIN before SELECT or
    SAVEPOINT, so savepoints escape the enclosing transaction; SQLAlchemy's
    documented fix is to take over BEGIN ourselves.

    :param application: the application's ``engine=``: its pool may hold
        connections already, and it may have set a longer busy timeout.
    """
    root = root_engine(engine.sync_engine)
    if root in _SET_UP:
        return
    _SET_UP.add(root)
    memory = _is_memory(root.url)
    # An application's engine may have SQLAlchemy's recipe already (a "begin"
    # listener that emits BEGIN): then that BEGIN stands.
    begun_by_others = bool(root.dispatch.begin)

    if application:

        @event.listens_for(root, "checkout")
        def _on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
            # At checkout, not connect: the pool may hold connections made before
            # configure(engine=); and nothing has begun on it yet (WAL cannot be
            # switched on inside a transaction, and isolation_level would commit it).
            info = connection_record.info
            if _PREPARED not in info:
                _prepare_connection(dbapi_connection, memory, True)
                info[_PREPARED] = True

    else:

        @event.listens_for(root, "connect")
        def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            _prepare_connection(dbapi_connection, memory, False)

    @event.listens_for(root, "begin")
    def _on_begin(connection: Connection) -> None:
        info = connection.info
        readonly = bool(connection.get_execution_options().get("tasksession_readonly"))
        # SQLAlchemy's own test (base.Connection), for the connection's option and
        # the engine's isolation_level alike: every supported version has it.
        if connection._is_autocommit_isolation():
            # No BEGIN: each statement commits by itself. A readonly scope still
            # cannot write: SQLite refuses every change while query_only is on.
            if info.get(_QUERY_ONLY, False) is not readonly:
                _set_query_only(connection, readonly)
            return
        if info.get(_QUERY_ONLY, False):
            _set_query_only(connection, False)
        if begun_by_others:
            driver: Any = connection.connection.driver_connection  # aiosqlite's Connection
            if driver.in_transaction:
                return
        if not readonly and _writer_is_connecting():
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def writer_sync_session_class(base: type[Session]) -> type[Session]:
    """A subclass of ``base`` whose connections begin IMMEDIATE on SQLite (no engine view).

    SQLAlchemy asks ``get_bind()`` right before it provisions a connection, in
    the greenlet of the operation that needs it: the session names itself
    there, for the ``begin`` listener (:func:`_writer_is_connecting`). The
    session stays bound to the engine itself (``session.bind is db.engine``).
    """
    cls = _WRITER_CLASSES.get(base)
    if cls is not None:
        return cls
    base_get_bind = base.get_bind

    def get_bind(self: Session, *args: Any, **kwargs: Any) -> Any:
        current = getcurrent()
        if current.parent is not None:  # an operation's greenlet, never the loop's own
            setattr(current, _WRITER, self)
        return base_get_bind(self, *args, **kwargs)

    cls = type(
        base.__name__,
        (base,),
        {"get_bind": get_bind, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )
    _WRITER_CLASSES[base] = cls
    return cls
