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

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction
from sqlalchemy.orm import Session

from . import _guard, _loading, _streams
from ._completion import run_to_completion
from ._errors import PoolExhaustedError, ReadOnlyScopeError

__all__ = [
    "GUARDED_COROUTINES",
    "GUARDED_SYNC",
    "UNGUARDED",
    "is_materialized",
    "session_class_for",
]

#: Coroutine methods that may do I/O or change transaction state.
GUARDED_COROUTINES = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "stream",
    "stream_scalars",
    "flush",
    "commit",
    "rollback",
    "close",
    "aclose",
    "reset",
    "invalidate",
    "refresh",
    "merge",
    "merge_all",
    "delete",
    "delete_all",
    "run_sync",
    "connection",
)

#: Synchronous methods that change session state (guarded against another
#: task's in-flight operation; ``begin``/``begin_nested`` also guard the
#: transaction object they return).
GUARDED_SYNC = (
    "add",
    "add_all",
    "expunge",
    "expunge_all",
    "expire",
    "expire_all",
    "begin",
    "begin_nested",
)

#: Public ``AsyncSession`` members that are safe without the guard: they only
#: read state, or configure binds before use. The test suite fails when
#: SQLAlchemy grows a public member that is in none of these three lists.
UNGUARDED = frozenset(
    {
        "bind",
        "binds",
        "bind_mapper",
        "bind_table",
        "close_all",
        "dirty",
        "deleted",
        "new",
        "identity_map",
        "identity_key",
        "in_transaction",
        "in_nested_transaction",
        "is_active",
        "is_modified",
        "autoflush",
        "no_autoflush",
        "info",
        "execution_options",
        "get_bind",
        "get_async_bind",
        "get_transaction",
        "get_nested_transaction",
        "object_session",
        "sync_session",
        "sync_session_class",
        "dispatch",
    }
)

_CLASS_CACHE: dict[tuple[type[AsyncSession], str], type[AsyncSession]] = {}

_ENTER = {mode: enter for mode, (enter, _, _) in _guard.BY_MODE.items()}
_LEAVE = {mode: leave for mode, (_, leave, _) in _guard.BY_MODE.items()}
_CHECK_SYNC = {mode: check for mode, (_, _, check) in _guard.BY_MODE.items()}


def is_materialized(session: AsyncSession) -> bool:
    """Whether SQLAlchemy's ``__init__`` has run on ``session`` (it was used)."""
    return "sync_session" in session.__dict__


def _pool_exhausted(session: Any, error: sa_exc.TimeoutError) -> BaseException:
    if isinstance(error, PoolExhaustedError):
        return error
    # The pool that timed out is the one of the engine this session is bound to
    # (a readonly scope's may be the readonly_autocommit pool or a replica's).
    # The session is built by now (a checkout ran); the check keeps it unbuilt if not.
    bind = session.bind if is_materialized(session) else None
    exhausted: PoolExhaustedError = session._ts_scope.manager._pool_exhausted(error, bind)
    return exhausted


def _guard_coroutine_one_at_a_time(
    name: str, method: Callable[..., Coroutine[Any, Any, Any]], strict: bool
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """:func:`_guard.enter_concurrent` (or ``enter_strict``) and :func:`_guard.leave` inlined.

    The same steps as those functions, without two calls per operation: this
    is the guard's whole cost on every execute/get/flush.
    """
    blocked = _guard.blocked
    conflict = _guard.conflict
    wake = _guard.wake_teardown
    get_ident = _guard.get_ident
    current_task_of = _guard.current_task_of
    closed = _guard.CLOSED

    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        # One check for both "scope ended" and "another thread" (see _guard).
        task: Any
        if get_ident() == self._ts_thread:
            task = current_task_of(self._ts_loop)
        else:
            task = blocked(self, name)
        if strict:
            scope = self._ts_scope
            if task is not scope.owner and task is not scope._teardown_task:
                raise conflict(self, task, name, strict=True)
        busy = self._ts_busy_task
        if busy is None:
            self._ts_busy_task = task
            self._ts_busy_operation = name
            try:
                return await method(self, *args, **kwargs)
            except sa_exc.TimeoutError as error:
                raise _pool_exhausted(self, error) from error
            finally:
                self._ts_busy_task = None
                if self._ts_thread == closed:
                    wake(self)
        if busy is not task and not strict:
            raise conflict(self, task, name, strict=False)
        # Same-task reentrancy: the outer call releases the session.
        try:
            return await method(self, *args, **kwargs)
        except sa_exc.TimeoutError as error:
            raise _pool_exhausted(self, error) from error

    return guarded


def _guard_coroutine_off(
    name: str, method: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """:func:`_guard.enter_off` and :func:`_guard.leave_off` inlined."""
    blocked = _guard.blocked
    wake = _guard.wake_teardown
    get_ident = _guard.get_ident
    closed = _guard.CLOSED

    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if get_ident() != self._ts_thread:
            blocked(self, name)
        self._ts_in_flight += 1
        try:
            return await method(self, *args, **kwargs)
        except sa_exc.TimeoutError as error:
            raise _pool_exhausted(self, error) from error
        finally:
            count = self._ts_in_flight - 1
            self._ts_in_flight = count
            if count == 0 and self._ts_thread == closed:
                wake(self)

    return guarded


def _guard_sync(
    name: str, method: Callable[..., Any], check: Callable[[Any, str], None]
) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(self, name)
        return method(self, *args, **kwargs)

    return guarded


#: guard mode -> the wrapper of a coroutine operation (enter and leave inlined:
#: this is the guard's whole cost on every execute/get/flush).
_WRAP_BY_MODE: dict[str, Callable[[str, Any], Callable[..., Coroutine[Any, Any, Any]]]] = {
    "concurrent": lambda name, method: _guard_coroutine_one_at_a_time(name, method, False),
    "strict": lambda name, method: _guard_coroutine_one_at_a_time(name, method, True),
    "off": _guard_coroutine_off,
}


class GuardedTransaction(AsyncSessionTransaction):
    """The object ``session.begin()`` / ``begin_nested()`` return: guarded like the session."""

    __slots__ = ()

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        session: Any = self.session
        owned = session._ts_enter("begin_nested" if self.nested else "begin")
        try:
            return await super().start(is_ctxmanager)
        except sa_exc.TimeoutError as error:
            raise _pool_exhausted(session, error) from error
        finally:
            session._ts_leave(owned)

    async def commit(self) -> None:
        session: Any = self.session
        owned = session._ts_enter("commit")
        try:
            await super().commit()
        finally:
            session._ts_leave(owned)

    async def rollback(self) -> None:
        session: Any = self.session
        owned = session._ts_enter("rollback")
        try:
            await super().rollback()
        finally:
            session._ts_leave(owned)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        session: Any = self.session
        owned = session._ts_enter("commit" if type_ is None else "rollback")
        try:
            await super().__aexit__(type_, value, traceback)
        finally:
            session._ts_leave(owned)


def _make_aexit(base: type[AsyncSession]) -> Callable[..., Coroutine[Any, Any, None]]:
    base_close = base.close

    async def __aexit__(self: Any, type_: Any, value: Any, traceback: Any) -> None:
        # SQLAlchemy closes in a task of its own, so that a cancellation cannot
        # cut the close short; to the guard that task would be a stranger (and,
        # under "strict", not the owner). Enter the guard here, in the task that
        # leaves the block, and run the unguarded close in the helper task.
        owned = self._ts_enter("close")
        try:
            await run_to_completion(base_close(self))
        finally:
            self._ts_leave(owned)

    return __aexit__


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
    self._ts_check_sync("begin")
    return GuardedTransaction(self)


def _begin_nested(self: Any) -> AsyncSessionTransaction:
    self._ts_check_sync("begin_nested")
    return GuardedTransaction(self, nested=True)


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
        scope._session_built()
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
        "_ts_enter": _ENTER[guard_mode],
        "_ts_leave": _LEAVE[guard_mode],
        # The user's class: teardown calls its commit()/close() (overrides
        # included) past the guard.
        "_ts_base": base,
        "_ts_check_sync": _CHECK_SYNC[guard_mode],
        "begin": _begin,
        "begin_nested": _begin_nested,
        "get_transaction": _get_transaction,
        "__aexit__": _make_aexit(base),
        "get_nested_transaction": _get_nested_transaction,
    }
    for name in GUARDED_COROUTINES:
        method = getattr(base, name, None)
        if method is not None:
            namespace[name] = _WRAP_BY_MODE[guard_mode](name, method)
    for name in GUARDED_SYNC:
        method = getattr(base, name, None)
        if method is not None and name not in namespace:
            namespace[name] = _guard_sync(name, method, _CHECK_SYNC[guard_mode])
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
