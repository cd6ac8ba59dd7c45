"""The leak check: a test must end with nothing of its own left open.

:func:`assert_no_leaks` compares what the manager has open when the block ends
with what it had when the block began: scopes (with their sessions), connections
checked out of its pools, and, under savepoint isolation, SAVEPOINTs left open
on the test's connection. Each leak is named: a scope by its name, its task and
where it was opened; a connection by where it was checked out.
"""

from __future__ import annotations

import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from tasksession import ScopeInfo, SessionManager

from ._frames import application_frame

__all__ = ["assert_no_leaks", "test_connections"]

# Managers under savepoint isolation -> the test's connection (set by isolated()).
#: Seconds a block's ending work (a scope past its registry exit, rolling back) gets to
#: finish before what it holds counts as leaked: only a leaking test waits for it.
SETTLE = 1.0

_SHARED: weakref.WeakKeyDictionary[SessionManager, AsyncConnection] = weakref.WeakKeyDictionary()


def test_connections() -> weakref.WeakKeyDictionary[SessionManager, AsyncConnection]:
    """Managers under savepoint isolation, with the test's connection (isolated() writes it)."""
    return _SHARED


def _key(info: ScopeInfo) -> tuple[str, str, str]:
    return info.name, info.task_name, info.opened_at


def _leaks(
    db: SessionManager,
    before: Counter[tuple[str, str, str]],
    checked_out_before: int,
    sites: dict[int, tuple[Any, str]],
) -> list[str]:
    """What the block left open, one line each (empty: nothing)."""
    before = Counter(before)
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
    return leaks


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
    leaks = _leaks(db, before, checked_out_before, sites)
    # A scope that is still ending (a request's rollback, run after its response
    # was sent) has left the registry but not yet given its connection back: give
    # such work a moment to finish before calling it a leak.
    deadline = time.monotonic() + SETTLE
    while leaks and time.monotonic() < deadline:
        await anyio.sleep(0.005)
        leaks = _leaks(db, before, checked_out_before, sites)
    if leaks:
        lines = "\n".join(f"  - {leak}" for leak in leaks)
        raise AssertionError(
            f"tasksession: the test left {len(leaks)} thing(s) open:\n{lines}\n"
            "Exit every scope the test (or the code it runs) enters, await the tasks it "
            "starts, and close connections taken from an engine (`async with "
            "engine.connect()`)."
        )
