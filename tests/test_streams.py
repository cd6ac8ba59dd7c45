"""stream() / stream_scalars(): work inside a scope, closed at its exit, refused after it."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

from tasksession import ScopeClosedError, SessionManager
from tasksession._errors import StreamClosedError

from .helpers import checked_out
from .models import User

pytestmark = pytest.mark.anyio

NAMES = [f"user{i:02d}" for i in range(30)]


@pytest.fixture
async def users(db: SessionManager) -> SessionManager:
    """``db`` with 30 users, ``user00`` .. ``user29``."""
    async with db.scope() as session:
        session.add_all(User(name=name) for name in NAMES)
    return db


def by_name() -> object:
    return select(User).order_by(User.name)


async def test_stream_is_iterated_inside_the_scope(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.stream(by_name())
        names = [user.name async for (user,) in result]
    assert NAMES == names


async def test_stream_scalars_is_iterated_inside_the_scope(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.stream_scalars(by_name())
        names = [user.name async for user in result]
    assert NAMES == names


async def test_core_stream_is_iterated_inside_the_scope(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.stream(text("SELECT name FROM users ORDER BY name"))
        names = [row.name async for row in result]
    assert NAMES == names


async def test_unconsumed_stream_is_closed_at_scope_exit(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.stream(by_name())
        first = await result.fetchmany(5)
    assert 5 == len(first)
    assert result.closed
    assert 0 == checked_out(users)


async def test_unconsumed_stream_is_closed_when_the_scope_fails(users: SessionManager) -> None:
    with pytest.raises(LookupError):
        async with users.scope() as session:
            result = await session.stream_scalars(by_name())
            await result.fetchmany(3)
            raise LookupError
    assert result.closed
    assert 0 == checked_out(users)


async def test_stream_opened_in_a_joined_scope_lives_until_the_outer_scope_ends(
    users: SessionManager,
) -> None:
    async with users.scope():
        async with users.scope() as joined:
            result = await joined.stream_scalars(by_name())
        names = [user.name async for user in result]
    assert NAMES == names
    with pytest.raises(StreamClosedError):
        await result.all()


async def test_stream_still_open_after_an_explicit_commit_is_closed_at_exit(
    users: SessionManager,
) -> None:
    async with users.scope() as session:
        result = await session.stream_scalars(select(func.count()).select_from(User))
        await session.commit()
    assert result.closed
    assert 0 == checked_out(users)
    with pytest.raises(StreamClosedError):
        await result.all()


async def test_iterating_a_stream_after_its_scope_ended_raises(users: SessionManager) -> None:
    async with users.scope(name="export users") as session:
        result = await session.stream(by_name())
    with pytest.raises(ScopeClosedError) as caught:
        async for _row in result:
            pass
    assert isinstance(caught.value, StreamClosedError)
    assert "export users" == caught.value.scope_name
    assert "await session.execute(" in str(caught.value)


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda r: r.fetchone(), id="fetchone"),
        pytest.param(lambda r: r.fetchmany(2), id="fetchmany"),
        pytest.param(lambda r: r.all(), id="all"),
        pytest.param(lambda r: r.first(), id="first"),
        pytest.param(lambda r: r.scalars().all(), id="scalars-all"),
        pytest.param(lambda r: r.mappings().all(), id="mappings-all"),
    ],
)
async def test_every_way_of_reading_a_stream_after_its_scope_raises(
    users: SessionManager, read: object
) -> None:
    async with users.scope() as session:
        result = await session.stream(by_name())
    with pytest.raises(StreamClosedError):
        await read(result)  # type: ignore[operator]


async def test_reading_a_consumed_stream_after_its_scope_raises(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.stream_scalars(by_name())
        assert NAMES == [user.name for user in await result.all()]
    with pytest.raises(StreamClosedError):
        await result.all()


async def test_stream_closed_by_the_code_itself_is_fine(users: SessionManager) -> None:
    async with users.scope() as session:
        for _ in range(20):  # more than are kept before closed ones are dropped
            result = await session.stream_scalars(by_name())
            await result.fetchmany(1)
            await result.close()
        open_one = await session.stream_scalars(by_name())
        await open_one.fetchmany(1)
    assert open_one.closed
    assert 0 == checked_out(users)


async def test_stream_in_readonly_scope_is_closed_at_exit(users: SessionManager) -> None:
    async with users.scope(readonly=True) as session:
        result = await session.stream_scalars(by_name())
        await result.fetchmany(2)
    assert result.closed
    assert 0 == checked_out(users)
