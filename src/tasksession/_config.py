"""Turning ``SessionManager(url, **options)`` into engines and session settings.

A :class:`Binding` is an immutable snapshot of one configuration: the primary
engine, the read replicas, the session class and its keyword arguments. A
scope captures the binding current when it opens, which is how
reconfiguring a manager leaves open scopes on their engine.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from greenlet import getcurrent  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.pool import (
    AsyncAdaptedQueuePool,
    NullPool,
    Pool,
    QueuePool,
    StaticPool,
)

from ._errors import UnsupportedDriverError
from ._guard import GUARD_MODES
from ._interrupt import root_engine
from ._session import session_class_for
from ._watchdog import CommitWatchdog

__all__ = ["Binding", "ManagerOptions", "check_async_url", "create_binding", "split_options"]

#: Options the manager itself understands; everything else goes to create_async_engine.
_MANAGER_OPTIONS = frozenset(
    {
        "guard",
        "expire_on_commit",
        "session_class",
        "replicas",
        "pgbouncer",
        "warn_after",
        "readonly_autocommit",
        "commit_timeout",
    }
)

# backend -> the asyncio driver to suggest for a synchronous URL
_ASYNC_DRIVER = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
    "mssql": "aioodbc",
    "oracle": "oracledb_async",
}

#: Seconds a scope waits for the server's answer to its COMMIT before it gives the
#: connection up and reports the outcome as unknown (``commit_timeout=``).
COMMIT_TIMEOUT = 10.0

#: Seconds a writer waits for SQLite's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ManagerOptions:
    """The manager's own settings (validated)."""

    guard: str = "concurrent"
    expire_on_commit: bool = False
    session_class: type[AsyncSession] = AsyncSession
    replicas: tuple[str | URL, ...] = ()
    pgbouncer: bool = False
    warn_after: float | None = None
    readonly_autocommit: bool = False
    commit_timeout: float | None = COMMIT_TIMEOUT

    def __post_init__(self) -> None:
        if self.guard not in GUARD_MODES:
            raise ValueError(
                f"guard={self.guard!r} is not a guard mode; use one of {', '.join(GUARD_MODES)}"
            )
        if not (
            isinstance(self.session_class, type) and issubclass(self.session_class, AsyncSession)
        ):
            raise TypeError(
                f"session_class={self.session_class!r} must be a subclass of "
                "sqlalchemy.ext.asyncio.AsyncSession"
            )
        if self.commit_timeout is not None and not self.commit_timeout > 0:
            raise ValueError(
                f"commit_timeout={self.commit_timeout!r} must be a positive number of seconds "
                "(or None to wait for the server's answer however long it takes)"
            )
        if self.warn_after is not None and self.warn_after <= 0:
            raise ValueError(f"warn_after={self.warn_after!r} must be a positive number of seconds")


def split_options(options: dict[str, Any]) -> tuple[ManagerOptions, dict[str, Any]]:
    """Separate the manager's options from ``create_async_engine`` keyword arguments."""
    ours = {key: options[key] for key in options if key in _MANAGER_OPTIONS}
    engine_kwargs = {key: options[key] for key in options if key not in _MANAGER_OPTIONS}
    if "replicas" in ours:
        replicas = ours["replicas"]
        if isinstance(replicas, str | URL):
            raise TypeError("replicas= takes a list of URLs, e.g. replicas=[url1, url2]")
        ours["replicas"] = tuple(replicas)
    return ManagerOptions(**ours), engine_kwargs


def check_async_url(url: str | URL) -> URL:
    """Parse ``url`` and refuse synchronous drivers, before any connection is attempted.

    :raises UnsupportedDriverError: the URL names no driver (``postgresql://``), or a
        driver that is not asyncio-capable (``postgresql+psycopg2://``).
    """
    parsed = make_url(url)
    if "+" not in parsed.drivername:
        # No driver named: SQLAlchemy's default for the backend is a synchronous
        # driver (or, for postgresql:// on 2.1, depends on what is installed).
        is_async = False
    else:
        try:
            is_async = bool(getattr(parsed.get_dialect(_is_async=True), "is_async", False))
        except ImportError:
            # The driver is not installed; create_async_engine will say so.
            is_async = True
    if not is_async:
        backend = parsed.get_backend_name()
        driver = parsed.get_driver_name() or backend
        async_driver = _ASYNC_DRIVER.get(backend)
        suggestion = None
        if async_driver is not None:
            suggestion = parsed.set(drivername=f"{backend}+{async_driver}").render_as_string(
                hide_password=True
            )
        raise UnsupportedDriverError(
            parsed.render_as_string(hide_password=True), driver, suggestion
        )
    return parsed


# -- SQLite ---------------------------------------------------------------------------
#
# What tasksession does to a SQLite engine, its own or an application's engine=
# (docs/concepts.md, "SQLite"):
#
# * every connection: sqlite3's legacy transaction control off (isolation_level
#   None: SQLAlchemy's documented fix for SAVEPOINTs), a busy timeout, WAL for a
#   database file (persistent: the file stays in WAL mode);
# * every transaction: tasksession emits the BEGIN itself. A writable scope's
#   session begins IMMEDIATE (concurrent writers queue on the busy timeout
#   instead of failing when a read lock cannot be upgraded); everything else
#   (readonly scopes, the application's own engine.connect()) begins deferred,
#   which never blocks readers; a connection in AUTOCOMMIT gets no BEGIN at all
#   (and, in a readonly scope, PRAGMA query_only, so that it still cannot write);
# * a pool that hands its one connection to overlapping users (StaticPool,
#   SQLAlchemy's default for :memory:) would let one unit's ROLLBACK undo another's
#   work: tasksession replaces it by a queue of one connection (url=) or refuses
#   the engine (engine=); a pool that would give an in-memory database several
#   connections (each a separate, empty database) is refused.

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


def _sqlite_engine_kwargs(url: URL, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _check_sqlite_engine(engine: AsyncEngine) -> None:
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

    The session's ``get_bind()`` (see :func:`_writer_sync_session_class`) names
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


def _sqlite_setup(engine: AsyncEngine, *, application: bool) -> None:
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


def _writer_sync_session_class(base: type[Session]) -> type[Session]:
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


def _pgbouncer_kwargs(url: URL, engine_kwargs: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    """Settings for PgBouncer in transaction pooling mode (asyncpg).

    Server-side prepared statements do not survive a transaction boundary there:
    disable asyncpg's statement cache and SQLAlchemy's, and give every
    prepared statement a unique name.
    """
    if url.get_backend_name() != "postgresql" or url.get_driver_name() != "asyncpg":
        raise ValueError("pgbouncer=True applies to postgresql+asyncpg URLs only")
    url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    kwargs = dict(engine_kwargs)
    connect_args = dict(kwargs.get("connect_args", {}))
    connect_args.setdefault("statement_cache_size", 0)
    connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
    kwargs["connect_args"] = connect_args
    return url, kwargs


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def _create_engine(url: URL, options: ManagerOptions, engine_kwargs: dict[str, Any]) -> AsyncEngine:
    if options.pgbouncer:
        url, engine_kwargs = _pgbouncer_kwargs(url, engine_kwargs)
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite:
        engine_kwargs = _sqlite_engine_kwargs(url, engine_kwargs)
    engine = create_async_engine(url, **engine_kwargs)
    if sqlite:
        _sqlite_setup(engine, application=False)
    return engine


def _readonly_engine(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` (same pool) whose transactions are read-only where the DB can enforce it."""
    backend = engine.dialect.name
    if backend == "postgresql":
        return engine.execution_options(postgresql_readonly=True, tasksession_readonly=True)
    return engine.execution_options(tasksession_readonly=True)


#: Isolation levels under which a readonly scope's statements run in autocommit
#: mode see what they would see inside one transaction: READ COMMITTED takes a
#: new snapshot per statement either way.
_AUTOCOMMIT_EQUIVALENT = (None, "READ COMMITTED", "AUTOCOMMIT")


def _readonly_autocommit_kwargs(
    url: URL, options: ManagerOptions, engine_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Engine keyword arguments for a pool of read-only, autocommit connections.

    A readonly scope on such a pool sends its statements without BEGIN/ROLLBACK
    (one round trip for a PK lookup instead of three). Writes can still never
    persist: every connection starts with ``default_transaction_read_only=on``
    (sent in the startup packet, no extra round trip), so PostgreSQL refuses
    INSERT/UPDATE/DELETE/DDL and ``SELECT ... FOR UPDATE`` on it, and the ORM's
    flush is refused before that by the readonly scope itself.

    :raises ValueError: the configuration cannot keep those promises.
    """
    if url.get_backend_name() != "postgresql" or url.get_driver_name() != "asyncpg":
        raise ValueError("readonly_autocommit=True applies to postgresql+asyncpg URLs only")
    if options.pgbouncer:
        raise ValueError(
            "readonly_autocommit=True cannot be combined with pgbouncer=True: PgBouncer "
            "refuses the startup parameter that makes the connections read-only"
        )
    isolation = engine_kwargs.get("isolation_level")
    if isolation not in _AUTOCOMMIT_EQUIVALENT:
        raise ValueError(
            f"readonly_autocommit=True needs READ COMMITTED, not isolation_level={isolation!r}: "
            "under it a readonly scope's statements would no longer share one snapshot"
        )
    kwargs = dict(engine_kwargs)
    kwargs["isolation_level"] = "AUTOCOMMIT"
    # Nothing to reset on return: no transaction is ever open on these connections.
    kwargs["pool_reset_on_return"] = None
    connect_args = dict(kwargs.get("connect_args", {}))
    server_settings = dict(connect_args.get("server_settings", {}))
    server_settings["default_transaction_read_only"] = "on"
    connect_args["server_settings"] = server_settings
    kwargs["connect_args"] = connect_args
    return kwargs


@dataclass(frozen=True, slots=True, eq=False)
class Binding:
    """One configuration of a manager: engines plus how to build sessions."""

    engine: AsyncEngine
    write_engine: AsyncEngine
    readonly_engine: AsyncEngine
    replica_engines: tuple[AsyncEngine, ...]
    replica_readonly_engines: tuple[AsyncEngine, ...]
    owns_engines: bool
    options: ManagerOptions
    session_class: type[AsyncSession]
    session_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Engines with a pool of their own besides ``engine`` (readonly_autocommit).
    extra_engines: tuple[AsyncEngine, ...] = ()
    #: What writable scopes' sessions are built with (default: ``session_kwargs``);
    #: on SQLite the sync session class that makes their transactions begin IMMEDIATE.
    write_session_kwargs: dict[str, Any] = None  # type: ignore[assignment]
    #: Bounds the wait for this configuration's COMMITs (``options.commit_timeout``).
    commit_watchdog: CommitWatchdog = field(default_factory=CommitWatchdog)

    def __post_init__(self) -> None:
        if self.write_session_kwargs is None:
            object.__setattr__(self, "write_session_kwargs", self.session_kwargs)

    async def dispose(self) -> None:
        """Dispose the engines this binding created (never a user's ``engine=``)."""
        if self.owns_engines:
            for engine in (self.engine, *self.replica_engines, *self.extra_engines):
                await engine.dispose()


def create_binding(
    url: str | URL | None,
    engine: AsyncEngine | None,
    options: ManagerOptions,
    engine_kwargs: dict[str, Any],
) -> Binding:
    """Validate everything and build a :class:`Binding` (connects to nothing)."""
    if (url is None) == (engine is None):
        raise TypeError("pass exactly one of url or engine=")
    replicas: Sequence[AsyncEngine]
    if engine is not None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"engine={engine!r} must be an AsyncEngine (sqlalchemy.ext.asyncio."
                "create_async_engine), not a synchronous Engine"
            )
        if engine_kwargs:
            raise TypeError(
                f"engine options {sorted(engine_kwargs)} cannot be applied to an existing "
                "engine=; pass them to create_async_engine yourself"
            )
        if options.replicas:
            raise TypeError("replicas= needs url=; with engine= build the replicas yourself")
        if options.readonly_autocommit:
            raise TypeError(
                "readonly_autocommit=True needs url=: it creates a second pool of read-only "
                "connections with the same settings"
            )
        if engine.dialect.name == "sqlite":
            _check_sqlite_engine(engine)
            _sqlite_setup(engine, application=True)
        primary = engine
        replicas = ()
        owns = False
    else:
        assert url is not None
        parsed = check_async_url(url)
        replica_urls = [check_async_url(r) for r in options.replicas]
        primary = _create_engine(parsed, options, engine_kwargs)
        if options.readonly_autocommit:
            readonly_kwargs = _readonly_autocommit_kwargs(parsed, options, engine_kwargs)
            readonly = _create_engine(parsed, options, readonly_kwargs)
            # Replicas serve only readonly scopes: their pools can be autocommit too.
            replicas = tuple(_create_engine(r, options, readonly_kwargs) for r in replica_urls)
            return Binding(
                engine=primary,
                write_engine=primary,
                # These pools serve readonly scopes only, in AUTOCOMMIT: no option
                # view on top (each one costs a little on every connection).
                readonly_engine=readonly,
                replica_engines=replicas,
                replica_readonly_engines=replicas,
                owns_engines=True,
                options=options,
                session_class=session_class_for(options.session_class, options.guard),
                session_kwargs={"expire_on_commit": options.expire_on_commit},
                extra_engines=(readonly,),
            )
        replicas = tuple(_create_engine(r, options, engine_kwargs) for r in replica_urls)
        owns = True
    session_kwargs: dict[str, Any] = {"expire_on_commit": options.expire_on_commit}
    write_session_kwargs = session_kwargs
    if primary.dialect.name == "sqlite":
        # Writable scopes' sessions are bound to the engine itself and name
        # themselves to the BEGIN listener (see _writer_sync_session_class).
        writer = _writer_sync_session_class(options.session_class.sync_session_class)
        write_session_kwargs = {**session_kwargs, "sync_session_class": writer}
    return Binding(
        engine=primary,
        write_engine=primary,
        readonly_engine=_readonly_engine(primary),
        replica_engines=tuple(replicas),
        replica_readonly_engines=tuple(_readonly_engine(e) for e in replicas),
        owns_engines=owns,
        options=options,
        session_class=session_class_for(options.session_class, options.guard),
        session_kwargs=session_kwargs,
        write_session_kwargs=write_session_kwargs,
    )
