"""Turning ``SessionManager(url, **options)`` into engines and session settings.

A :class:`Binding` is an immutable snapshot of one configuration: the primary
engine, the read replicas, the session class and its keyword arguments. A
scope captures the binding current when it opens, which is how
reconfiguring a manager leaves open scopes on their engine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from ._commit import CommitWatchdog
from ._guard import GUARD_MODES
from ._sqlite import (
    check_sqlite_engine,
    sqlite_engine_kwargs,
    sqlite_setup,
    writer_sync_session_class,
)
from ._urls import check_async_url

__all__ = ["Binding", "ManagerOptions", "create_binding", "split_options"]

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

#: Seconds a scope waits for the server's answer to its COMMIT before it gives the
#: connection up and reports the outcome as unknown (``commit_timeout=``).
COMMIT_TIMEOUT = 10.0

#: Seconds after a commit during which the same task's readonly scopes read
#: from the primary, so they see their own writes (replicas may lag).
REPLICA_LAG = 5.0


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
        engine_kwargs = sqlite_engine_kwargs(url, engine_kwargs)
    engine = create_async_engine(url, **engine_kwargs)
    if sqlite:
        sqlite_setup(engine, application=False)
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

    #: Whose turn it is among the replicas (round robin).
    replica_turn: Iterator[int] = field(default_factory=itertools.count)
    #: The ``create_async_engine`` arguments (none for an application's ``engine=``):
    #: another database of the same configuration gets the same settings.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.write_session_kwargs is None:
            object.__setattr__(self, "write_session_kwargs", self.session_kwargs)

    @property
    def engines(self) -> tuple[AsyncEngine, ...]:
        """Every engine with a pool of its own: primary, replicas, extra pools."""
        return (self.engine, *self.replica_engines, *self.extra_engines)

    def readonly_engine_for(self, wrote_at: ContextVar[float]) -> AsyncEngine:
        """The engine of a readonly scope of a task whose last committed write ``wrote_at`` holds.

        A replica, unless that was within :data:`REPLICA_LAG` seconds (read-your-writes).
        """
        replicas = self.replica_readonly_engines
        if replicas and time.monotonic() - wrote_at.get(-REPLICA_LAG) >= REPLICA_LAG:
            return replicas[next(self.replica_turn) % len(replicas)]
        return self.readonly_engine

    async def dispose(self) -> None:
        """Dispose the engines this binding created (never a user's ``engine=``)."""
        if self.owns_engines:
            for engine in self.engines:
                await engine.dispose()


def create_binding(
    url: str | URL | None,
    engine: AsyncEngine | None,
    options: ManagerOptions,
    engine_kwargs: dict[str, Any],
    session_class: type[AsyncSession],
) -> Binding:
    """Validate everything and build a :class:`Binding` (connects to nothing).

    :param session_class: the class scopes create (the guarded, lazily built
        subclass of ``options.session_class``).
    """
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
            check_sqlite_engine(engine)
            sqlite_setup(engine, application=True)
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
                session_class=session_class,
                session_kwargs={"expire_on_commit": options.expire_on_commit},
                extra_engines=(readonly,),
                engine_kwargs=engine_kwargs,
            )
        replicas = tuple(_create_engine(r, options, engine_kwargs) for r in replica_urls)
        owns = True
    session_kwargs: dict[str, Any] = {"expire_on_commit": options.expire_on_commit}
    write_session_kwargs = session_kwargs
    if primary.dialect.name == "sqlite":
        # Writable scopes' sessions are bound to the engine itself and name
        # themselves to the BEGIN listener (see writer_sync_session_class).
        writer = writer_sync_session_class(options.session_class.sync_session_class)
        write_session_kwargs = {**session_kwargs, "sync_session_class": writer}
    return Binding(
        engine=primary,
        write_engine=primary,
        readonly_engine=_readonly_engine(primary),
        replica_engines=tuple(replicas),
        replica_readonly_engines=tuple(_readonly_engine(e) for e in replicas),
        owns_engines=owns,
        options=options,
        session_class=session_class,
        session_kwargs=session_kwargs,
        write_session_kwargs=write_session_kwargs,
        engine_kwargs=engine_kwargs,
    )
