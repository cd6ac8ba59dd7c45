"""Every third-party internal tasksession relies on, with the reason it is needed.

tasksession stays fast and precise by reading a few private names of the
libraries it wraps (SQLAlchemy, its asyncpg adapter, asyncio, Tornado) and by
counting on a few behaviours no documentation promises. Each one is a record
in :data:`PINS`: who owns it, what kind of thing it is, which tasksession
modules use it, and why (what breaks, or what it costs, without it).

**The rule.** A third-party private name (a ``_name`` that tasksession does not
define itself), or an undocumented behaviour, is used only once it is listed
here with its reason; otherwise it is not used. ``tests/test_pins.py`` enforces
it both ways: it reads every module of the package (AST) and fails on a private
name used that no pin lists, and on a pin that no module uses any more; and it
checks every pin on the installed versions (CI runs it on the oldest and the
newest supported SQLAlchemy, and on Tornado when it is installed). When a pin
fails after an upgrade, its ``reason`` says what to replace.

This module imports nothing from tasksession (level 1 of the module map), and
nothing of the libraries it names: owners are dotted paths, resolved only by
the tests (so listing Tornado here never imports Tornado).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["PINS", "Pin"]

Kind = Literal["attribute", "method", "function", "behaviour"]


@dataclass(frozen=True, slots=True)
class Pin:
    """One third-party internal tasksession relies on."""

    #: Importable dotted path of the class or module that has it.
    owner: str
    #: The private name; for a behaviour, a short description of it.
    name: str
    #: ``attribute`` (of instances or of the class), ``method``, ``function``
    #: (of a module), or ``behaviour`` (no name to read: something it does).
    kind: Kind
    #: The tasksession modules that rely on it (``tasksession._scope``, ...).
    used_by: tuple[str, ...]
    #: Why tasksession needs it, and what breaks or costs more without it.
    reason: str
    #: Where ``owner`` lived in older supported versions (tried in turn).
    also_owner: tuple[str, ...] = ()
    #: For a method or function: its parameter names, which tasksession's calls
    #: (or its override) depend on.
    parameters: tuple[str, ...] | None = None
    #: ``(distribution, (major, minor))``: needed, and present, only before that
    #: version (``"python"`` for the interpreter); tasksession checks it exists.
    only_before: tuple[str, tuple[int, int]] | None = None


_SA_SESSION = "sqlalchemy.orm.Session"
_SA_TRANSACTION = "sqlalchemy.orm.SessionTransaction"
_SA_CONNECTION = "sqlalchemy.engine.Connection"
_SA_RESULT = "sqlalchemy.engine.Result"
_ADAPTER = "sqlalchemy.dialects.postgresql.asyncpg.AsyncAdapt_asyncpg_connection"
_HANDLER = "tornado.web.RequestHandler"
_SHORTCUTS = ("tasksession._shortcuts",)
_TORNADO = ("tasksession.tornado",)

# A table: one record per pin, laid out by hand (ruff format would give each field a line).
# fmt: off
PINS: Final[tuple[Pin, ...]] = (
    # -- SQLAlchemy ORM: the session's transaction ------------------------------------
    Pin(
        _SA_SESSION, "_transaction", "attribute",
        ("tasksession._commit", "tasksession._shortcuts", "tasksession._sqlite"),
        "The root SessionTransaction, read without get_transaction()'s proxy: the short "
        "commit ways, the SQLite BEGIN IMMEDIATE test and a failed commit's outcome.",
    ),
    Pin(
        _SA_TRANSACTION, "_parent", "attribute",
        ("tasksession._commit", "tasksession._shortcuts", "tasksession._sqlite"),
        "Walks up to the root transaction; None means no savepoint or subtransaction "
        "is open (the short commit way needs that).",
    ),
    Pin(
        _SA_TRANSACTION, "_state", "attribute",
        ("tasksession._commit", "tasksession._sqlite"),
        "PREPARED means the COMMIT was sent (a failure then leaves the outcome unknown); "
        "PROVISIONING_CONNECTION tells the writer's own BEGIN on SQLite.",
    ),
    Pin(
        _SA_TRANSACTION, "_connections", "attribute",
        ("tasksession._shortcuts",),
        "bind -> (Connection, transaction, should_commit, autoclose), keyed by engine and "
        "by connection: the connections a unit holds, to commit, discard or cut. Public "
        "(SessionTransaction.connections) only from SQLAlchemy 2.1.7.",
    ),
    Pin(
        _SA_TRANSACTION, "_rollback_can_be_called", "method",
        ("tasksession._savepoint",),
        "Whether a savepoint scope's SAVEPOINT is still open (not released, not ended by "
        "session.commit() inside the block): the exit releases it or reports the misuse.",
        parameters=("self",),
    ),
    Pin(
        _SA_SESSION, "_is_clean", "method",
        ("tasksession._shortcuts", "tasksession._teardown"),
        "Nothing to flush: the short commit way's condition, and the readonly scope's "
        "refusal of unflushed writes (new/dirty/deleted would build three lists).",
        parameters=("self",),
    ),
    Pin(
        "sqlalchemy.ext.asyncio.AsyncSessionTransaction", "_retrieve_proxy_for_target",
        "method", ("tasksession._session",),
        "Hands out the guarded transaction proxy for an autobegun transaction; the "
        "plain one SQLAlchemy returns would commit and roll back past the guard.",
        parameters=("target", "regenerate", "additional_kw"),
    ),
    Pin(
        "sqlalchemy.ext.asyncio.AsyncSession", "_proxied", "attribute",
        ("tasksession._session",),
        "With sync_session, the attribute AsyncSession's proxied methods read first: a "
        "descriptor for both builds the lazy session on first use without CPython "
        "raising an AttributeError before __getattr__ (on every unit's path).",
    ),
    # -- SQLAlchemy ORM: loading and results -----------------------------------------
    Pin(
        "sqlalchemy.orm.attributes._AttributeImpl", "_fire_loader_callables", "method",
        ("tasksession._loading",),
        "The one place an attribute load is attempted that knows the attribute: the "
        "implicit-I/O check wraps it (ImplicitIOError instead of MissingGreenlet).",
        also_owner=("sqlalchemy.orm.attributes.AttributeImpl",),
        parameters=("self", "state", "key", "passive"),
    ),
    Pin(
        "sqlalchemy.orm.mapperlib", "_all_registries", "function",
        ("tasksession._loading",),
        "The only list of every registry, to protect mappers configured before "
        "tasksession was installed.",
        parameters=(),
    ),
    Pin(
        "sqlalchemy.ext.asyncio.AsyncResult", "_real_result", "attribute",
        ("tasksession._streams",),
        "The sync Result under a stream(): its fetch methods are shadowed so that a "
        "stream read after its scope raises StreamClosedError.",
    ),
    *(
        Pin(
            _SA_RESULT, method, "method", ("tasksession._streams",),
            "Every fetch of a stream and of what derives from it (scalars(), mappings()) "
            "ends here: shadowed on a closed scope's streams.",
        )
        for method in ("_fetchiter_impl", "_fetchone_impl", "_fetchmany_impl", "_fetchall_impl")
    ),
    # -- SQLAlchemy Core: engines, connections, pools --------------------------------
    Pin(
        _SA_CONNECTION, "_dbapi_connection", "attribute", _SHORTCUTS,
        "The pooled connection (or None) under a Connection, read without the "
        "connection property's checks (which would raise on an invalidated one).",
    ),
    Pin(
        _SA_CONNECTION, "_has_events", "attribute", _SHORTCUTS,
        "Whether listeners are on this Connection: the driver commit would bypass them.",
    ),
    Pin(
        "sqlalchemy.engine.Engine", "_has_events", "attribute", _SHORTCUTS,
        "Whether listeners are on the engine: the driver commit would bypass them.",
    ),
    Pin(
        _SA_CONNECTION, "_is_autocommit_isolation", "method", ("tasksession._sqlite",),
        "SQLAlchemy's own AUTOCOMMIT test (connection option or engine isolation_level): "
        "no BEGIN is emitted for SQLite then.",
        parameters=("self",),
    ),
    Pin(
        "sqlalchemy.engine.base.OptionEngine", "_proxied", "attribute",
        ("tasksession._interrupt",),
        "The engine an execution_options() view proxies: orphaned statements are kept "
        "per real engine (the pool's owner).",
    ),
    Pin(
        "sqlalchemy.pool.Pool", "_creator", "attribute", ("tasksession._interrupt",),
        "Opens a driver connection with the engine's settings outside the pool, to send "
        "pg_cancel_backend without taking a pooled connection from the application.",
    ),
    Pin(
        "sqlalchemy.pool.QueuePool", "_max_overflow", "attribute", ("tasksession._sqlite",),
        "An application's pool's overflow (no public reader): an in-memory SQLite "
        "database with more than one connection is refused.",
    ),
    Pin(
        "sqlalchemy.pool.QueuePool", "_do_get", "method", ("tasksession._sqlite",),
        "Overridden by the one-connection SQLite pool to count waiting checkouts "
        "(pool statistics).",
        parameters=("self",),
    ),
    Pin(
        "sqlalchemy.pool.base._ConnectionFairy", "_pool", "attribute",
        (*_SHORTCUTS, "tasksession.testing._stray"),
        "The pool a connection returns to: a close without I/O needs room in it and "
        "no reset/checkin listener; the stray-engine guard tells the isolated pools "
        "from the others by it (a checkout listener gets the connection, not its pool).",
    ),
    # -- SQLAlchemy's asyncpg adapter -------------------------------------------------
    Pin(
        _ADAPTER, "_transaction", "attribute", _SHORTCUTS,
        "asyncpg's transaction of the connection: None in AUTOCOMMIT (closing needs no "
        "I/O); the driver commit awaits its commit(), and replays a failure through "
        "the adapter (which awaits _transaction.commit() and translates the error).",
    ),
    Pin(
        _ADAPTER, "_connection", "attribute", _SHORTCUTS,
        "The asyncpg Connection itself, to terminate() it at once (commit_timeout, "
        "discarding an in-doubt connection) without a greenlet or a graceful close.",
    ),
    Pin(
        _ADAPTER, "_started", "attribute", _SHORTCUTS,
        "SQLAlchemy 2.0's adapter flags a started transaction; reset after the driver "
        "commit, else the next BEGIN is skipped.",
        only_before=("sqlalchemy", (2, 1)),
    ),
    # -- asyncio and the interpreter -------------------------------------------------
    Pin(
        "asyncio.events", "_get_running_loop", "function", ("tasksession._compat",),
        "The running loop or None, in C, without get_running_loop()'s exception when "
        "there is none (the guard's thread checks).",
        parameters=(),
    ),
    Pin(
        "asyncio.tasks", "_current_tasks", "attribute", ("tasksession._compat",),
        "loop -> running task: current_task() without its Python-level overhead on "
        "3.11 (3.12 implements it in C).",
        only_before=("python", (3, 12)),
    ),
    Pin(
        "sys", "_getframe", "function",
        (
            "tasksession._guard", "tasksession._manager", "tasksession._scope",
            "tasksession._tasks", "tasksession.testing._frames",
        ),
        "Documented, but CPython's: where a scope opens (its name and diagnostics) "
        "without inspect.stack()'s cost, and the generator frames a scope is private to; "
        "where a test's stray query or leaked connection came from.",
        parameters=("depth",),
    ),
    # -- behaviours no documentation promises ---------------------------------------
    Pin(
        "greenlet.greenlet", "a greenlet accepts attributes set on it", "behaviour",
        ("tasksession._sqlite",),
        "The writable session names itself on the greenlet that provisions its "
        "connection, for the SQLite begin listener (BEGIN IMMEDIATE for writers).",
    ),
    Pin(
        _SA_SESSION, "get_bind() runs in the greenlet whose BEGIN then fires", "behaviour",
        ("tasksession._sqlite",),
        "get_bind() is called right before the connection is provisioned, in the same "
        "greenlet as the engine's begin event, while the root transaction is "
        "PROVISIONING_CONNECTION: that is how the begin listener knows the writer.",
    ),
    Pin(
        _SA_SESSION, "Session instances take extra attributes", "behaviour",
        ("tasksession._loading", "tasksession._session"),
        "sync_session._ts_scope links sync-level events and loads to the scope; an "
        "implicit load shadows execute in the session's __dict__ while it runs.",
    ),
    Pin(
        _SA_SESSION, "ORM loaders query through the instance's Session.execute", "behaviour",
        ("tasksession._loading",),
        "An implicit load outside the greenlet is refused at its first step towards I/O "
        "by shadowing execute on the session instance.",
    ),
    Pin(
        "sqlalchemy.orm.attributes._AttributeImpl",
        "an attribute impl's __class__ can be swapped for a slot-less subclass",
        "behaviour", ("tasksession._loading",),
        "Each attribute impl gets the implicit-I/O check by a class switch (same slots "
        "layout), at no cost to loaded attributes.",
        also_owner=("sqlalchemy.orm.attributes.AttributeImpl",),
    ),
    Pin(
        "sqlalchemy.ext.asyncio.AsyncSession",
        "AsyncSession.__init__ stores sync_session in the instance __dict__", "behaviour",
        ("tasksession._scope", "tasksession._session"),
        "Tells a built session from a lazy one (is_materialized, Scope.pending) with a "
        "dict lookup, and lets the instance attribute replace the build-on-use descriptor.",
    ),
    Pin(
        _SA_RESULT, "a Result's instance attributes shadow its methods", "behaviour",
        ("tasksession._streams",),
        "Result's __slots__ include __dict__: the fetch methods of one closed stream are "
        "replaced for that stream only.",
    ),
    Pin(
        "sqlalchemy.pool.Pool", "every checkout runs Pool.connect()", "behaviour",
        ("tasksession._retry",),
        "An error raised inside a checkout is told by the code object of Pool.connect "
        "(or an override) in its traceback: retrying it sent no statement yet.",
    ),
    Pin(
        "asyncio.Task", "a cancelled task cancels the task it awaits", "behaviour",
        ("tasksession._completion",),
        "Cleanup runs in a Task subclass whose cancel() refuses: neither Task.cancel() "
        "nor an anyio cancel scope on the awaiting task can cut a COMMIT off half-way.",
    ),
    Pin(
        "asyncpg.connection.Connection", "terminate() closes at once, without I/O",
        "behaviour", ("tasksession._interrupt", "tasksession._shortcuts"),
        "Cuts a connection whose statement was cancelled, or whose COMMIT got no answer, "
        "without the graceful close's wait (up to 2 s over a stalled network).",
    ),
    Pin(
        "asyncpg.connection.Connection", "get_server_pid() names the backend", "behaviour",
        ("tasksession._interrupt",),
        "The server process of a connection invalidated by a cancellation, whose "
        "orphaned statement is then stopped with pg_cancel_backend.",
    ),
    # -- Tornado (optional; tasksession.tornado only) ---------------------------------
    Pin(
        _HANDLER, "_execute", "method", _TORNADO,
        "Overridden (and called through super()) to open the request's scope before "
        "prepare() and end it however the request ends.",
        parameters=("self", "transforms", "args", "kwargs"),
    ),
    Pin(
        _HANDLER, "_auto_finish", "attribute", _TORNADO,
        "Switched off around the handler so that the commit runs in the request's task "
        "before finish() sends the response.",
    ),
    Pin(
        _HANDLER, "_finished", "attribute", _TORNADO,
        "Whether the response was finished; set while a deferred commit-then-finish "
        "runs, so that no write() or finish() slips in.",
    ),
    Pin(
        _HANDLER, "_headers_written", "attribute", _TORNADO,
        "A 2xx already went out (a streamed response): a failed commit aborts the "
        "connection instead of sending a 500.",
    ),
    Pin(
        _HANDLER, "_status_code", "attribute", _TORNADO,
        "Set to 500 for the access log when an aborted streamed response's 2xx was "
        "not kept.",
    ),
)
# fmt: on
