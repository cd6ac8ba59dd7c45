"""SessionMixin over real HTTP (HTTPServer on a loopback port, a real client) on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import anyio
import pytest
import tornado.web
from sqlalchemy import event, text
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tasksession import SessionManager
from tasksession.tornado import MissingSessionManagerError, SessionMixin

from .models import User
from .tornado_helpers import checked_out, count_users, json_body, serve, wait_until_released

pytestmark = pytest.mark.anyio

# A table whose unique constraint is checked only at COMMIT.
DEFERRED_DDL = (
    "CREATE TABLE tornado_codes (id serial PRIMARY KEY, code text NOT NULL, "
    "CONSTRAINT tornado_codes_code_key UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)"
)


@pytest.fixture
async def db(pg_db: SessionManager) -> SessionManager:
    async with pg_db.engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS tornado_codes"))
        await conn.execute(text(DEFERRED_DDL))
    return pg_db


async def count_codes(db: SessionManager) -> int:
    async with db.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM tornado_codes")) or 0)


class Base(SessionMixin, tornado.web.RequestHandler):
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # The application's own error page: it must still be used for a failed commit.
        self.finish({"error": status_code, "page": "custom"})


class AddUser(Base):
    async def post(self, name: str) -> None:
        self.session.add(User(name=name))
        self.set_status(201)
        self.write({"name": name})


class AddUserFinishItself(Base):
    async def post(self, name: str) -> None:
        self.session.add(User(name=name))
        self.set_status(201)
        await self.finish({"name": name, "finished": "explicitly"})


class DuplicateCode(Base):
    async def post(self) -> None:
        await self.session.execute(text("INSERT INTO tornado_codes (code) VALUES ('x'), ('x')"))
        self.write({"inserted": 2})  # the duplicate is found only at COMMIT


class WriteThenStatus(Base):
    async def post(self, status: str) -> None:
        self.session.add(User(name=f"status-{status}"))
        await self.session.flush()
        self.set_status(int(status))
        self.write({"status": status})


class WriteThenSendError(Base):
    async def post(self) -> None:
        self.session.add(User(name="send-error"))
        await self.session.flush()
        self.send_error(409)


class WriteThenHTTPError(Base):
    async def post(self) -> None:
        self.session.add(User(name="http-error"))
        await self.session.flush()
        raise tornado.web.HTTPError(422)


class WriteThenRaise(Base):
    async def post(self) -> None:
        self.session.add(User(name="raised"))
        await self.session.flush()
        raise ValueError("handler bug")


class NoSession(Base):
    observed: ClassVar[dict[str, Any]] = {}

    async def get(self) -> None:
        stats = self.settings["session_manager"].statistics()
        NoSession.observed = {"open_sessions": stats.open_sessions, "out": stats.pool_checked_out}
        self.write({"ok": True})


class PrepareWithoutSuper(Base):
    async def prepare(self) -> None:  # does not call super().prepare()
        self.session.add(User(name="from-prepare"))
        await self.session.flush()
        raise tornado.web.HTTPError(403)


class OnlyGet(Base):
    SUPPORTED_METHODS = ("GET",)  # type: ignore[assignment]

    async def get(self) -> None:
        self.write("never reached by POST")


async def test_commit_happens_before_the_first_byte_and_the_row_is_visible_on_arrival(
    db: SessionManager,
) -> None:
    order: list[str] = []

    class Recording(AddUser):
        def flush(self, include_footers: bool = False) -> Any:
            order.append("first byte" if not self._headers_written else "more bytes")
            return super().flush(include_footers)

    def on_commit(conn: Any) -> None:
        order.append("commit")

    event.listen(db.engine.sync_engine, "commit", on_commit)
    app = tornado.web.Application([(r"/users/(\w+)", Recording)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/users/ada", "POST")
        assert 1 == await count_users(db, "ada")  # the moment the response arrived
    assert 201 == response.code
    assert ["commit", "first byte"] == order


async def test_handler_that_finishes_itself_commits_before_its_response(db: SessionManager) -> None:
    order: list[str] = []

    class Recording(AddUserFinishItself):
        def flush(self, include_footers: bool = False) -> Any:
            order.append("first byte")
            return super().flush(include_footers)

    event.listen(db.engine.sync_engine, "commit", lambda conn: order.append("commit"))
    app = tornado.web.Application([(r"/users/(\w+)", Recording)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/users/grace", "POST")
        assert 1 == await count_users(db, "grace")
    assert (201, "explicitly") == (response.code, json_body(response)["finished"])
    assert ["commit", "first byte"] == order


async def test_deferred_constraint_failing_at_commit_answers_500_and_persists_nothing(
    db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    app = tornado.web.Application([(r"/codes", DuplicateCode)], session_manager=db)
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        async with serve(app) as server:
            response = await server.fetch("/codes", "POST")
    assert 500 == response.code
    assert {"error": 500, "page": "custom"} == json_body(response)  # through write_error
    assert 0 == await count_codes(db)
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert ["IntegrityError"] == [type(e).__name__ for e in logged]  # logged once
    await wait_until_released(db)


async def test_deferred_constraint_failing_under_explicit_finish_answers_500(
    db: SessionManager,
) -> None:
    outcome: list[str] = []

    class FinishesItself(Base):
        async def post(self) -> None:
            await self.session.execute(text("INSERT INTO tornado_codes (code) VALUES ('y'), ('y')"))
            try:
                await self.finish({"inserted": 2})
            except Exception as error:
                outcome.append(type(error).__name__)
                raise

    app = tornado.web.Application([(r"/codes", FinishesItself)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/codes", "POST")
    assert (500, 0) == (response.code, await count_codes(db))
    assert ["IntegrityError"] == outcome  # the awaited finish() told the handler
    await wait_until_released(db)


@pytest.mark.parametrize("status", ["400", "404", "409", "503"])
async def test_status_of_400_or_more_rolls_back(db: SessionManager, status: str) -> None:
    app = tornado.web.Application([(r"/s/(\d+)", WriteThenStatus)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch(f"/s/{status}", "POST")
    assert int(status) == response.code
    assert 0 == await count_users(db)
    await wait_until_released(db)


@pytest.mark.parametrize(
    ("handler", "code"),
    [(WriteThenSendError, 409), (WriteThenHTTPError, 422), (WriteThenRaise, 500)],
)
async def test_send_error_http_error_and_exception_roll_back(
    db: SessionManager, handler: type[Base], code: int
) -> None:
    app = tornado.web.Application([(r"/x", handler)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/x", "POST")
    assert (code, "custom") == (response.code, json_body(response)["page"])
    assert 0 == await count_users(db)
    await wait_until_released(db)


async def test_client_disconnect_rolls_back_and_returns_the_connection(db: SessionManager) -> None:
    reached = asyncio.Event()
    cancelled: list[bool] = []

    class Hangs(Base):
        async def post(self) -> None:
            self.session.add(User(name="abandoned"))
            await self.session.flush()  # holds a connection and a transaction now
            reached.set()
            try:
                await asyncio.Event().wait()  # awaiting something else entirely
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    app = tornado.web.Application([(r"/hang", Hangs)], session_manager=db)
    async with serve(app) as server:
        request = b"POST /hang HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        _, writer = await server.open_raw(request)
        with anyio.fail_after(10):
            await reached.wait()
        assert 1 == checked_out(db)
        writer.close()
        await wait_until_released(db)
    assert [True] == cancelled
    assert 0 == await count_users(db, "abandoned")


async def test_client_disconnect_without_cancelling_closes_the_scope_when_idle(
    db: SessionManager,
) -> None:
    reached = asyncio.Event()
    release = asyncio.Event()
    after: list[str] = []

    class Hangs(Base):
        cancel_on_disconnect = False

        async def post(self) -> None:
            self.session.add(User(name="abandoned"))
            await self.session.flush()
            reached.set()
            await release.wait()  # not cancelled: the handler runs on
            try:
                await self.session.execute(text("SELECT 1"))
            except Exception as error:
                after.append(type(error).__name__)
                raise

    app = tornado.web.Application([(r"/hang", Hangs)], session_manager=db)
    async with serve(app) as server:
        request = b"POST /hang HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        _, writer = await server.open_raw(request)
        with anyio.fail_after(10):
            await reached.wait()
        writer.close()
        await wait_until_released(db)  # while the handler is still waiting
        assert 0 == await count_users(db, "abandoned")
        release.set()
        with anyio.fail_after(10):
            while not after:  # noqa: ASYNC110 - bounded polling of the handler's progress
                await anyio.sleep(0.01)
    assert ["ScopeClosedError"] == after


async def test_handler_that_never_uses_the_session_checks_out_nothing(db: SessionManager) -> None:
    app = tornado.web.Application([(r"/plain", NoSession)], session_manager=db)
    before = db.statistics()
    async with serve(app) as server:
        response = await server.fetch("/plain")
    after = db.statistics()
    assert 200 == response.code
    assert {"open_sessions": 0, "out": 0} == NoSession.observed
    assert (before.commits, before.rollbacks) == (after.commits, after.rollbacks)
    assert before.scopes_entered + 1 == after.scopes_entered


async def test_200_concurrent_requests_on_a_pool_of_5_complete(postgres_url: str) -> None:
    db = SessionManager(postgres_url, pool_size=5, max_overflow=0, pool_timeout=20)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM users"))
        app = tornado.web.Application([(r"/users/(\w+)", AddUser)], session_manager=db)
        async with serve(app, max_clients=200) as server:
            with anyio.fail_after(60):
                responses = await asyncio.gather(
                    *(server.fetch(f"/users/u{i}", "POST") for i in range(200))
                )
        assert [201] * 200 == [r.code for r in responses]
        assert 200 == await count_users(db)
        await wait_until_released(db)
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM users"))
        await db.dispose()


async def test_scope_is_closed_when_prepare_fails_without_calling_super(db: SessionManager) -> None:
    app = tornado.web.Application([(r"/p", PrepareWithoutSuper)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/p", "POST")
    assert 403 == response.code
    assert 0 == await count_users(db)
    await wait_until_released(db)


async def test_scope_is_closed_when_prepare_never_runs(db: SessionManager) -> None:
    app = tornado.web.Application([(r"/only-get", OnlyGet)], session_manager=db)
    before = db.statistics().scopes_entered
    async with serve(app) as server:
        response = await server.fetch("/only-get", "POST")
    assert 405 == response.code
    assert before + 1 == db.statistics().scopes_entered
    await wait_until_released(db)


async def test_scope_is_named_after_method_and_route(db: SessionManager) -> None:
    names: list[str] = []

    class Named(Base):
        async def get(self, ident: str) -> None:
            names.extend(info.name for info in db.active_scopes())
            self.write("ok")

    app = tornado.web.Application([(r"/things/([0-9]+)", Named)], session_manager=db)
    async with serve(app) as server:
        await server.fetch("/things/7")
    assert ["GET /things/([0-9]+)"] == names


async def test_db_session_in_the_handler_is_self_session(db: SessionManager) -> None:
    same: list[bool] = []

    class Both(Base):
        async def get(self) -> None:
            same.append(db.session is self.session)

    app = tornado.web.Application([(r"/both", Both)], session_manager=db)
    async with serve(app) as server:
        await server.fetch("/both")
    assert [True] == same


async def test_manager_as_class_attribute(db: SessionManager) -> None:
    class WithAttribute(AddUser):
        session_manager = db

    app = tornado.web.Application([(r"/users/(\w+)", WithAttribute)])
    async with serve(app) as server:
        response = await server.fetch("/users/linus", "POST")
    assert (201, 1) == (response.code, await count_users(db, "linus"))


async def test_missing_manager_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    app = tornado.web.Application([(r"/users/(\w+)", AddUser), (r"/plain", NoSessionNoManager)])
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        async with serve(app) as server:
            failing = await server.fetch("/users/x", "POST")
            plain = await server.fetch("/plain")
    assert (500, 200) == (failing.code, plain.code)
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [MissingSessionManagerError] == [type(e) for e in errors]
    assert "session_manager=db" in str(errors[0])


class NoSessionNoManager(SessionMixin, tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("fine without a database")


async def test_streamed_response_commits_at_finish(db: SessionManager) -> None:
    class Streams(Base):
        async def get(self) -> None:
            self.write("part one;")
            await self.flush()
            self.session.add(User(name="streamed"))
            self.write("part two")

    app = tornado.web.Application([(r"/stream", Streams)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/stream")
        assert 1 == await count_users(db, "streamed")
    assert (200, b"part one;part two") == (response.code, response.body)


async def test_streamed_response_whose_commit_fails_aborts_the_connection(
    db: SessionManager,
) -> None:
    class Streams(Base):
        async def get(self) -> None:
            self.write("part one;")
            await self.flush()
            await self.session.execute(text("INSERT INTO tornado_codes (code) VALUES ('z'), ('z')"))
            self.write("part two")

    app = tornado.web.Application([(r"/stream", Streams)], session_manager=db)
    async with serve(app) as server:
        reader, writer = await server.open_raw(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        with anyio.fail_after(10):
            received = await reader.read()  # until the server closes the connection
        writer.close()
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert not received.endswith(b"0\r\n\r\n")  # no terminating chunk: visibly incomplete
    assert b"part two" not in received
    assert 0 == await count_codes(db)
    await wait_until_released(db)


async def test_streamed_response_whose_handler_fails_aborts_the_connection(
    db: SessionManager,
) -> None:
    class Streams(Base):
        async def get(self) -> None:
            self.write("part one;")
            await self.flush()
            self.session.add(User(name="half-streamed"))
            await self.session.flush()
            raise ValueError("bug after the headers went out")

    app = tornado.web.Application([(r"/stream", Streams)], session_manager=db)
    async with serve(app) as server:
        client = AsyncHTTPClient(force_instance=True)
        try:
            with pytest.raises(HTTPClientError) as caught, anyio.fail_after(10):
                await client.fetch(server.base + "/stream")
        finally:
            client.close()
    assert 599 == caught.value.code  # the connection closed: no response at all
    assert 0 == await count_users(db, "half-streamed")
    await wait_until_released(db)


async def test_work_after_an_explicit_finish_is_rolled_back_and_warned_about(
    db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    class Late(Base):
        async def post(self) -> None:
            await self.finish("done")  # nothing to commit yet: sent at once
            self.session.add(User(name="too-late"))
            await self.session.flush()

    app = tornado.web.Application([(r"/late", Late)], session_manager=db)
    with caplog.at_level(logging.WARNING, logger="tasksession.tornado"):
        async with serve(app) as server:
            response = await server.fetch("/late", "POST")
        await wait_until_released(db)
    assert 200 == response.code
    assert 0 == await count_users(db, "too-late")
    assert any("after the response was sent" in r.getMessage() for r in caplog.records)


async def test_session_after_the_response_was_decided_raises_scope_closed(
    db: SessionManager,
) -> None:
    errors: list[str] = []

    class AfterCommit(Base):
        async def post(self) -> None:
            self.session.add(User(name="kept"))
            await self.finish("ok")  # commits, then sends
            try:
                self.session.add(User(name="lost"))
            except Exception as error:
                errors.append(type(error).__name__)

    app = tornado.web.Application([(r"/a", AfterCommit)], session_manager=db)
    async with serve(app) as server:
        await server.fetch("/a", "POST")
    assert ["ScopeClosedError"] == errors
    assert (1, 0) == (await count_users(db, "kept"), await count_users(db, "lost"))


async def test_error_raised_by_finish_itself_still_answers_500(db: SessionManager) -> None:
    class BodyWith204(Base):
        async def post(self) -> None:
            self.session.add(User(name="no-content"))
            self.set_status(204)
            self.write("a body Tornado refuses to send with a 204")

    app = tornado.web.Application([(r"/x", BodyWith204)], session_manager=db)
    async with serve(app) as server:
        response = await server.fetch("/x", "POST")
    assert 500 == response.code
    await wait_until_released(db)
