"""A savepoint scope whose flush fails rolls back only the savepoint."""

import pytest
from sqlalchemy import exc, select

from tasksession import SessionManager

from .models import User

pytestmark = pytest.mark.anyio


async def test_failed_flush_in_savepoint_scope_keeps_the_outer_transaction(
    db: SessionManager,
) -> None:
    async with db.scope() as session:
        session.add(User(name="ada"))

    async def add_duplicate_in_savepoint() -> None:
        async with db.scope(savepoint=True) as session:
            session.add(User(name="ada"))  # duplicate: UNIQUE fails at flush
            await session.flush()

    async with db.scope() as session:
        session.add(User(name="grace"))
        with pytest.raises(exc.IntegrityError):
            await add_duplicate_in_savepoint()
    async with db.scope() as session:
        names = list(await session.scalars(select(User.name).order_by(User.name)))
    assert ["ada", "grace"] == names
