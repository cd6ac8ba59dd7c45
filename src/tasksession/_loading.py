"""Implicit I/O protection: attribute loads that would need a query where nothing can await.

In async code, reading an attribute SQLAlchemy has not loaded (a lazy relationship,
a deferred column, a value expired by commit, rollback, ``expire()`` or a flush)
fails deep inside the driver with ``MissingGreenlet``, naming nothing; on
aiosqlite it even arrives wrapped in a ``StatementError``, with a "coroutine was
never awaited" warning. This module turns every such read into an
:class:`~tasksession.ImplicitIOError` that names ``Class.attribute`` and the
instance and lists the fixes that apply, **before** any I/O is attempted.

How it hooks in. An attribute read that misses the instance's ``__dict__`` goes
``InstrumentedAttribute.__get__`` -> ``AttributeImpl.get`` ->
``AttributeImpl._fire_loader_callables(state, key, passive)``, which dispatches to
the expired-attribute loader, a per-instance loader option or the attribute's own
loader (lazy relationship, deferred column). That method is the one place that
knows the attribute name and is reached *only* when a load is attempted. Each
attribute implementation of every mapped class gets a subclass (same ``__slots__``
layout, assigned to ``__class__``) whose ``_fire_loader_callables``:

* inside SQLAlchemy's greenlet (``await session.run_sync(...)``,
  ``await obj.awaitable_attrs.x``, loads during a flush) just loads: it can await;
* for an object in a tasksession session, outside the greenlet, shadows the sync
  session's ``execute`` for the duration of the load, so the loader's first step
  towards I/O raises instead (every ORM loader queries through ``Session.execute``;
  loads that need no query, such as a many-to-one found in the identity map or
  ``lazy="raise"``, behave exactly as before);
* for a detached object, turns SQLAlchemy's ``DetachedInstanceError`` into a
  :class:`DetachedImplicitIOError` (an ``ImplicitIOError`` that is also a
  ``DetachedInstanceError``) naming the attribute.

Cost: nothing on reads of loaded attributes and nothing on queries; a few attribute
lookups on each attribute load. Objects of sessions that are not tasksession's
load exactly as before.

**SQLAlchemy internals used** (pinned by ``tests/test_loading_internals.py``):
``AttributeImpl._fire_loader_callables`` (same signature in 2.0 and 2.1) and
``sqlalchemy.orm.mapperlib._all_registries`` (to protect mappers configured before
:func:`install`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import Mapper, RelationshipProperty, mapperlib
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.util.concurrency import in_greenlet

from ._errors import DetachedImplicitIOError, ImplicitIOError

__all__ = [
    "install",
    "is_missing_greenlet",
    "is_protected",
    "protect_mapper",
    "uninstall",
    "unprotect_mapper",
]

_FireLoaders = Callable[[Any, Any, str, Any], Any]

# original impl class -> protected subclass, and the reverse
_PROTECTED: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}
_installed = False


class _RefusedIO(Exception):
    """Raised by the shadowed ``Session.execute`` while an implicit load runs."""


def _refuse_io(*args: Any, **kwargs: Any) -> Any:
    raise _RefusedIO


def is_missing_greenlet(error: BaseException) -> bool:
    """Whether ``error`` is SQLAlchemy's ``MissingGreenlet``, possibly wrapped.

    aiosqlite delivers it wrapped in a ``StatementError`` (as ``.orig``); other
    layers chain it as ``__cause__``. Decided by class only, never by message text.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, sa_exc.MissingGreenlet):
            return True
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and is_missing_greenlet(orig):
            return True
        current = current.__cause__
    return False


def _protected_class(base: type) -> type:
    cls = _PROTECTED.get(base)
    if cls is not None:
        return cls
    fire: _FireLoaders = base._fire_loader_callables  # type: ignore[attr-defined]

    def _fire_loader_callables(self: Any, state: Any, key: str, passive: Any) -> Any:
        session = state.session
        if session is None:
            try:
                return fire(self, state, key, passive)
            except orm_exc.DetachedInstanceError as error:
                expired = key in state.expired_attributes
                raise _error(state, key, None, expired=expired) from error
        if in_greenlet():
            # Inside AsyncSession's machinery: the load can await.
            return fire(self, state, key, passive)
        namespace = session.__dict__
        if "_ts_scope" not in namespace or "execute" in namespace:
            # Not a tasksession session, or an outer load already refuses I/O.
            return fire(self, state, key, passive)
        expired = key in state.expired_attributes
        namespace["execute"] = _refuse_io
        try:
            return fire(self, state, key, passive)
        except _RefusedIO:
            raise _error(state, key, session, expired=expired) from None
        except sa_exc.SQLAlchemyError as error:
            # A load path that reached the driver some other way.
            if is_missing_greenlet(error):
                raise _error(state, key, session, expired=expired) from error
            raise
        finally:
            del namespace["execute"]

    cls = type(
        base.__name__, (base,), {"__slots__": (), "_fire_loader_callables": _fire_loader_callables}
    )
    _PROTECTED[base] = cls
    _ORIGINAL[cls] = base
    return cls


def _impls(mapper: Mapper[Any]) -> Iterator[Any]:
    for attribute in mapper.class_manager.values():
        impl = getattr(attribute, "impl", None)
        if impl is not None and hasattr(impl, "_fire_loader_callables"):
            yield impl


def protect_mapper(mapper: Mapper[Any]) -> None:
    """Give every attribute of ``mapper``'s class the implicit-I/O check (idempotent)."""
    for impl in _impls(mapper):
        cls = type(impl)
        if cls not in _ORIGINAL:
            impl.__class__ = _protected_class(cls)


def unprotect_mapper(mapper: Mapper[Any]) -> None:
    """Undo :func:`protect_mapper` (used by the benchmark to measure the check's cost)."""
    for impl in _impls(mapper):
        original = _ORIGINAL.get(type(impl))
        if original is not None:
            impl.__class__ = original


def is_protected(mapper: Mapper[Any]) -> bool:
    """Whether every loadable attribute of ``mapper`` has the check."""
    return all(type(impl) in _ORIGINAL for impl in _impls(mapper))


def _all_mappers() -> Iterator[Mapper[Any]]:
    # Private, but the only list of every registry (and so every mapper) there is.
    for registry in mapperlib._all_registries():
        yield from registry.mappers


def _protect_configured() -> None:
    for mapper in _all_mappers():
        if mapper.configured:
            protect_mapper(mapper)


def install() -> None:
    """Protect every configured mapper now, and every mapper configured later (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    # after_configured (not mapper_configured): a backref can add an attribute to a
    # mapper after that mapper's own mapper_configured event has fired.
    event.listen(Mapper, "after_configured", _protect_configured)
    _protect_configured()


def uninstall() -> None:
    """Remove the protection from every mapper (for benchmarks and tests)."""
    global _installed
    if not _installed:
        return
    _installed = False
    event.remove(Mapper, "after_configured", _protect_configured)
    for mapper in _all_mappers():
        unprotect_mapper(mapper)


# -- the error -----------------------------------------------------------------------


def _variable(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _describe(state: Any) -> str:
    # Never repr() the object: a user __repr__ may read the very attribute that failed.
    cls: str = state.class_.__name__
    identity = state.identity
    if identity is None:
        return f"<{cls} (not yet flushed)>"
    names = [state.mapper.get_property_by_column(c).key for c in state.mapper.primary_key]
    if len(names) == len(identity):
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(names, identity, strict=True))
        return f"<{cls} {fields}>"
    return f"<{cls} identity={identity!r}>"


def _generated_by_database(prop: Any) -> bool:
    return any(
        getattr(column, name, None) is not None
        for column in getattr(prop, "columns", ())
        for name in ("onupdate", "server_onupdate", "server_default")
    )


def _is_new(state: Any) -> bool:
    # runid is set on objects a query loaded; an object created in Python has none.
    return getattr(state, "runid", 0) is None


def _error(state: Any, key: str, session: Any, *, expired: bool) -> ImplicitIOError:
    """Build the error for reading ``key`` on ``state`` (``session`` None: detached)."""
    cls = state.class_
    name = cls.__name__
    var = _variable(name)
    attr = f"{name}.{key}"
    instance = _describe(state)
    prop = state.mapper.attrs.get(key)
    relationship = isinstance(prop, RelationshipProperty)
    collection = relationship and bool(prop.uselist)
    generated = not relationship and expired and _generated_by_database(prop)
    awaitable = f"await {var}.awaitable_attrs.{key}"
    if not issubclass(cls, AsyncAttrs):
        awaitable += "  # needs the sqlalchemy.ext.asyncio.AsyncAttrs mixin on your Base"
    refresh = f'await session.refresh({var}, ["{key}"])'
    eager_defaults = '__mapper_args__ = {"eager_defaults": True}  # on ' + name
    if relationship:
        loader = "selectinload" if collection else "joinedload"
        with_query: str | None = f"select({name}).options({loader}({attr}))"
    elif not expired:
        with_query = f"select({name}).options(undefer({attr}))"
    else:
        with_query = None

    if session is None:
        reason = (
            "the object is detached: it belongs to no session any more (the scope that "
            "loaded it has ended, or it was expunged), so there is nothing to run the query with"
        )
        fixes = []
        if generated:
            fixes.append(f"{eager_defaults}: fetch database-generated values during the flush")
        if with_query is not None:
            fixes.append(f"{with_query}  # load it with the query, inside the scope")
        fixes.append(f"{refresh}  # inside the scope, before it ends")
        fixes.append(f"{var} = await session.merge({var}); {awaitable}  # in a new scope")
        return DetachedImplicitIOError(
            class_name=name, attribute=key, instance=instance, reason=reason, fixes=fixes
        )

    if relationship:
        what = "a lazy-loaded relationship that is not loaded"
        fixes = [f"{with_query}  # load it with the query", f"{awaitable}  # load it now"]
        fixes.append(f"{refresh}  # load it now")
        if collection and _is_new(state):
            fixes.append(
                f"{name}(..., {key}=[])  # a new object: create it with an empty collection"
            )
    elif generated:
        what = (
            "a value the database generates (onupdate/server default), which the flush "
            "expired instead of fetching"
        )
        fixes = [
            f"{eager_defaults}: fetch it during the flush",
            f"{refresh}  # fetch it now",
            f"{awaitable}  # fetch it now",
        ]
    elif expired:
        what = "expired (by commit with expire_on_commit=True, rollback(), or session.expire())"
        fixes = [f"{refresh}  # reload it now", f"{awaitable}  # reload it now"]
    else:
        what = "a deferred column that was not loaded"
        fixes = [f"{with_query}  # load it with the query", f"{awaitable}  # load it now"]
        fixes.append(f"{refresh}  # load it now")
    if expired and getattr(session, "expire_on_commit", False):
        fixes.append("expire_on_commit=False  # on the manager: commit keeps loaded values")
    return ImplicitIOError(
        class_name=name,
        attribute=key,
        instance=instance,
        reason=f"{attr} is {what}, and a plain attribute access cannot await the query",
        fixes=fixes,
    )
