"""The notes app over real HTTP, on SQLite and on the test run's PostgreSQL.

Each test runs on a clean database through tasksession's pytest plugin: the
``tasksession_db`` fixture is the app's manager, isolated (every request's scope
runs in a SAVEPOINT of the test's transaction, rolled back at the end) and checked
for leaks. The tables are created once per database.
"""

# Assertions read `expected == actual`, as in the test suite (STYLE.md).
# ruff: noqa: SIM300

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from tasksession import SessionManager

from .app import Base, create_tables, make_app, make_manager

pytestmark = pytest.mark.anyio


class Client:
    def __init__(self, base: str) -> None:
        self.base = base
        self.http = AsyncHTTPClient(force_instance=True)

    async def call(self, method: str, path: str, body: Any = None) -> HTTPResponse:
        if isinstance(body, dict):
            body = json.dumps(body)
        with anyio.fail_after(10):
            return await self.http.fetch(
                self.base + path,
                method=method,
                body=body,
                raise_error=False,
                follow_redirects=False,
            )


@pytest.fixture(scope="module")
async def tasksession_manager(module_database_url: str) -> AsyncIterator[SessionManager]:
    """The app's manager, for the plugin to isolate in each test (tables created once)."""
    url = module_database_url
    manager = make_manager(url)
    async with manager.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await create_tables(manager)
    try:
        yield manager
    finally:
        await manager.dispose()


@pytest.fixture
async def client(tasksession_db: SessionManager) -> AsyncIterator[Client]:
    db = tasksession_db
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(db))
    server.add_sockets([sock])
    client = Client(f"http://127.0.0.1:{port}")
    try:
        yield client
    finally:
        client.http.close()
        server.stop()
        await server.close_all_connections()
        # A request's scope may still be ending (a 404's rollback runs after its
        # response was sent): wait until it has, or the leak check would report it.
        with anyio.fail_after(10):
            while db.active_scopes():  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def test_created_note_is_stored_when_201_arrives(
    client: Client, tasksession_db: SessionManager
) -> None:
    response = await client.call("POST", "/api/notes", {"title": "hello", "body": "world"})
    assert 201 == response.code
    async with tasksession_db.scope() as session:
        assert 1 == await session.scalar(text("SELECT count(*) FROM notes WHERE title = 'hello'"))
    note = json.loads(response.body)
    fetched = await client.call("GET", f"/api/notes/{note['id']}")
    assert note == json.loads(fetched.body)


async def test_duplicate_title_is_an_error_and_stores_nothing_more(client: Client) -> None:
    await client.call("POST", "/api/notes", {"title": "once"})
    response = await client.call("POST", "/api/notes", {"title": "once"})
    assert 500 == response.code
    assert {"error": "Internal Server Error", "status": 500} == json.loads(response.body)
    listing = json.loads((await client.call("GET", "/api/notes")).body)
    assert ["once"] == [n["title"] for n in listing["notes"]]


async def test_missing_title_is_400(client: Client) -> None:
    response = await client.call("POST", "/api/notes", {"body": "no title"})
    assert (400, "title is required") == (response.code, json.loads(response.body)["error"])


async def test_delete_then_404(client: Client) -> None:
    created = json.loads((await client.call("POST", "/api/notes", {"title": "gone"})).body)
    assert 204 == (await client.call("DELETE", f"/api/notes/{created['id']}")).code
    assert 404 == (await client.call("GET", f"/api/notes/{created['id']}")).code


async def test_html_form_adds_a_note_and_redirects(client: Client) -> None:
    response = await client.call("POST", "/", "title=from+form&body=html")
    assert (303, "/") == (response.code, response.headers["Location"])
    page = await client.call("GET", "/")
    assert b"<b>from form</b> html" in page.body
