"""Read-only requests: no BEGIN/ROLLBACK round trips, and no write can ever persist."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
import tornado.web
from sqlalchemy import text

from tasksession import ReadOnlyScopeError, SessionManager
from tasksession.tornado import SessionMixin

from .conftest import seeded_readonly_autocommit
from .models import User
from .tornado_helpers import checked_out, count_users, json_body, serve, wait_until_released

pytestmark = pytest.mark.anyio

# now() is the start of the transaction: two statements inside one BEGIN ... ROLLBACK
# see the same value, two autocommit statements (each its own transaction) do not.
NOW = text("SELECT now()")
READ_ONLY = text("SELECT current_setting('transaction_read_only')")


@pytest.fixture
async def ro_db(postgres_url: str) -> AsyncIterator[SessionManager]:
    async for db in seeded_readonly_autocommit(postgres_url, pool_size=5):
        yield db
        await wait_until_released(db)


class Users(SessionMixin, tornado.web.RequestHandler):
    session_readonly = frozenset({"GET", "HEAD"})

    async def get(self, ident: str) -> None:
        user = await self.session.get(User, int(ident))
        first = await self.session.scalar(NOW)
        second = await self.session.scalar(NOW)
        read_only = await self.session.scalar(READ_ONLY)
        own = first != second
        self.write({"name": user.name if user else None, "own": own, "read_only": read_only})

    async def post(self, ident: str) -> None:
        self.session.add(User(id=int(ident), name=f"user{ident}"))
        self.set_status(201)


class OrmWriteInGet(SessionMixin, tornado.web.RequestHandler):
    session_readonly = True

    async def get(self) -> None:
        self.session.add(User(name="sneaky"))
        await self.session.flush()


class OrmWriteInGetOfASet(SessionMixin, tornado.web.RequestHandler):
    session_readonly = frozenset({"GET", "HEAD"})

    async def get(self) -> None:
        self.session.add(User(name="sneaky"))
        await self.session.flush()


class WritableScopeInGet(SessionMixin, tornado.web.RequestHandler):
    session_readonly = True

    async def get(self) -> None:
        async with self.settings["session_manager"].scope() as session:  # joins: refused
            session.add(User(name="sneaky"))


class OwnReadonlyScopeInPost(SessionMixin, tornado.web.RequestHandler):
    async def post(self) -> None:
        db = self.settings["session_manager"]
        async with db.scope(name="own", readonly=True, independent=True) as session:
            session.add(User(name="sneaky"))
            await session.flush()


class UnflushedWriteInGet(SessionMixin, tornado.web.RequestHandler):
    session_readonly = True

    async def get(self) -> None:
        self.session.add(User(name="sneaky"))  # never flushed: refused when the scope ends


class CoreWriteInGet(SessionMixin, tornado.web.RequestHandler):
    session_readonly = True

    async def get(self) -> None:
        await self.session.execute(text("INSERT INTO users (name) VALUES ('sneaky')"))


async def test_readonly_get_sends_no_begin(ro_db: SessionManager) -> None:
    app = tornado.web.Application([(r"/users/(\d+)", Users)], session_manager=ro_db)
    async with serve(app) as server:
        response = await server.fetch("/users/1")
    assert {"name": "ada", "own": True, "read_only": "on"} == json_body(response)


async def test_readonly_get_without_autocommit_runs_in_one_read_only_transaction(
    pg_db: SessionManager,
) -> None:
    async with pg_db.scope() as session:
        session.add(User(id=1, name="ada"))
    app = tornado.web.Application([(r"/users/(\d+)", Users)], session_manager=pg_db)
    async with serve(app) as server:
        response = await server.fetch("/users/1")
    assert {"name": "ada", "own": False, "read_only": "on"} == json_body(response)
    await wait_until_released(pg_db)


class RecordsThePoolAtFinish(SessionMixin, tornado.web.RequestHandler):
    session_readonly = True
    at_finish: ClassVar[list[int]]

    async def get(self) -> None:
        user = await self.session.get(User, 1)
        self.write({"name": user.name if user else None})

    def finish(self, chunk: Any = None) -> Any:
        self.at_finish.append(checked_out(self.application.settings["session_manager"]))
        return super().finish(chunk)


async def pool_use_at_finish(db: SessionManager) -> list[int]:
    class Handler(RecordsThePoolAtFinish):
        at_finish: ClassVar[list[int]] = []

    app = tornado.web.Application([(r"/u", Handler)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/u")
    assert (200, {"name": "ada"}) == (response.code, json_body(response))
    return Handler.at_finish


async def test_readonly_request_returns_its_connection_before_the_response(
    ro_db: SessionManager,
) -> None:
    # Nothing to commit: the connection goes back to the pool before the response
    # is written (one connection less held while Tornado formats and sends it).
    assert [0] == await pool_use_at_finish(ro_db)


async def test_readonly_request_rolls_back_before_the_response(pg_db: SessionManager) -> None:
    async with pg_db.scope() as session:
        session.add(User(id=1, name="ada"))
    assert [0] == await pool_use_at_finish(pg_db)


async def test_writable_method_of_the_same_handler_runs_in_a_transaction(
    ro_db: SessionManager,
) -> None:
    app = tornado.web.Application([(r"/users/(\d+)", Users)], session_manager=ro_db)
    async with serve(app) as server:
        response = await server.fetch("/users/2", "POST")
    assert (201, 1) == (response.code, await count_users(ro_db, "user2"))


async def test_readonly_request_refuses_an_orm_write(
    ro_db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    app = tornado.web.Application([(r"/w", OrmWriteInGet)], session_manager=ro_db)
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        async with serve(app) as server:
            response = await server.fetch("/w")
    assert (500, 0) == (response.code, await count_users(ro_db, "sneaky"))
    assert [ReadOnlyScopeError] == [type(r.exc_info[1]) for r in caplog.records if r.exc_info]


async def logged_errors(
    db: SessionManager, caplog: pytest.LogCaptureFixture, handler: type, method: str = "GET"
) -> tuple[int, list[BaseException]]:
    """The response code of a request to ``handler`` and the errors Tornado logged for it."""
    app = tornado.web.Application([(r"/w", handler)], session_manager=db)
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        async with serve(app) as server:
            response = await server.fetch("/w", method)
    await wait_until_released(db)
    return response.code, [r.exc_info[1] for r in caplog.records if r.exc_info]


SETTING_IS_TRUE = (
    "The request's scope is readonly because {handler}.session_readonly is True. To write "
    "in this request, leave 'GET' out of session_readonly (a db.scope() inside the handler "
    "joins the readonly scope and fails alike; db.scope(independent=True) commits on its "
    "own, whatever the response)."
)


@pytest.mark.parametrize(
    ("handler", "because"),
    [
        (OrmWriteInGet, "is True"),
        (OrmWriteInGetOfASet, "includes 'GET'"),
        (WritableScopeInGet, "is True"),
        (UnflushedWriteInGet, "is True"),
    ],
)
async def test_readonly_error_of_the_request_scope_names_the_handler_setting(
    ro_db: SessionManager, caplog: pytest.LogCaptureFixture, handler: type, because: str
) -> None:
    # The error's own fix (a writable db.scope()) would join the request's readonly
    # scope and fail alike: the note says where the readonly came from.
    code, logged = await logged_errors(ro_db, caplog, handler)
    assert (500, [ReadOnlyScopeError]) == (code, [type(e) for e in logged])
    expected = SETTING_IS_TRUE.format(handler=handler.__qualname__).replace("is True", because)
    assert [expected] == logged[0].__notes__
    assert expected in caplog.text  # in the logged traceback too
    assert 0 == await count_users(ro_db, "sneaky")


async def test_readonly_error_of_a_scope_the_handler_opened_has_no_note(
    ro_db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    code, logged = await logged_errors(ro_db, caplog, OwnReadonlyScopeInPost, "POST")
    assert (500, [ReadOnlyScopeError]) == (code, [type(e) for e in logged])
    assert "own" == getattr(logged[0], "scope_name", None)
    assert not hasattr(logged[0], "__notes__")


async def test_readonly_request_cannot_persist_a_core_write(
    ro_db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    app = tornado.web.Application([(r"/w", CoreWriteInGet)], session_manager=ro_db)
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        async with serve(app) as server:
            response = await server.fetch("/w")
    assert (500, 0) == (response.code, await count_users(ro_db, "sneaky"))
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert "read-only transaction" in str(logged[0])


async def test_readonly_scope_outside_tornado_refuses_ddl(ro_db: SessionManager) -> None:
    async with ro_db.scope(readonly=True) as session:
        with pytest.raises(Exception, match="read-only transaction"):
            await session.execute(text("CREATE TABLE never_created (x int)"))
    async with ro_db.engine.connect() as conn:
        assert None is await conn.scalar(text("SELECT to_regclass('never_created')"))


async def test_readonly_autocommit_needs_read_committed(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="READ COMMITTED"):
        SessionManager(postgres_url, readonly_autocommit=True, isolation_level="SERIALIZABLE")


async def test_readonly_autocommit_is_refused_on_sqlite(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="postgresql"):
        SessionManager(f"sqlite+aiosqlite:///{tmp_path}/x.db", readonly_autocommit=True)


def test_importing_tasksession_does_not_import_tornado() -> None:
    code = "import sys, tasksession; print('tornado' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "False" == result.stdout.strip()
