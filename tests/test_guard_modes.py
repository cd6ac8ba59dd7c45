"""Guard modes ("concurrent", "strict", "off"), reentrancy, and user session classes."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from tasksession import ConcurrentSessionError, CrossThreadError, SessionManager

from .gate import Gate
from .models import User
from .test_guard import CALLERS, HOLDERS, run_overlap

pytestmark = pytest.mark.anyio


async def _names(db: SessionManager) -> list[str]:
    async with db.scope() as session:
        return list((await session.scalars(select(User.name).order_by(User.name))).all())


# -- strict ----------------------------------------------------------------------


async def test_strict_refuses_a_child_task_even_without_overlap(
    db: SessionManager, make_manager: Any
) -> None:
    strict = make_manager(guard="strict")
    async with strict.scope(name="owned") as session:

        async def child() -> None:
            await session.execute(insert(User).values(name="child"))

        with pytest.raises(ConcurrentSessionError) as info:
            await asyncio.create_task(child(), name="child-task")
        await session.execute(insert(User).values(name="owner"))

    assert (True, "child-task", "owned") == (
        info.value.strict,
        info.value.caller_task,
        info.value.scope_name,
    )
    assert "guard='strict'" in str(info.value)
    assert ["owner"] == await _names(db)


async def test_strict_refuses_a_sync_mutator_from_a_child_task(
    db: SessionManager, make_manager: Any
) -> None:
    strict = make_manager(guard="strict")
    async with strict.scope() as session:

        async def child() -> None:
            session.add(User(name="child"))

        with pytest.raises(ConcurrentSessionError):
            await asyncio.create_task(child())

    assert [] == await _names(db)


async def test_strict_lets_a_child_use_a_scope_of_its_own(
    db: SessionManager, make_manager: Any
) -> None:
    strict = make_manager(guard="strict")
    async with strict.scope():

        async def child() -> None:
            async with strict.scope() as own:
                await own.execute(insert(User).values(name="child"))

        await asyncio.create_task(child())

    assert ["child"] == await _names(db)


async def test_strict_allows_the_owner_to_use_the_session_in_async_with(
    db: SessionManager, make_manager: Any
) -> None:
    # AsyncSession.__aexit__ closes in a task of its own; that is still the owner's close.
    strict = make_manager(guard="strict")
    async with strict.scope() as session:
        async with session:
            await session.execute(text("SELECT 1"))

    assert 0 == strict.statistics().concurrent_violations


# -- off -------------------------------------------------------------------------


async def test_off_lets_overlapping_callers_through(pg_db: SessionManager) -> None:
    # What every AsyncSession does without the guard: the second task's
    # statement reaches the database in the middle of the first task's operation.
    unguarded = SessionManager(pg_db.engine.url, guard="off")
    try:
        outcome = await run_overlap(unguarded, HOLDERS["execute"], CALLERS["get"][1], tasks=2)
    finally:
        await unguarded.dispose()

    assert [] == [r for r in outcome.results if isinstance(r, BaseException)]
    assert 0 == outcome.violations
    assert [] != outcome.sent_while_refusing


async def test_off_teardown_waits_for_every_overlapping_operation(
    pg_db: SessionManager, make_manager: Any
) -> None:
    # Under "off" two tasks can be inside operations at once: the scope's exit
    # must wait until the last one ended, not the first.
    unguarded = make_manager(pg_db.engine.url, guard="off")
    scope = unguarded.scope()
    session = await scope.__aenter__()
    with Gate(unguarded.engine, "before_cursor_execute") as gate:
        gate.arm()
        held = asyncio.create_task(session.execute(insert(User).values(id=1, name="held")))
        await gate.reached.wait()
        await session.execute(insert(User).values(id=2, name="overlapping"))  # ends first
        exiting = asyncio.create_task(scope.__aexit__(None, None, None))
        await anyio.wait_all_tasks_blocked()
        assert not exiting.done()  # still inside: the held statement is in flight
        gate.open()
        await held
        await exiting
    assert ["held", "overlapping"] == await _names(pg_db)


# -- concurrent: what is allowed ---------------------------------------------------


async def test_children_may_use_the_parents_session_one_at_a_time(db: SessionManager) -> None:
    async with db.scope() as session:

        async def insert_user(name: str) -> None:
            await session.execute(insert(User).values(name=name))

        for name in ("a", "b"):
            await asyncio.create_task(insert_user(name))

    assert ["a", "b"] == await _names(db)


async def test_a_child_task_may_add_while_the_session_is_idle(db: SessionManager) -> None:
    async with db.scope() as session:

        async def add_user() -> None:
            session.add(User(name="child"))

        await asyncio.create_task(add_user())

    assert ["child"] == await _names(db)


async def test_same_task_reentrancy_is_allowed(db: SessionManager) -> None:
    # scalars() calls execute(); a run_sync callable that adds (through the
    # async session) runs inside run_sync: both nest in the same task.
    async with db.scope() as session:

        def add_inside(sync_session: Any) -> None:
            session.add(User(name="nested"))

        await session.run_sync(add_inside)
        assert ["nested"] == list((await session.scalars(select(User.name))).all())

    assert ["nested"] == await _names(db)


async def test_the_guard_releases_the_session_after_a_failed_operation(
    db: SessionManager,
) -> None:
    async with db.scope() as session:
        with pytest.raises(Exception, match="no_such_table"):
            await session.execute(text("SELECT * FROM no_such_table"))
        await session.rollback()

        async def child() -> None:
            await session.execute(insert(User).values(name="child"))

        await asyncio.create_task(child())

    assert ["child"] == await _names(db)


async def test_use_from_another_threads_event_loop_is_refused(db: SessionManager) -> None:
    # The session belongs to the loop of the task that opened its scope, even
    # before its first use; a thread running a loop of its own may not use it.
    async with db.scope() as session:

        def other_loop() -> None:
            asyncio.run(session.execute(text("SELECT 1")))

        with pytest.raises(CrossThreadError):
            await anyio.to_thread.run_sync(other_loop)


async def test_a_built_session_sheds_the_lazy_hook(db: SessionManager) -> None:
    # A class with __getattr__ makes every attribute access slow (CPython cannot
    # specialize it): only the not-yet-built session may have one.
    async with db.scope() as session:
        assert hasattr(type(session), "__getattr__")
        await session.execute(text("SELECT 1"))
        assert not hasattr(type(session), "__getattr__")
        assert isinstance(session, AsyncSession)


async def test_use_from_a_worker_thread_is_refused(db: SessionManager) -> None:
    async with db.scope() as session:
        with pytest.raises(CrossThreadError):
            await anyio.to_thread.run_sync(lambda: session.add(User(name="thread")))

    assert [] == await _names(db)


# -- user session classes -------------------------------------------------------------


class AuditedSession(AsyncSession):
    """A user subclass with overridden operations and a helper of its own."""

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        self.info.setdefault("audit", []).append(str(statement).split()[0])
        return await super().execute(statement, *args, **kwargs)

    async def commit(self) -> None:
        # Reenters the guard in the same task: commit -> flush.
        await self.flush()
        self.info.setdefault("audit", []).append("COMMIT")
        await super().commit()

    async def count_users(self) -> int:
        return int((await self.execute(select(func.count(User.id)))).scalar_one())


async def test_user_session_class_is_honoured(db: SessionManager, make_manager: Any) -> None:
    audited = make_manager(session_class=AuditedSession)
    async with audited.scope() as session:
        assert isinstance(session, AuditedSession)
        await session.execute(insert(User).values(name="a"))
        session.add(User(name="b"))
        await session.commit()
        assert 2 == await session.count_users()
        audit = session.info["audit"]

    # The scope's own commit at exit goes through the override too (which calls
    # flush(): the guard lets the scope's teardown use its ended session).
    assert ["INSERT", "COMMIT", "SELECT", "COMMIT"] == audit
    assert ["a", "b"] == await _names(db)


async def test_user_session_class_overrides_are_guarded(
    db: SessionManager, make_manager: Any
) -> None:
    audited = make_manager(session_class=AuditedSession)
    async with audited.scope() as session:
        assert isinstance(session, AuditedSession)
        with Gate(audited.engine, "before_cursor_execute") as gate:
            gate.arm()
            holder = asyncio.create_task(session.execute(text("SELECT 1")))
            with anyio.fail_after(10):
                await gate.reached.wait()
            with pytest.raises(ConcurrentSessionError) as info:
                await session.count_users()
            gate.open()
            with anyio.fail_after(10):
                await holder

    assert ("execute", "execute") == (info.value.holder_operation, info.value.caller_operation)
