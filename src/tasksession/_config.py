"""Turning ``SessionManager(url, **options)`` into engines and session settings.

A :class:`Binding` is an immutable snapshot of one configuration: the primary
engine, the read replicas, the session class and its keyword arguments. A
scope captures the binding current when it opens, which is how
reconfiguring a manager leaves open scopes on their engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from ._errors import UnsupportedDriverError
from ._guard import GUARD_MODES
from ._session import session_class_for

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


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and real BEGINs for SQLite.

    sqlite3's legacy transaction control emits no BEGIN before SELECT or
    SAVEPOINT, so savepoints escape the enclosing transaction; SQLAlchemy's
    documented fix is to take over BEGIN ourselves. Writable scopes (their
    engine view carries ``tasksession_write``) use ``BEGIN IMMEDIATE`` so that
    concurrent writers queue on the busy timeout instead of failing when a read
    lock cannot be upgraded; everything else (readonly scopes, the application's
    own ``engine.connect()``) uses a deferred BEGIN, which never blocks readers.
    """
    sync_engine = engine.sync_engine
    is_memory = sync_engine.url.database in (None, "", ":memory:")

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            if not is_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get("tasksession_write"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


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
    engine = create_async_engine(url, **engine_kwargs)
    if url.get_backend_name() == "sqlite":
        _sqlite_setup(engine)
    return engine


def _write_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine writable scopes use: on SQLite a view (same pool) that begins IMMEDIATE."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(tasksession_write=True)
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
                write_engine=_write_engine(primary),
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
    return Binding(
        engine=primary,
        write_engine=_write_engine(primary),
        readonly_engine=_readonly_engine(primary),
        replica_engines=tuple(replicas),
        replica_readonly_engines=tuple(_readonly_engine(e) for e in replicas),
        owns_engines=owns,
        options=options,
        session_class=session_class_for(options.session_class, options.guard),
        session_kwargs={"expire_on_commit": options.expire_on_commit},
    )
