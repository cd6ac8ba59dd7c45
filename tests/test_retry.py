"""``RetryPolicy`` and ``@db.transactional(retry=...)`` against real failures on PostgreSQL.

Serialization failures come from SERIALIZABLE read-modify-write units that a
barrier makes overlap; deadlocks from two units locking rows in opposite
order; disconnects from ``pg_terminate_backend`` on the cluster the tests
started. Only the first attempt of a unit waits at the barrier, so the retry
is what resolves the conflict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

from tasksession import (
    CommitOutcomeUnknownError,
    NoScopeError,
    RetryPolicy,
    SessionManager,
)
from tasksession._retry import is_disconnect, sqlstate_of

from .helpers import terminate

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=10, backoff=0.001, max_backoff=0.01)


class Barrier:
    """Lets ``parties`` tasks continue only once all of them arrived."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = anyio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.event.set()
        with anyio.fail_after(10):
            await self.event.wait()


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS retry_counters"))
        await conn.execute(text("CREATE TABLE retry_counters (id int PRIMARY KEY, value int)"))
        await conn.execute(text("INSERT INTO retry_counters VALUES (1, 0), (2, 0)"))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def serializable_db(postgres_url: str, admin: AsyncEngine) -> AsyncIterator[SessionManager]:
    db = SessionManager(postgres_url, isolation_level="SERIALIZABLE")
    try:
        yield db
        assert 0 == db.statistics().pool_checked_out
    finally:
        await db.dispose()


async def counter(admin: AsyncEngine, row: int = 1) -> int:
    async with admin.connect() as conn:
        return int(
            await conn.scalar(text("SELECT value FROM retry_counters WHERE id = :id"), {"id": row})
            or 0
        )


# -- real failures, retried ------------------------------------------------------------


async def test_serialization_failures_are_retried_until_the_count_is_exact(
    serializable_db: SessionManager, admin: AsyncEngine
) -> None:
    db = serializable_db
    units = 4
    barrier = Barrier(units)
    attempts: list[int] = []

    @db.transactional(retry=FAST)
    async def increment(first_attempts: set[int], unit: int) -> None:
        attempts.append(unit)
        value = await db.session.scalar(text("SELECT value FROM retry_counters WHERE id = 1"))
        if unit not in first_attempts:
            first_attempts.add(unit)
            await barrier.wait()  # everybody has read the same value
        await db.session.execute(
            text("UPDATE retry_counters SET value = :v WHERE id = 1"), {"v": value + 1}
        )

    seen: set[int] = set()
    async with anyio.create_task_group() as tg:
        for unit in range(units):
            tg.start_soon(increment, seen, unit)
    assert units == await counter(admin)
    assert len(attempts) > units  # conflicts happened and were retried


async def test_a_serialization_failure_is_a_retryable_sqlstate(
    serializable_db: SessionManager,
) -> None:
    db = serializable_db
    barrier = Barrier(2)
    errors: list[BaseException] = []

    async def increment() -> None:
        try:
            async with db.scope() as session:
                value = await session.scalar(text("SELECT value FROM retry_counters WHERE id = 1"))
                await barrier.wait()
                await session.execute(
                    text("UPDATE retry_counters SET value = :v WHERE id = 1"), {"v": value + 1}
                )
        except sa_exc.DBAPIError as error:
            errors.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(increment)
        tg.start_soon(increment)
    assert ["40001"] == [sqlstate_of(error) for error in errors]
    assert "serialization failure (SQLSTATE 40001)" == RetryPolicy().reason(errors[0])


async def test_deadlocks_are_retried_and_both_units_apply_once(
    pg_db: SessionManager, admin: AsyncEngine
) -> None:
    db = pg_db
    barrier = Barrier(2)
    attempts: list[str] = []

    @db.transactional(retry=FAST)
    async def transfer(first: int, second: int, retried: set[int]) -> None:
        attempts.append(f"{first}->{second}")
        session = db.session
        await session.execute(
            text("UPDATE retry_counters SET value = value + 1 WHERE id = :id"), {"id": first}
        )
        if first not in retried:
            retried.add(first)
            await barrier.wait()  # each holds one row lock and wants the other
        await session.execute(
            text("UPDATE retry_counters SET value = value + 10 WHERE id = :id"), {"id": second}
        )

    retried: set[int] = set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(transfer, 1, 2, retried)
        tg.start_soon(transfer, 2, 1, retried)
    assert (11, 11) == (await counter(admin, 1), await counter(admin, 2))
    assert 3 == len(attempts)  # exactly one of them was the deadlock victim


async def test_a_lost_connection_mid_unit_is_retried_on_a_new_connection(
    pg_db: SessionManager, admin: AsyncEngine, self_started: None
) -> None:
    db = pg_db
    pids: list[int] = []

    @db.transactional(retry=FAST)
    async def increment() -> None:
        session = db.session
        await session.execute(text("UPDATE retry_counters SET value = value + 1 WHERE id = 1"))
        pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
        if len(pids) == 1:
            await terminate(admin, pids[0])
        await session.execute(text("UPDATE retry_counters SET value = value + 1 WHERE id = 2"))

    await increment()
    assert (1, 1) == (await counter(admin, 1), await counter(admin, 2))
    assert 2 == len(pids)
    assert pids[0] != pids[1]


async def test_a_lost_connection_is_classified_as_a_disconnect(
    pg_db: SessionManager, admin: AsyncEngine, self_started: None
) -> None:
    with pytest.raises(sa_exc.DBAPIError) as caught:
        async with pg_db.scope() as session:
            await terminate(admin, int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
            await session.execute(text("SELECT 1"))
    assert is_disconnect(caught.value)
    assert "lost connection" == RetryPolicy().reason(caught.value)


class CommitPause:
    """A ``commit`` connection-event hook that holds the first COMMIT until released."""

    def __init__(self) -> None:
        self.reached = anyio.Event()
        self.release = anyio.Event()

    def __call__(self, connection: Any) -> None:
        if not self.reached.is_set():
            self.reached.set()
            await_only(self.release.wait())


async def test_a_connection_lost_during_commit_is_never_retried_and_says_so(
    pg_db: SessionManager, admin: AsyncEngine, self_started: None
) -> None:
    db = pg_db
    pids: list[int] = []
    pause = CommitPause()

    @db.transactional(retry=FAST)
    async def increment() -> None:
        session = db.session
        pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
        await session.execute(text("UPDATE retry_counters SET value = value + 1 WHERE id = 1"))

    event.listen(db.engine.sync_engine, "commit", pause)
    try:
        async with anyio.create_task_group() as tg:

            async def lose_the_connection_during_commit() -> None:
                with anyio.fail_after(10):
                    await pause.reached.wait()
                await terminate(admin, pids[0])
                pause.release.set()

            tg.start_soon(lose_the_connection_during_commit)
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await increment()
    finally:
        event.remove(db.engine.sync_engine, "commit", pause)
    assert 1 == len(pids)  # not retried
    assert "increment" in caught.value.unit
    assert "may or may not have committed" in str(caught.value)
    assert is_disconnect(caught.value.original)
    assert caught.value.__cause__ is caught.value.original


# -- what is not retried -------------------------------------------------------------------


async def test_a_non_retryable_database_error_is_raised_at_once(
    pg_db: SessionManager, admin: AsyncEngine
) -> None:
    db = pg_db
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=5, backoff=10, jitter=False))
    async def duplicate() -> None:
        attempts.append(1)
        await db.session.execute(text("INSERT INTO retry_counters VALUES (1, 5)"))

    with anyio.fail_after(5), pytest.raises(sa_exc.IntegrityError):
        await duplicate()  # a retry would sleep 10 s first
    assert 1 == len(attempts)
    assert 0 == await counter(admin)


async def test_an_application_error_is_raised_at_once_and_rolled_back(
    pg_db: SessionManager, admin: AsyncEngine
) -> None:
    db = pg_db
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=5))
    async def fail() -> None:
        attempts.append(1)
        await db.session.execute(text("UPDATE retry_counters SET value = 99 WHERE id = 1"))
        raise KeyError("no such account")

    with pytest.raises(KeyError):
        await fail()
    assert 1 == len(attempts)
    assert 0 == await counter(admin)


async def test_when_attempts_run_out_the_last_error_says_so(
    serializable_db: SessionManager,
) -> None:
    db = serializable_db
    barrier = Barrier(2)
    policy = RetryPolicy(attempts=1)

    @db.transactional(retry=policy)
    async def increment() -> None:
        value = await db.session.scalar(text("SELECT value FROM retry_counters WHERE id = 1"))
        await barrier.wait()
        await db.session.execute(
            text("UPDATE retry_counters SET value = :v WHERE id = 1"), {"v": value + 1}
        )

    results: list[BaseException | None] = []

    async def run() -> None:
        try:
            await increment()
        except sa_exc.DBAPIError as error:
            results.append(error)
        else:
            results.append(None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(run)
    [error] = [result for result in results if result is not None]
    assert any("gave up" in note for note in getattr(error, "__notes__", []))


async def test_inside_an_open_scope_it_joins_and_does_not_retry(
    serializable_db: SessionManager,
) -> None:
    db = serializable_db
    barrier = Barrier(2)
    attempts: list[int] = []

    @db.transactional(retry=FAST)
    async def increment() -> None:
        attempts.append(1)
        value = await db.session.scalar(text("SELECT value FROM retry_counters WHERE id = 1"))
        await barrier.wait()
        await db.session.execute(
            text("UPDATE retry_counters SET value = :v WHERE id = 1"), {"v": value + 1}
        )

    errors: list[BaseException] = []

    async def inside_a_request() -> None:
        try:
            async with db.scope() as outer:
                await increment()
                assert outer is db.session  # the same unit: joined
        except sa_exc.DBAPIError as error:
            errors.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(inside_a_request)
        tg.start_soon(inside_a_request)
    assert 2 == len(attempts)
    [error] = errors
    assert any("joined that unit and was not retried" in n for n in error.__notes__)


# -- the decorator ---------------------------------------------------------------------------


async def test_transactional_commits_and_returns_the_result(
    db: SessionManager,
) -> None:
    from .models import User

    @db.transactional()
    async def create(name: str) -> int:
        user = User(name=name)
        db.session.add(user)
        await db.session.flush()
        return user.id

    user_id = await create("ada")
    async with db.scope() as session:
        user = await session.get(User, user_id)
        assert user is not None
        assert "ada" == user.name


async def test_each_call_has_its_own_session(db: SessionManager) -> None:
    sessions: list[Any] = []

    @db.transactional()
    async def remember() -> None:
        sessions.append(db.session)

    await remember()
    await remember()
    assert sessions[0] is not sessions[1]
    with pytest.raises(NoScopeError):
        db.session  # noqa: B018 - the scope ended with the call


async def test_retries_are_logged(
    serializable_db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    db = serializable_db
    barrier = Barrier(2)
    seen: set[int] = set()

    @db.transactional(retry=FAST)
    async def increment(unit: int) -> None:
        value = await db.session.scalar(text("SELECT value FROM retry_counters WHERE id = 1"))
        if unit not in seen:
            seen.add(unit)
            await barrier.wait()
        await db.session.execute(
            text("UPDATE retry_counters SET value = :v WHERE id = 1"), {"v": value + 1}
        )

    with caplog.at_level(logging.INFO, logger="tasksession"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(increment, 1)
            tg.start_soon(increment, 2)
    [record] = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert "serialization failure (SQLSTATE 40001)" in record.getMessage()


def test_transactional_without_parentheses_explains_the_fix() -> None:
    db = SessionManager()

    async def work() -> None:
        pass

    with pytest.raises(TypeError, match=r"needs parentheses"):
        db.transactional(work)  # type: ignore[arg-type]


def test_transactional_refuses_a_plain_function() -> None:
    db = SessionManager()
    with pytest.raises(TypeError, match="coroutine functions"):
        db.transactional()(lambda: None)  # type: ignore[arg-type,return-value]


# -- the policy ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=0.5, jitter=False)
    assert [0.1, 0.2, 0.4, 0.5, 0.5] == [policy.delay(n) for n in range(1, 6)]


def test_jittered_backoff_stays_within_the_unjittered_value() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=0.5)
    assert all(0.0 <= policy.delay(3) <= 0.4 for _ in range(200))


def test_policy_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(TypeError, match="collection"):
        RetryPolicy(sqlstates="40001")  # type: ignore[arg-type]
    assert frozenset({"40001"}) == RetryPolicy(sqlstates=["40001"]).sqlstates  # type: ignore[arg-type]


def test_policy_never_retries_a_cancellation_or_a_plain_error() -> None:
    policy = RetryPolicy()
    assert policy.reason(asyncio.CancelledError()) is None
    assert policy.reason(ValueError("x")) is None


def test_policy_retries_extra_exception_classes() -> None:
    class Flaky(Exception):
        pass

    assert "Flaky" == RetryPolicy(exceptions=(Flaky,)).reason(Flaky())
