"""Buffered results and detached objects: what leaves a scope stays readable."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from tasksession import SessionManager

from .helpers import checked_out
from .models import User

pytestmark = pytest.mark.anyio

NAMES = ["ada", "grace", "katherine"]


@pytest.fixture
async def users(db: SessionManager) -> SessionManager:
    async with db.scope() as session:
        session.add_all(User(name=name) for name in NAMES)
    return db


async def test_execute_result_is_readable_after_the_scope_ended(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.execute(select(User).order_by(User.name))
    assert 0 == checked_out(users)
    assert NAMES == [user.name for user in result.scalars()]


async def test_scalars_result_is_readable_after_the_scope_ended(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.scalars(select(User.name).order_by(User.name))
    assert NAMES == result.all()


async def test_core_result_is_readable_after_the_scope_ended(users: SessionManager) -> None:
    async with users.scope() as session:
        result = await session.execute(text("SELECT name FROM users ORDER BY name"))
    assert 0 == checked_out(users)
    assert NAMES == [row.name for row in result]


async def test_result_of_a_failed_scope_is_still_readable(users: SessionManager) -> None:
    with pytest.raises(LookupError):
        async with users.scope() as session:
            result = await session.execute(select(User.name).order_by(User.name))
            raise LookupError
    assert NAMES == list(result.scalars())


async def test_objects_leave_the_scope_detached_with_their_loaded_state(
    users: SessionManager,
) -> None:
    async with users.scope() as session:
        user = await session.scalar(select(User).where(User.name == "ada"))
    assert user is not None
    assert inspect(user).detached
    assert "ada" == user.name


async def test_commit_keeps_loaded_values_by_default(users: SessionManager) -> None:
    async with users.scope() as session:
        user = await session.scalar(select(User).where(User.name == "ada"))
        assert user is not None
        user.name = "ada lovelace"
        await session.commit()
        assert "ada lovelace" == user.name  # no reload needed: expire_on_commit=False
    assert "ada lovelace" == user.name


async def test_expire_on_commit_is_configurable(users: SessionManager, make_manager: Any) -> None:
    expiring = make_manager(expire_on_commit=True)
    async with expiring.scope() as session:
        user = await session.scalar(select(User).where(User.name == "ada"))
        await session.commit()
        assert {"id", "name"} == inspect(user).expired_attributes
