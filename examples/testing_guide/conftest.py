"""The fixtures a project writes for tasksession's pytest plugin (docs/testing.md).

The plugin needs one fixture, ``tasksession_manager``: the application's manager,
configured for tests. Here it is the example's own ``db``, pointed at SQLite and at
the test run's PostgreSQL, with the tables created once per database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tasksession import SessionManager

from .app import Base, db


@pytest.fixture(scope="module")
async def tasksession_manager(module_database_url: str) -> AsyncIterator[SessionManager]:
    url = module_database_url
    db.configure(url)
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def tasksession_schema() -> object:
    """For tests marked ``@pytest.mark.tasksession(mode="clone")``: how the template is built."""
    return Base.metadata.create_all
