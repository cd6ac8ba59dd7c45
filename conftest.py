"""Fixtures shared by tests/ and examples/: the asyncio backend and one PostgreSQL server per run.

The server is found as DEVELOPERS.md says (``tests/postgres_server.py``): the URL in
``TASKSESSION_TEST_DATABASE_URL``, else a throwaway cluster started for this run and
stopped at its end, else PostgreSQL tests are skipped with the reason (or fail under
``TASKSESSION_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from tests.postgres_server import ENV_REQUIRE, PostgresServer, find_server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server, how = find_server()
    if server is None:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"{ENV_REQUIRE}=1 but {how}", pytrace=False)
        pytest.skip(how)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database for a whole module (a SQLite file of its own, or the run's PostgreSQL).

    For modules whose tables are created once and whose tests run isolated by the
    testing plugin (``tasksession_manager`` built on it).
    """
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('module')}/module.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect garbage after every test, so that a resource one leaks is reported there.

    Without it, a connection a test forgot to close may only be found when the
    whole run ends, attributed to no test at all.
    """
    yield
    gc.collect()
