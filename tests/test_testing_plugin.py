"""``tasksession.testing``: the pytest plugin, run on real test files through ``pytester``.

Each test here writes a small test project (a ``conftest.py`` with the application's
manager, and test files), runs pytest on it in-process, and checks the outcome
and the database afterwards:

* tests that commit (plainly, by calling ``commit()`` or ``rollback()`` themselves,
  through ``db.transactional``), fail, use a Tornado handler served by a real
  ``HTTPServer``, ``task_group()`` children, ``run_worker`` steps and ``gather`` of
  scopes are isolated from each other, in either order, under anyio's plugin and
  under pytest-asyncio (function and module loop scopes), on PostgreSQL and SQLite,
  and nothing they wrote persists;
* a test that leaks a scope or a connection fails with the leak named;
* a query through an engine the test did not isolate fails;
* clone mode runs a test in which two connections block on the same row lock; in
  savepoint mode the same test fails with the error that says to use clone mode;
* pytest-asyncio's hand-off (fixture setup, test and teardown in different tasks).

The outer tests are synchronous: the inner runs start their own event loops.
"""

from __future__ import annotations

import asyncio
import gc
import os
import textwrap
from typing import Any

# The inner runs are in-process: pytester removes the modules a run imported when it
# ends, and C extensions imported again in the next run crash the process (asyncpg's
# SSL setup did). Imported here, they stay for every run.
import aiosqlite  # noqa: F401
import asyncpg
import asyncpg.connect_utils  # noqa: F401
import pytest
import pytest_asyncio  # noqa: F401
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.sqlite.aiosqlite  # noqa: F401
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web  # noqa: F401
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import tasksession.testing.plugin
import tasksession.tornado
import tasksession.workers  # noqa: F401

pytest_plugins = ["pytester"]

ENV_URL = "TASKSESSION_INNER_URL"

CONFTEST = """
import asyncio
import gc
import os

import pytest
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasksession import SessionManager


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "plugin_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(100), default="")


URL = os.environ["TASKSESSION_INNER_URL"]
db = SessionManager(URL)


async def count(manager=db):
    async with manager.scope() as session:
        return await session.scalar(select(func.count()).select_from(Note))


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def _schema():
    async def create():
        async with db.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.run_sync(Base.metadata.create_all)
        await db.engine.dispose()

    asyncio.run(create())
    yield
    asyncio.run(db.dispose())


@pytest.fixture
def tasksession_manager():
    return db


@pytest.fixture
def tasksession_schema():
    return Base.metadata.create_all
"""

PYTEST_INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

#: Every test starts on an empty table, writes in its own way, and checks its rows.
UNITS = """
import asyncio

import anyio
import pytest
from sqlalchemy import select

from conftest import Note, count
from tasksession.workers import run_worker

pytestmark = {mark}


async def test_plain_scope_commits(tasksession_db):
    assert 0 == await count()
    async with tasksession_db.scope() as session:
        session.add(Note(text="plain"))
    assert 1 == await count()


async def test_code_that_commits_and_rolls_back_itself(tasksession_db):
    assert 0 == await count()
    async with tasksession_db.scope() as session:
        session.add(Note(text="kept"))
        await session.commit()
        session.add(Note(text="dropped"))
        await session.flush()
        await session.rollback()
        session.add(Note(text="kept too"))
    assert 2 == await count()


async def test_a_failing_scope_rolls_back(tasksession_db):
    assert 0 == await count()
    with pytest.raises(KeyError):
        async with tasksession_db.scope() as session:
            session.add(Note(text="lost"))
            await session.flush()
            raise KeyError("boom")
    async with tasksession_db.scope() as session:
        session.add(Note(text="after"))
    assert 1 == await count()


async def test_gather_of_scopes(tasksession_db):
    assert 0 == await count()

    async def unit(n):
        async with tasksession_db.scope() as session:
            session.add(Note(text=f"gathered {{n}}"))
            await session.flush()
            await asyncio.sleep(0)  # let the others try the connection meanwhile
            await session.execute(select(Note))

    await asyncio.gather(*(unit(n) for n in range(5)))
    assert 5 == await count()


async def test_task_group_children_inside_a_scope(tasksession_db):
    assert 0 == await count()
    async with tasksession_db.scope() as session:
        session.add(Note(text="parent"))
        await session.flush()

        async def child(n):
            tasksession_db.session.add(Note(text=f"child {{n}}"))
            await tasksession_db.session.flush()

        async with tasksession_db.task_group() as tg:
            for n in range(4):
                tg.start_soon(child, n)
        async with tasksession_db.scope(independent=True) as other:
            other.add(Note(text="independent"))
    assert 6 == await count()


async def test_transactional(tasksession_db):
    assert 0 == await count()

    @tasksession_db.transactional()
    async def add(text):
        tasksession_db.session.add(Note(text=text))

    await asyncio.gather(add("a"), add("b"))
    assert 2 == await count()


async def test_worker_steps(tasksession_db):
    assert 0 == await count()
    stop = anyio.Event()
    done = []

    async def step(session):
        session.add(Note(text=f"job {{len(done)}}"))
        done.append(1)
        if len(done) == 6:
            stop.set()
        return not stop.is_set()

    with anyio.fail_after(20):
        await run_worker(tasksession_db, step, concurrency=3, stop=stop, idle_delay=0.01)
    assert len(done) == await count()


async def test_tornado_handler_on_a_real_server(tasksession_db):
    import tornado.web
    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from tasksession.tornado import SessionMixin

    assert 0 == await count()

    class Notes(SessionMixin, tornado.web.RequestHandler):
        async def post(self):
            self.session.add(Note(text=self.get_body_argument("text")))
            await self.session.flush()
            self.write("ok")

    app = tornado.web.Application([("/", Notes)], session_manager=tasksession_db)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    client = AsyncHTTPClient(force_instance=True)
    try:
        with anyio.fail_after(20):
            responses = await asyncio.gather(
                *(
                    client.fetch(f"http://127.0.0.1:{{port}}/", method="POST", body=f"text={{n}}")
                    for n in range(4)
                )
            )
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()
    assert [200] * 4 == [r.code for r in responses]
    assert 4 == await count()
"""

#: A second file, run before or after the first: it must never see their rows.
OTHER = """
import pytest

from conftest import Note, count

pytestmark = {mark}


async def test_sees_nothing_of_the_others(tasksession_db):
    assert 0 == await count()
    async with tasksession_db.scope() as session:
        session.add(Note(text="other"))
    assert 1 == await count()
"""

MARKS = {
    "anyio": "pytest.mark.anyio",
    "asyncio": "pytest.mark.asyncio",
    "asyncio-module-loop": 'pytest.mark.asyncio(loop_scope="module")',
}


def _project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv(ENV_URL, url)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(PYTEST_INI)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    gc.collect()  # what earlier tests left for the collector is theirs, not the inner run's
    # The inner run's faulthandler plugin would switch off the outer run's on its way out.
    return pytester.runpytest(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:faulthandler", *args
    )


async def _rows_left(url: str) -> int:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return int(await connection.scalar(text("SELECT count(*) FROM plugin_notes")))
    finally:
        await engine.dispose()


def rows_left(url: str) -> int:
    """Rows of the inner projects' table on the real database, after their run."""
    return asyncio.run(_rows_left(url))


@pytest.fixture(params=["sqlite", "postgres"])
def inner_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/inner.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.mark.parametrize("runner", list(MARKS))
def test_tests_are_isolated_from_each_other_in_either_order(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, inner_url: str, runner: str
) -> None:
    _project(pytester, monkeypatch, inner_url)
    pytester.makepyfile(
        test_units=UNITS.format(mark=MARKS[runner]), test_other=OTHER.format(mark=MARKS[runner])
    )
    forward = _run(pytester, "test_other.py", "test_units.py")
    forward.assert_outcomes(passed=9)
    backward = _run(pytester, "test_units.py", "test_other.py")
    backward.assert_outcomes(passed=9)
    assert 0 == rows_left(inner_url)


LEAKS = """
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from conftest import URL

pytestmark = pytest.mark.anyio


async def test_leaks_a_scope(tasksession_db):
    scope = tasksession_db.scope(name="forgotten")
    await scope.__aenter__()


@pytest.fixture
async def kept():
    connections = []
    yield connections
    for connection in connections:  # after the plugin's check (this was set up first)
        await connection.close()


@pytest.mark.tasksession(mode="clone")
async def test_leaks_a_connection(kept, tasksession_db):
    kept.append(await tasksession_db.engine.connect())


async def test_queries_a_stray_engine(tasksession_db):
    engine = create_async_engine(URL, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


async def test_bypasses_the_test_transaction(tasksession_db):
    async with tasksession_db.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
"""


def test_leaks_and_stray_engines_fail_the_test_naming_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, inner_url: str
) -> None:
    _project(pytester, monkeypatch, inner_url)
    pytester.makepyfile(test_leaks=LEAKS)
    result = _run(pytester)
    # The leaks fail in teardown (errors); the stray queries fail the tests themselves.
    result.assert_outcomes(passed=2, failed=2, errors=2)
    output = result.stdout.str()
    assert "ERROR at teardown of test_leaks_a_scope" in output
    assert "scope 'forgotten' (task 'Task-" in output
    assert "opened at " in output
    assert "test_leaks.py:13 in test_leaks_a_scope" in output
    assert "ERROR at teardown of test_leaks_a_connection" in output
    assert "checked out at " in output
    assert "test_leaks.py:26 in test_leaks_a_connection" in output
    # Counted in the failures' tracebacks ("E" lines): the short summary repeats the
    # message, whole when pytest runs under CI=true.
    stray = [
        line
        for line in output.splitlines()
        if line.startswith("E ") and "StrayEngineError: A connection was checked out at" in line
    ]
    assert 2 == len(stray)
    assert "test_leaks.py:32 in test_queries_a_stray_engine" in output
    assert "test_leaks.py:39 in test_bypasses_the_test_transaction" in output


ROW_LOCK = """
import anyio
import pytest
from sqlalchemy import select, text, update

from conftest import Note, count

pytestmark = pytest.mark.anyio


async def _two_transactions_on_one_row(db):
    async with db.scope() as session:
        session.add(Note(id=1, text="start"))
    locked, release = anyio.Event(), anyio.Event()

    async def holder():
        async with db.scope() as session:
            note = await session.scalar(select(Note).where(Note.id == 1).with_for_update())
            locked.set()
            await release.wait()
            note.text = "holder"

    async def waiter():
        await locked.wait()
        async with db.scope() as session:
            # Blocks on the row lock until the holder commits.
            await session.execute(
                update(Note).where(Note.id == 1).values(text=Note.text + "+waiter")
            )

    async def blocked_backends():
        async with db.scope(independent=True) as session:
            return await session.scalar(text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            tg.start_soon(waiter)
            await locked.wait()
            while await blocked_backends() == 0:  # bounded by fail_after
                await anyio.sleep(0.01)
            release.set()
    async with db.scope() as session:
        return await session.scalar(select(Note.text).where(Note.id == 1))


@pytest.mark.tasksession(mode="clone")
async def test_row_lock_between_two_connections(tasksession_db):
    assert 0 == await count()
    assert "holder+waiter" == await _two_transactions_on_one_row(tasksession_db)


@pytest.mark.tasksession(mode="clone")
async def test_the_next_clone_is_clean(tasksession_db):
    assert 0 == await count()


@pytest.mark.tasksession(wait_timeout=0.5)
async def test_savepoint_mode_says_to_use_clone_mode(tasksession_db):
    from tasksession.testing import SharedConnectionTimeoutError

    with pytest.raises(ExceptionGroup) as raised:  # from the task group
        await _two_transactions_on_one_row(tasksession_db)
    assert raised.group_contains(SharedConnectionTimeoutError, match='mode="clone"')
"""


@pytest.mark.postgres
def test_clone_mode_gives_real_concurrency(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    _project(pytester, monkeypatch, postgres_url)
    pytester.makepyfile(test_row_lock=ROW_LOCK)
    result = _run(pytester)
    result.assert_outcomes(passed=3)
    assert 0 == rows_left(postgres_url)
    # The clones and the template are gone (their names carry this process's id).
    assert 0 == asyncio.run(_databases_like(postgres_url, f"%\\_clone\\_{os.getpid()}\\_%"))
    assert 0 == asyncio.run(_databases_like(postgres_url, f"%\\_tmpl\\_{os.getpid()}\\_%"))


async def _databases_like(url: str, pattern: str) -> int:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return int(
                await connection.scalar(
                    text("SELECT count(*) FROM pg_database WHERE datname LIKE :p"), {"p": pattern}
                )
            )
    finally:
        await engine.dispose()


CLONE_PER_MODULE = """
import pytest

from conftest import Note, count

pytestmark = [pytest.mark.anyio, pytest.mark.tasksession(mode="clone", clone_per="module")]


async def test_first(tasksession_db):
    assert 0 == await count()
    async with tasksession_db.scope() as session:
        session.add(Note(text="shared by the module"))


async def test_second_sees_the_first(tasksession_db):
    assert 1 == await count()
"""


def test_a_clone_per_module(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, inner_url: str
) -> None:
    _project(pytester, monkeypatch, inner_url)
    pytester.makepyfile(
        test_module_clone=CLONE_PER_MODULE, test_other=OTHER.format(mark=MARKS["anyio"])
    )
    _run(pytester, "test_module_clone.py", "test_other.py").assert_outcomes(passed=3)
    assert 0 == rows_left(inner_url)


HAND_OFF = """
import asyncio

import pytest
import pytest_asyncio

from conftest import Note, count

TASKS = {}


@pytest_asyncio.fixture
async def seeded(tasksession_db):
    TASKS["setup"] = asyncio.current_task()
    async with tasksession_db.scope() as session:
        session.add(Note(text="seed"))
    yield tasksession_db
    TASKS["teardown"] = asyncio.current_task()
    # The teardown (another task) sees the seed and the test's row; still isolated.
    assert 2 == await count()


@pytest.mark.asyncio
async def test_uses_the_seed(seeded):
    TASKS["test"] = asyncio.current_task()
    assert 1 == await count()
    async with seeded.scope() as session:
        session.add(Note(text="test"))


@pytest.mark.asyncio
async def test_starts_clean():
    pass


def test_report_tasks():
    print("TASKS", len({id(task) for task in TASKS.values()}))
"""


def test_pytest_asyncio_hand_off_between_tasks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, inner_url: str
) -> None:
    _project(pytester, monkeypatch, inner_url)
    pytester.makepyfile(test_hand_off=HAND_OFF)
    result = _run(pytester, "-s")
    result.assert_outcomes(passed=3)
    assert 0 == rows_left(inner_url)


def test_usage_errors_say_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTEST_INI)
    pytester.makepyfile(
        test_usage=textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            @pytest.mark.anyio
            async def test_without_a_manager(tasksession_db):
                pass
            """
        )
    )
    assert "define a fixture named tasksession_manager" in _run(pytester).stdout.str()
    pytester.makepyfile(
        test_usage=textwrap.dedent(
            """
            import pytest
            from tasksession import SessionManager

            @pytest.fixture
            def tasksession_manager():
                return SessionManager("sqlite+aiosqlite://")

            def test_sync(tasksession_db):
                pass
            """
        )
    )
    assert "mark it @pytest.mark.anyio" in _run(pytester).stdout.str()
