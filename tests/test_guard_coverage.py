"""The guard covers every public ``AsyncSession`` operation; new SQLAlchemy members fail here.

When SQLAlchemy adds a public member to ``AsyncSession`` (or
``AsyncSessionTransaction``), the first test below fails until the member is
classified in :mod:`tasksession._session`: guarded (``GUARDED_COROUTINES`` /
``GUARDED_SYNC``) or known to be safe (``UNGUARDED``).
"""

from __future__ import annotations

import inspect

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

from tasksession import SessionManager
from tasksession._guard import GUARD_MODES
from tasksession._session import (
    GUARDED_COROUTINES,
    GUARDED_SYNC,
    UNGUARDED,
    GuardedTransaction,
    session_class_for,
)

pytestmark = pytest.mark.anyio

#: AsyncSessionTransaction members that do no I/O: state, and the connection it holds.
TRANSACTION_UNGUARDED = frozenset(
    {"bound_connection", "connections", "is_active", "nested", "session", "sync_transaction"}
)
TRANSACTION_GUARDED = frozenset({"commit", "rollback", "start"})


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_public_async_session_member_is_classified() -> None:
    classified = set(GUARDED_COROUTINES) | set(GUARDED_SYNC) | UNGUARDED

    assert set() == _public(AsyncSession) - classified


def test_the_three_lists_do_not_overlap() -> None:
    coroutines, sync = set(GUARDED_COROUTINES), set(GUARDED_SYNC)

    assert (set(), set(), set()) == (coroutines & sync, coroutines & UNGUARDED, sync & UNGUARDED)


def test_guarded_coroutines_are_coroutine_methods_and_guarded_sync_are_not() -> None:
    present_coroutines = [n for n in GUARDED_COROUTINES if hasattr(AsyncSession, n)]
    present_sync = [n for n in GUARDED_SYNC if hasattr(AsyncSession, n)]

    assert present_coroutines == [
        n for n in present_coroutines if inspect.iscoroutinefunction(getattr(AsyncSession, n))
    ]
    assert [] == [n for n in present_sync if inspect.iscoroutinefunction(getattr(AsyncSession, n))]


@pytest.mark.parametrize("mode", GUARD_MODES)
def test_every_guarded_name_is_wrapped_in_the_generated_class(mode: str) -> None:
    cls = session_class_for(AsyncSession, mode)
    guarded = [n for n in (*GUARDED_COROUTINES, *GUARDED_SYNC) if hasattr(AsyncSession, n)]

    not_wrapped = [
        name
        for name in guarded
        if inspect.getattr_static(cls, name) is AsyncSession.__dict__.get(name)
    ]

    assert [] == not_wrapped


def test_a_user_subclass_gets_its_own_overrides_wrapped() -> None:
    class MySession(AsyncSession):
        async def execute(self, *args: object, **kwargs: object) -> object:
            return await super().execute(*args, **kwargs)  # type: ignore[arg-type]

    cls = session_class_for(MySession, "concurrent")

    assert MySession.execute is inspect.getattr_static(cls, "execute").__wrapped__
    assert issubclass(cls, MySession)


def test_every_public_transaction_member_is_classified() -> None:
    assert set() == _public(AsyncSessionTransaction) - TRANSACTION_GUARDED - TRANSACTION_UNGUARDED


def test_guarded_transaction_overrides_every_guarded_transaction_method() -> None:
    overridden = {
        n for n in (*TRANSACTION_GUARDED, "__aexit__") if n in GuardedTransaction.__dict__
    }

    assert {*TRANSACTION_GUARDED, "__aexit__"} == overridden


async def test_get_transaction_hands_out_guarded_transactions(db: SessionManager) -> None:
    async with db.scope() as session:
        await session.connection()
        nested = await session.begin_nested()
        root, inner = session.get_transaction(), session.get_nested_transaction()
        await nested.rollback()

    assert (GuardedTransaction, GuardedTransaction) == (type(root), type(inner))
