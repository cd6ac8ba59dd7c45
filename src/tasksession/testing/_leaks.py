"""The leak check: a test must end with nothing of its own left open.

:func:`assert_no_leaks` compares what the manager has open when the block ends
with what it had when the block began: scopes (with their sessions), connections
checked out of its pools, and, under savepoint isolation, SAVEPOINTs left open
on the test's connection. Each leak is named: a scope by its name, its task and
where it was opened; a connection by where it was checked out.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from tasksession import ScopeInfo, SessionManager

from ._frames import application_frame

__all__ = ["assert_no_leaks", "test_connections"]

# Managers under savepoint isolation -> the test's connection (set by isolated()).
_SHARED: weakref.WeakKeyDictionary[SessionManager, AsyncConnection] = weakref.WeakKeyDictionary()


def test_connections() -> weakref.WeakKeyDictionary[SessionManager, AsyncConnection]:
    """Managers under savepoint isolation, with the test's connection (isolated() writes it)."""
    return _SHARED


def _key(info: ScopeInfo) -> tuple[str, str, str]:
    return info.name, info.task_name, info.opened_at


@asynccontextmanager
async def assert_no_leaks(db: SessionManager) -> AsyncIterator[SessionManager]:
    """Fail (``AssertionError``) if the block leaves scopes, connections or transactions open.

    ::

        async with assert_no_leaks(db):
            await handler_under_test()

    Works across tasks (pytest-asyncio runs a fixture's setup and teardown in
    other tasks than the test): it compares the manager's state, not a task's.
    """
    before = Counter(_key(info) for info in db.active_scopes())
    checked_out_before = db.statistics().pool_checked_out or 0
    pool = db.engine.sync_engine.pool
    # Where each connection checked out during the block was checked out.
    sites: dict[int, tuple[Any, str]] = {}

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        sites[id(record)] = (record, application_frame())

    event.listen(pool, "checkout", on_checkout)
    try:
        yield db
    finally:
        event.remove(pool, "checkout", on_checkout)
    leaks: list[str] = []
    for info in db.active_scopes():
        key = _key(info)
        if before[key] > 0:  # open before the block began: not this block's
            before[key] -= 1
        else:
            holds = ", its session holding a connection" if info.holds_connection else ""
            session = " with its session" if info.has_session else ""
            leaks.append(
                f"scope {info.name!r} (task {info.task_name!r}, opened at {info.opened_at}) "
                f"is still open{session}{holds}"
            )
    checked_out = (db.statistics().pool_checked_out or 0) - checked_out_before
    if checked_out > 0:
        still_out = [where for record, where in sites.values() if record.fairy_ref is not None]
        places = "; ".join(f"checked out at {where}" for where in still_out) or (
            "checked out before the check began, or by a pool it does not watch"
        )
        leaks.append(f"{checked_out} connection(s) of {db!r} are still checked out: {places}")
    shared = _SHARED.get(db)
    if shared is not None and shared.sync_connection is not None and shared.in_nested_transaction():
        leaks.append(
            "the test's connection still has a SAVEPOINT open: a session or "
            "`begin_nested()` that was never closed"
        )
    if leaks:
        lines = "\n".join(f"  - {leak}" for leak in leaks)
        raise AssertionError(
            f"tasksession: the test left {len(leaks)} thing(s) open:\n{lines}\n"
            "Exit every scope the test (or the code it runs) enters, await the tasks it "
            "starts, and close connections taken from an engine (`async with "
            "engine.connect()`)."
        )
