"""WebSocketSessionMixin: a scope per open() and per on_message() call, over a real socket."""

from __future__ import annotations

from typing import ClassVar

import pytest
import tornado.web
import tornado.websocket
from sqlalchemy import func, select, text

from tasksession import SessionManager
from tasksession.tornado import WebSocketSessionMixin

from .models import User
from .tornado_helpers import serve, wait_until_released

pytestmark = pytest.mark.anyio


class Feed(WebSocketSessionMixin, tornado.websocket.WebSocketHandler):
    scope_names: ClassVar[list[str]] = []

    async def open(self) -> None:
        self.session.add(User(name="opened"))
        Feed.scope_names.append(self.settings["session_manager"].active_scopes()[0].name)

    async def on_message(self, message: str | bytes) -> None:
        assert isinstance(message, str)
        if message.startswith("fail:"):
            self.session.add(User(name=message))
            await self.session.flush()
            raise ValueError("message handler failed")
        self.session.add(User(name=message))
        await self.session.flush()
        count = await self.session.scalar(select(func.count()).select_from(User))
        await self.write_message(f"{message}:{count}")


async def names(db: SessionManager) -> list[str]:
    async with db.engine.connect() as conn:
        rows = await conn.scalars(text("SELECT name FROM users ORDER BY id"))
        return list(rows)


async def test_open_and_each_message_commit_in_scopes_of_their_own(pg_db: SessionManager) -> None:
    app = tornado.web.Application([(r"/ws", Feed)], session_manager=pg_db)
    async with serve(app) as server:
        conn = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{server.port}/ws")
        try:
            await conn.write_message("first")
            assert "first:2" == await conn.read_message()  # sees open()'s committed row
            await conn.write_message("second")
            assert "second:3" == await conn.read_message()
            # Messages are handled one after the other: "first" committed before "second" ran.
            assert ["opened", "first"] == (await names(pg_db))[:2]
        finally:
            conn.close()
    assert ["opened", "first", "second"] == await names(pg_db)
    assert ["WS /ws open"] == Feed.scope_names
    await wait_until_released(pg_db)


async def test_failing_message_is_rolled_back(pg_db: SessionManager) -> None:
    app = tornado.web.Application([(r"/ws", Feed)], session_manager=pg_db)
    async with serve(app) as server:
        conn = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{server.port}/ws")
        try:
            await conn.write_message("fail:this")
            assert None is await conn.read_message()  # Tornado closes the socket
        finally:
            conn.close()
    assert ["opened"] == await names(pg_db)
    await wait_until_released(pg_db)
