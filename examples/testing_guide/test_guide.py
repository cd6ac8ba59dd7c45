"""Testing an application built on tasksession: the examples of docs/testing.md.

Every test asks for ``tasksession_db`` (tasksession's pytest plugin): the app's
manager, isolated for the test (what it commits is rolled back at the end, so each
test starts on empty tables) and checked for leaks.
"""

# Assertions read `expected == actual`, as in the test suite (STYLE.md).
# ruff: noqa: SIM300

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application

from tasksession import SessionManager
from tasksession.workers import run_worker

from .app import Note, NotesHandler, import_notes, mark_one_done, open_notes

pytestmark = pytest.mark.anyio


async def count_notes(db: SessionManager) -> int:
    async with db.scope() as session:
        return int(await session.scalar(select(func.count()).select_from(Note)) or 0)


# --8<-- [start:tornado]
async def test_a_handler_commits_before_it_answers(tasksession_db: SessionManager) -> None:
    server = HTTPServer(Application([("/notes", NotesHandler)]))
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(
            f"http://127.0.0.1:{port}/notes", method="POST", body="text=hello"
        )
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()
    assert 201 == response.code
    assert 1 == await count_notes(tasksession_db)  # committed (to the test's SAVEPOINT)


# --8<-- [end:tornado]


# --8<-- [start:task-group]
async def test_a_fan_out_stores_every_note(tasksession_db: SessionManager) -> None:
    await import_notes(["a", "b", "c"])  # three children, three units of work
    assert 3 == await count_notes(tasksession_db)


async def test_each_test_starts_empty(tasksession_db: SessionManager) -> None:
    assert 0 == await count_notes(tasksession_db)  # whatever ran before


# --8<-- [end:task-group]


# --8<-- [start:worker]
async def drain(db: SessionManager, concurrency: int = 1) -> None:
    """Run the worker until the queue is empty, then stop it."""
    stop = anyio.Event()

    async def step(session: AsyncSession) -> bool:
        found = await mark_one_done(session)
        if not found:
            stop.set()
        return found

    with anyio.fail_after(20):
        await run_worker(db, step, concurrency=concurrency, stop=stop, idle_delay=0.01)


async def test_a_worker_drains_the_queue(tasksession_db: SessionManager) -> None:
    await import_notes([f"job {n}" for n in range(5)])
    await drain(tasksession_db)
    assert 0 == await open_notes()


# --8<-- [end:worker]


# --8<-- [start:clone]
@pytest.mark.tasksession(mode="clone")
async def test_two_workers_skip_each_others_rows(tasksession_db: SessionManager) -> None:
    # Real concurrency (FOR UPDATE SKIP LOCKED between two transactions) needs a
    # database of the test's own: clone mode gives one, cloned from a template.
    await import_notes([f"job {n}" for n in range(20)])
    await drain(tasksession_db, concurrency=4)
    assert 0 == await open_notes()


# --8<-- [end:clone]
