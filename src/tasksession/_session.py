"""The session classes scopes hand out: lazily built, guarded ``AsyncSession`` subclasses.

For each user ``session_class`` (default :class:`~sqlalchemy.ext.asyncio.AsyncSession`)
and guard mode, :func:`session_class_for` builds one subclass, once, that

* **defers construction**: ``async with db.scope() as session`` hands out the
  session object at once, but SQLAlchemy's ``__init__`` (which builds the sync
  :class:`~sqlalchemy.orm.Session`) runs only when the object is first really
  used, through ``__getattr__``. A scope whose session is never touched costs
  no session at all;
* **guards** every operation that can touch the database or the session's
  state (see :data:`GUARDED_COROUTINES`, :data:`GUARDED_SYNC`), refusing it
  once the scope has ended and, per guard mode, while another task is using it;
* turns a pool checkout timeout into :class:`PoolExhaustedError`, which names
  the scopes holding the connections.

Being a subclass of the user's class, the object passes ``isinstance`` checks
and keeps every method the user added.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, AsyncSessionTransaction
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from . import _loading, _streams
from ._completion import run_to_completion
from ._errors import ReadOnlyScopeError
from ._guard import COROUTINE_GUARDS, SYNC_GUARDS
from ._members import GUARDED_COROUTINES, GUARDED_SYNC, UNGUARDED
from ._pool import exhausted
from ._stats import Ledger, NamedScope, ScopeRegistry

__all__ = [
    "GUARDED_COROUTINES",
    "SessionScope",
    "GUARDED_SYNC",
    "UNGUARDED",
    "is_materialized",
    "session_class_for",
]

_CLASS_CACHE: dict[tuple[type[AsyncSession], str], type[AsyncSession]] = {}

logger = logging.getLogger("tasksession")


class SessionScope(NamedScope, Protocol):
    """What a session reads of (and reports to) the scope that created it."""

    readonly: bool
    closed: bool
    binding: Any  # the scope's configuration (a _config.Binding)

    @property
    def label(self) -> str | None: ...
    @property
    def engine(self) -> AsyncEngine: ...
    @property
    def open_scopes(self) -> ScopeRegistry: ...
    @property
    def ledger(self) -> Ledger: ...
    def session_built(self) -> None: ...


def is_materialized(session: AsyncSession) -> bool:
    """Whether SQLAlchemy's ``__init__`` has run on ``session`` (it was used)."""
    return "sync_session" in session.__dict__


def _pool_exhausted(session: Any, error: sa_exc.TimeoutError) -> BaseException:
    # The pool that timed out is the one of the engine this session is bound to
    # (a readonly scope's may be the readonly_autocommit pool or a replica's).
    # The session is built by now (a checkout ran); the check keeps it unbuilt if not.
    scope: SessionScope = session._ts_scope
    bind = session.bind if is_materialized(session) else scope.binding.engine
    return exhausted(error, bind, scope.open_scopes, scope.ledger)


# Steps the guard must see as operations of the session (guarded _ts_* methods).


async def _start(session: Any, transaction: Any, is_ctxmanager: bool) -> Any:
    return await AsyncSessionTransaction.start(transaction, is_ctxmanager)


async def _commit(session: Any, transaction: Any) -> None:
    await AsyncSessionTransaction.commit(transaction)


async def _rollback(session: Any, transaction: Any) -> None:
    await AsyncSessionTransaction.rollback(transaction)


async def _exit(session: Any, transaction: Any, type_: Any, value: Any, traceback: Any) -> None:
    await AsyncSessionTransaction.__aexit__(transaction, type_, value, traceback)


async def _run_step(session: Any, step: Callable[[], Any]) -> None:
    # A savepoint's RELEASE / ROLLBACK TO, to its end in a task of its own (_savepoint).
    await run_to_completion(greenlet_spawn(step), session._ts_loop)


class GuardedTransaction(AsyncSessionTransaction):
    """The object ``session.begin()`` / ``begin_nested()`` return: guarded like the session."""

    __slots__ = ()

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        session: Any = self.session
        if self.nested:
            return await session._ts_begin_nested(self, is_ctxmanager)  # type: ignore[no-any-return]
        return await session._ts_begin(self, is_ctxmanager)  # type: ignore[no-any-return]

    async def commit(self) -> None:
        session: Any = self.session
        await session._ts_commit(self)

    async def rollback(self) -> None:
        session: Any = self.session
        await session._ts_rollback(self)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        session: Any = self.session
        end = session._ts_exit_commit if type_ is None else session._ts_exit_rollback
        await end(self, type_, value, traceback)


def _make_close_to_completion(base: type[AsyncSession]) -> Callable[..., Coroutine[Any, Any, None]]:
    base_close = base.close

    async def close_to_completion(self: Any) -> None:
        # SQLAlchemy's __aexit__ closes in a task of its own, so that a cancellation
        # cannot cut the close short; to the guard that task would be a stranger
        # (and, under "strict", not the owner). The guard is entered in the task
        # that leaves the block, and the unguarded close runs in the helper task.
        await run_to_completion(base_close(self))

    return close_to_completion


async def _aexit(self: Any, type_: Any, value: Any, traceback: Any) -> None:
    await self._ts_close_to_completion()


def _get_transaction(self: Any) -> AsyncSessionTransaction | None:
    # SQLAlchemy's version hands out a plain AsyncSessionTransaction for an
    # autobegun transaction, whose commit()/rollback() would bypass the guard.
    transaction = self.sync_session.get_transaction()
    if transaction is None:
        return None
    return GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)


def _get_nested_transaction(self: Any) -> AsyncSessionTransaction | None:
    transaction = self.sync_session.get_nested_transaction()
    if transaction is None:
        return None
    return GuardedTransaction._retrieve_proxy_for_target(transaction, async_session=self)


def _begin(self: Any) -> AsyncSessionTransaction:
    return GuardedTransaction(self)


def _begin_nested(self: Any) -> AsyncSessionTransaction:
    return GuardedTransaction(self, nested=True)


def _report_unexited(self: Any) -> None:
    """``__del__`` of a built session (never of an untouched one): was its scope exited?

    The registry holds such scopes weakly so that this can happen at all; by now
    SQLAlchemy's pool has dropped the connection (the server rolls back).
    """
    scope: SessionScope = self._ts_scope
    if scope.closed:
        return
    scope.closed = True
    scope.open_scopes.discard_built(scope)
    message = (
        f"scope {scope.name!r} (task {scope.owner_name!r}, opened at {scope.opened_at}) was "
        "garbage-collected without being exited: it never committed, and its connection "
        "was dropped (the server rolls its transaction back). Exit every scope you "
        f"enter: `async with {scope.label or 'manager'}.scope():`, never a bare __aenter__()."
    )
    logger.error("tasksession: %s", message)
    warnings.warn(message, ResourceWarning, stacklevel=1)


def _make_getattr(base: type[AsyncSession], built: type[AsyncSession]) -> Callable[[Any, str], Any]:
    base_init = base.__init__
    # Readonly scopes' sessions refuse to flush (a listener on a subclass of the
    # sync Session class); writable ones keep the plain class, whose sessions
    # carry no class-level listener to dispatch.
    readonly_sync_class = _readonly_sync_session_class(base.sync_session_class)

    def __getattr__(self: Any, name: str) -> Any:
        # Reached only for attributes not found normally: before SQLAlchemy's
        # __init__ ran, that is every instance attribute it would set.
        if name.startswith("_ts_"):
            raise AttributeError(name)
        scope = self._ts_scope
        lazy = self.__class__
        # The object becomes an instance of the same class without this hook
        # first: a class with __getattr__ makes every attribute access slower
        # (CPython cannot specialize them), SQLAlchemy's __init__ included.
        self.__class__ = built
        try:
            if scope.readonly:
                base_init(
                    self,
                    bind=scope.engine,
                    sync_session_class=readonly_sync_class,
                    **scope.binding.session_kwargs,
                )
            else:
                base_init(self, bind=scope.engine, **scope.binding.write_session_kwargs)
        except BaseException:
            self.__class__ = lazy
            raise
        # Lets sync-level event handlers find the scope without a lookup.
        self.sync_session._ts_scope = scope
        scope.session_built()
        return getattr(self, name)

    return __getattr__


class _BuildOnFirstUse:
    """``sync_session`` / ``_proxied`` of a session not built yet: reading one builds it.

    What the ``__getattr__`` hook would do, for the attributes every operation
    reads first, without CPython raising (and formatting) an AttributeError
    before it calls the hook.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __get__(self, session: Any, owner: type | None = None) -> Any:
        if session is None:
            return self
        return session.__getattr__(self._name)


def _refuse_readonly_flush(session: Session, flush_context: Any, instances: Any) -> None:
    scope = getattr(session, "_ts_scope", None)
    if scope is not None and scope.readonly:
        kinds = sorted(
            {type(obj).__name__ for obj in (*session.new, *session.dirty, *session.deleted)}
        )
        raise ReadOnlyScopeError(
            scope.name,
            f"flushing {len(session.new)} new, {len(session.dirty)} changed and "
            f"{len(session.deleted)} deleted object(s) ({', '.join(kinds)})",
            manager=scope.home.label,
        )


def _readonly_sync_session_class(base: type[Session]) -> type[Session]:
    cls = type(base.__name__, (base,), {"__module__": base.__module__})
    event.listen(cls, "before_flush", _refuse_readonly_flush)
    return cls


def session_class_for(base: type[AsyncSession], guard_mode: str) -> type[AsyncSession]:
    """Return the lazily built, guarded subclass of ``base`` for ``guard_mode``."""
    key = (base, guard_mode)
    cls = _CLASS_CACHE.get(key)
    if cls is not None:
        return cls
    namespace: dict[str, Any] = {
        # The guard's state, in slots (the fastest attributes; an untouched
        # session never allocates its __dict__). The scope sets them all when
        # it creates the session: its loop and thread, and no task inside.
        # _ts_in_flight counts the operations in flight under guard="off" (tasks may overlap).
        "__slots__": (
            "_ts_scope",
            "_ts_loop",
            "_ts_thread",
            "_ts_busy_task",
            "_ts_busy_operation",
            "_ts_in_flight",
        ),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        # The user's class: teardown calls its commit()/close() (overrides
        # included) past the guard.
        "_ts_base": base,
        "get_transaction": _get_transaction,
        "get_nested_transaction": _get_nested_transaction,
        "__aexit__": _aexit,
        "__del__": _report_unexited,
    }
    guard = COROUTINE_GUARDS[guard_mode]
    for name, step in (
        ("begin", _start),
        ("begin_nested", _start),
        ("commit", _commit),
        ("rollback", _rollback),
        ("exit_commit", _exit),
        ("exit_rollback", _exit),
    ):
        operation = name.removeprefix("exit_")
        namespace[f"_ts_{name}"] = guard(operation, step, _pool_exhausted)
    namespace["_ts_close_to_completion"] = guard(
        "close", _make_close_to_completion(base), _pool_exhausted
    )
    namespace["_ts_release_savepoint"] = guard("commit", _run_step, _pool_exhausted)
    namespace["_ts_rollback_savepoint"] = guard("rollback", _run_step, _pool_exhausted)
    sync_guard = SYNC_GUARDS[guard_mode]
    namespace["begin"] = sync_guard("begin", _begin)
    namespace["begin_nested"] = sync_guard("begin_nested", _begin_nested)
    for name in GUARDED_COROUTINES:
        coroutine = getattr(base, name, None)
        if coroutine is not None:
            namespace[name] = guard(name, coroutine, _pool_exhausted)
    for name in GUARDED_SYNC:
        method = getattr(base, name, None)
        if method is not None and name not in namespace:
            namespace[name] = sync_guard(name, method)
    if "stream" in namespace:
        # stream_scalars() goes through stream(): both results get registered.
        namespace["stream"] = _streams.tracking(namespace["stream"])
    _loading.install()
    built = type(base.__name__, (base,), namespace)
    # What scopes create: the same class plus the __getattr__ that builds the
    # session on first use (and then switches the object to ``built``).
    cls = type(
        base.__name__,
        (built,),
        {
            "__slots__": (),
            "__getattr__": _make_getattr(base, built),
            "sync_session": _BuildOnFirstUse("sync_session"),
            "_proxied": _BuildOnFirstUse("_proxied"),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        },
    )
    _CLASS_CACHE[key] = cls
    return cls
