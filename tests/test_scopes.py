"""Scopes and tasks (DESIGN.md "Scopes and tasks"), on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import anyio
import pytest
from sqlalchemy import event, select, text

from tasksession import (
    CrossThreadError,
    NoScopeError,
    ReadOnlyScopeError,
    ScopeClosedError,
    SessionManager,
)
from tasksession._session import is_materialized

from .gate import Gate
from .helpers import checked_out
from .models import User

pytestmark = pytest.mark.anyio


async def committed_names(db: SessionManager) -> list[str]:
    """What another connection sees, outside any scope."""
    async with db.engine.connect() as conn:
        return list((await conn.scalars(select(User.name).order_by(User.name))).all())


def count_invalidations(db: SessionManager) -> list[Any]:
    invalidated: list[Any] = []
    event.listen(db.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
    return invalidated


# -- the current session -------------------------------------------------------


async def test_db_session_is_the_object_the_scope_yields(db: SessionManager) -> None:
    async with db.scope() as session:
        assert session is db.session


async def test_db_session_outside_a_scope_raises_no_scope_error(db: SessionManager) -> None:
    with pytest.raises(NoScopeError) as caught:
        db.session  # noqa: B018
    assert "async with db.scope()" in str(caught.value)


async def test_untouched_scope_creates_no_session_and_no_connection(db: SessionManager) -> None:
    async with db.scope() as session:
        assert 0 == checked_out(db)
        assert [False] == [info.has_session for info in db.active_scopes()]
    assert "sync_session" not in vars(session)
    assert 0 == db.statistics().commits + db.statistics().rollbacks


async def test_first_use_creates_the_session_and_checks_out_a_connection(
    db: SessionManager,
) -> None:
    async with db.scope() as session:
        await session.execute(text("SELECT 1"))
        assert 1 == checked_out(db)
        assert [True] == [info.holds_connection for info in db.active_scopes()]
    assert 0 == checked_out(db)


# -- commit policy ---------------------------------------------------------------


async def test_clean_exit_commits(db: SessionManager) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
    assert ["ada"] == await committed_names(db)


async def test_add_without_any_query_is_committed(db: SessionManager) -> None:
    async with db.scope():
        db.session.add(User(name="ada"))
        assert 0 == checked_out(db)  # nothing flushed yet
    assert ["ada"] == await committed_names(db)


async def test_exception_rolls_back_and_reraises_the_original(db: SessionManager) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with db.scope() as session:
            session.add(User(name="ada"))
            await session.flush()
            raise Boom
    assert [] == await committed_names(db)
    assert 1 == db.statistics().rollbacks


async def test_readonly_scope_never_commits_core_writes(db: SessionManager) -> None:
    # Core DML in a readonly scope is refused by PostgreSQL (READ ONLY transaction);
    # on SQLite it is rolled back at exit. Either way nothing persists.
    try:
        async with db.scope(readonly=True) as session:
            await session.execute(text("INSERT INTO users (id, name) VALUES (1, 'ada')"))
    except Exception as error:
        assert "read-only" in str(error).lower()  # noqa: PT017
    assert [] == await committed_names(db)


async def test_readonly_scope_refuses_orm_writes(db: SessionManager) -> None:
    with pytest.raises(ReadOnlyScopeError) as caught:
        async with db.scope(readonly=True, name="report") as session:
            session.add(User(name="ada"))
            await session.flush()
    assert "report" in str(caught.value)
    assert [] == await committed_names(db)


async def test_readonly_scope_reads_committed_data(db: SessionManager) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
    async with db.scope(readonly=True) as session:
        assert ["ada"] == list((await session.scalars(select(User.name))).all())


async def test_objects_stay_readable_after_the_scope(db: SessionManager) -> None:
    async with db.scope() as session:
        user = User(name="ada")
        session.add(user)
        await session.flush()
    assert "ada" == user.name  # expire_on_commit=False: no implicit I/O needed


async def test_commit_failure_on_clean_exit_raises_and_persists_nothing(
    db: SessionManager,
) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
    with pytest.raises(Exception, match=r"(?i)unique"):
        async with db.scope() as session:
            session.add(User(name="bob"))
            session.add(User(name="ada"))  # violates the unique name at commit
    assert ["ada"] == await committed_names(db)


# -- nesting ---------------------------------------------------------------------


async def test_nested_scope_joins_and_its_exit_commits_nothing(db: SessionManager) -> None:
    async with db.scope() as outer:
        async with db.scope() as inner:
            assert inner is outer
            inner.add(User(name="ada"))
            await inner.flush()
        assert [] == await committed_names(db)  # the inner exit did not commit
    assert ["ada"] == await committed_names(db)


async def test_savepoint_scope_rolls_back_only_its_block(db: SessionManager) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
        with pytest.raises(ValueError, match="bob"):
            async with db.scope(savepoint=True) as inner:
                assert inner is session
                inner.add(User(name="bob"))
                await inner.flush()
                raise ValueError("bob")
        session.add(User(name="cy"))
    assert ["ada", "cy"] == await committed_names(db)


async def test_savepoint_scope_keeps_its_work_on_success(db: SessionManager) -> None:
    async with db.scope() as session, db.scope(savepoint=True):
        session.add(User(name="bob"))
    assert ["bob"] == await committed_names(db)


async def test_failed_flush_inside_savepoint_leaves_outer_usable(db: SessionManager) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
        await session.flush()
        with pytest.raises(Exception, match=r"(?i)unique"):
            async with db.scope(savepoint=True):
                session.add(User(name="ada"))
                await session.flush()
        session.add(User(name="bob"))
    assert ["ada", "bob"] == await committed_names(db)


async def test_independent_scope_commits_on_its_own(db: SessionManager) -> None:
    with pytest.raises(RuntimeError):
        async with db.scope() as outer:
            outer.add(User(name="ada"))
            async with db.scope(independent=True) as inner:
                assert inner is not outer
                inner.add(User(name="bob"))
            raise RuntimeError("outer fails")
    assert ["bob"] == await committed_names(db)


async def test_writable_scope_inside_readonly_scope_is_refused(db: SessionManager) -> None:
    async with db.scope(readonly=True):
        with pytest.raises(ReadOnlyScopeError):
            async with db.scope():
                pass


async def test_scope_name_labels_diagnostics(db: SessionManager) -> None:
    async with db.scope(name="GET /users"):
        (info,) = db.active_scopes()
        assert "GET /users" == info.name
        assert asyncio.current_task() is not None
        assert asyncio.current_task().get_name() == info.task_name  # type: ignore[union-attr]
        assert __file__ in info.opened_at


async def test_unnamed_scope_is_labelled_with_where_it_opened(db: SessionManager) -> None:
    async with db.scope():
        (info,) = db.active_scopes()
    assert info.name.startswith(
        "test_unnamed_scope_is_labelled_with_where_it_opened (test_scopes.py:"
    )


# -- tasks -----------------------------------------------------------------------


async def test_child_tasks_see_the_parent_session(db: SessionManager) -> None:
    seen: list[Any] = []

    async def child() -> None:
        seen.append(db.session)

    async with db.scope() as session:
        await asyncio.gather(child(), child())
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
    assert [session] * 3 == seen


async def test_child_writes_one_at_a_time_commit_with_the_parent(db: SessionManager) -> None:
    async def child(name: str) -> None:
        db.session.add(User(name=name))
        await db.session.flush()

    async with db.scope():
        await child("ada")
        await asyncio.create_task(child("bob"))
    assert ["ada", "bob"] == await committed_names(db)


async def test_scope_opened_in_a_child_task_is_its_own(db: SessionManager) -> None:
    async def child() -> Any:
        async with db.scope() as session:
            session.add(User(name="bob"))
            return session

    async with db.scope() as parent:
        child_session = await asyncio.create_task(child())
        assert child_session is not parent
        assert ["bob"] == await committed_names(db)  # committed by the child's own scope


async def test_background_task_using_an_ended_scope_gets_scope_closed_error(
    db: SessionManager,
) -> None:
    scope_ended = anyio.Event()
    outcome: list[BaseException] = []

    async def background() -> None:
        await scope_ended.wait()
        try:
            db.session.add(User(name="late"))
        except BaseException as error:
            outcome.append(error)

    async with db.scope():
        task = asyncio.create_task(background())
    scope_ended.set()
    with anyio.fail_after(10):
        await task
    assert [ScopeClosedError] == [type(e) for e in outcome]
    assert [] == await committed_names(db)


async def test_session_used_after_its_scope_raises_scope_closed_error(db: SessionManager) -> None:
    async with db.scope() as session:
        await session.execute(text("SELECT 1"))
    with pytest.raises(ScopeClosedError) as caught:
        await session.execute(text("SELECT 1"))
    assert "execute()" in str(caught.value)
    with pytest.raises(ScopeClosedError):
        session.add(User(name="late"))
    assert 0 == checked_out(db)


@pytest.mark.parametrize("ending", ["readonly", "error"])
async def test_session_used_after_a_rolled_back_scope_raises_scope_closed_error(
    db: SessionManager, ending: str
) -> None:
    # The rollback teardown runs in the owner task itself: it must not leave
    # that task able to reopen the session afterwards.
    with pytest.raises(LookupError) if ending == "error" else contextlib.nullcontext():
        async with db.scope(readonly=ending == "readonly") as session:
            await session.execute(text("SELECT 1"))
            if ending == "error":
                raise LookupError
    with pytest.raises(ScopeClosedError):
        await session.execute(text("SELECT 1"))
    with pytest.raises(ScopeClosedError):
        session.expire_all()
    assert 0 == checked_out(db)


async def test_an_untouched_session_is_refused_after_its_scope_ended(db: SessionManager) -> None:
    async with db.scope() as session:
        pass
    with pytest.raises(ScopeClosedError):
        await session.execute(text("SELECT 1"))
    with pytest.raises(ScopeClosedError):
        session.add(User(name="late"))
    assert not is_materialized(session)  # refused before SQLAlchemy built anything
    assert 0 == checked_out(db)


async def test_use_from_a_worker_thread_is_refused(db: SessionManager) -> None:
    def in_thread() -> None:
        db.session.add(User(name="ada"))

    async with db.scope():
        with pytest.raises(CrossThreadError):
            await anyio.to_thread.run_sync(in_thread)


async def test_session_method_from_a_worker_thread_is_refused(db: SessionManager) -> None:
    async with db.scope() as session:
        with pytest.raises(CrossThreadError):
            await anyio.to_thread.run_sync(session.add, User(name="ada"))


# -- cancellation ------------------------------------------------------------------


async def test_cancellation_rolls_back_and_never_commits(db: SessionManager) -> None:
    with anyio.CancelScope() as cancel_scope:
        async with db.scope() as session:
            session.add(User(name="ada"))  # pending: a commit would flush it
            cancel_scope.cancel()
            await anyio.sleep_forever()
    assert cancel_scope.cancelled_caught
    assert [] == await committed_names(db)
    assert 0 == checked_out(db)


async def test_cancellation_when_idle_returns_the_connection_intact(db: SessionManager) -> None:
    invalidated = count_invalidations(db)
    with anyio.CancelScope() as cancel_scope:
        async with db.scope() as session:
            session.add(User(name="ada"))
            await session.flush()  # holds a connection, no statement in flight
            cancel_scope.cancel()
            await anyio.sleep_forever()
    assert [] == invalidated
    assert 0 == checked_out(db)
    assert db.engine.sync_engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
    assert [] == await committed_names(db)


async def test_second_cancel_during_teardown_still_rolls_back_and_returns_connection(
    db: SessionManager,
) -> None:
    cancel_scopes: list[anyio.CancelScope] = []
    tasks: list[asyncio.Task[Any]] = []

    async def unit() -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        with anyio.CancelScope() as cancel_scope:
            cancel_scopes.append(cancel_scope)
            async with db.scope() as session:
                session.add(User(name="ada"))
                await session.flush()
                cancel_scope.cancel()
                await anyio.sleep_forever()

    with Gate(db.engine, "rollback") as gate, anyio.fail_after(10):
        gate.arm()
        async with anyio.create_task_group() as tg:
            tg.start_soon(unit)
            await gate.reached.wait()  # teardown is rolling back right now
            cancel_scopes[0].cancel()  # anyio cancels again...
            tasks[0].cancel()  # ...and so does a native Task.cancel()
            gate.open()
    assert [] == await committed_names(db)
    assert 0 == checked_out(db)


async def test_cancellation_during_commit_teardown_is_not_half_done(db: SessionManager) -> None:
    # A cancel arriving while the clean-exit COMMIT runs does not interrupt it:
    # the unit is either wholly committed or the exception says it was not.
    tasks: list[asyncio.Task[Any]] = []

    async def unit() -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        async with db.scope() as session:
            session.add(User(name="ada"))

    with Gate(db.engine, "commit") as gate, anyio.fail_after(10):
        gate.arm()
        task = asyncio.create_task(unit())
        await gate.reached.wait()
        task.cancel()
        gate.open()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ["ada"] == await committed_names(db)  # the commit ran to completion
    assert 0 == checked_out(db)


# -- teardown failures ---------------------------------------------------------------


async def test_teardown_failure_on_error_path_is_noted_never_raised(
    db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_rollback(conn: Any) -> None:
        raise OSError("network down during rollback")

    with pytest.raises(KeyError) as caught:
        async with db.scope(name="failing") as session:
            session.add(User(name="ada"))
            await session.flush()
            event.listen(db.engine.sync_engine, "rollback", broken_rollback)
            raise KeyError("original")
    event.remove(db.engine.sync_engine, "rollback", broken_rollback)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "network down during rollback" in notes
    assert any(r.levelno == logging.ERROR and "failing" in r.getMessage() for r in caplog.records)
    assert 1 == db.statistics().teardown_failures
    assert 0 == checked_out(db)
    assert [] == await committed_names(db)


# -- bookkeeping ------------------------------------------------------------------------


async def test_statistics_count_scopes_commits_and_rollbacks(db: SessionManager) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))
    with pytest.raises(ZeroDivisionError):
        async with db.scope() as session:
            await session.execute(text("SELECT 1"))
            1 / 0  # noqa: B018
    async with db.scope():
        pass
    stats = db.statistics()
    assert (3, 1, 1, 0, 0) == (
        stats.scopes_entered,
        stats.commits,
        stats.rollbacks,
        stats.open_scopes,
        stats.pool_checked_out,
    )


async def test_warn_after_logs_scopes_open_too_long(
    make_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(warn_after=1e-9)
    async with manager.scope(name="slow report") as session:
        await session.execute(text("SELECT 1"))
    assert any(
        "slow report" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


async def test_a_scope_object_cannot_be_entered_twice(db: SessionManager) -> None:
    scope = db.scope()
    async with scope:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        async with scope:
            pass
