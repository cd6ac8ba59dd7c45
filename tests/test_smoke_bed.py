import pytest
from sqlalchemy import text

from tasksession import SessionManager

pytestmark = pytest.mark.anyio


async def test_each_database_answers_a_query(db: SessionManager) -> None:
    async with db.scope() as session:
        assert 1 == await session.scalar(text("SELECT 1"))
