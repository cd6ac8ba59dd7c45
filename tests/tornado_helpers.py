"""Running Tornado applications on a loopback port inside anyio tests (asyncio backend)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application

from tasksession import SessionManager

from .helpers import checked_out as checked_out  # re-exported for the Tornado tests
from .helpers import count_users as count_users


class Server:
    """A running ``HTTPServer`` and a client for it."""

    def __init__(self, port: int, client: AsyncHTTPClient) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.client = client

    async def fetch(self, path: str, method: str = "GET", body: str | None = None) -> HTTPResponse:
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = ""
        with anyio.fail_after(20):
            return await self.client.fetch(
                self.base + path, method=method, body=body, raise_error=False
            )

    async def open_raw(self, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send ``request`` on a plain socket (for disconnects and incomplete responses)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        await writer.drain()
        return reader, writer


@asynccontextmanager
async def serve(app: Application, max_clients: int = 10) -> AsyncIterator[Server]:
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    client = AsyncHTTPClient(force_instance=True, max_clients=max_clients)
    try:
        yield Server(port, client)
    finally:
        client.close()
        server.stop()
        with anyio.fail_after(10):
            await server.close_all_connections()


async def wait_until_released(manager: SessionManager, within: float = 10) -> None:
    """Wait (bounded) until no scope is open and no connection is checked out."""
    with anyio.fail_after(within):
        # Bounded polling: the pool offers no event for "checked in".
        while manager.active_scopes() or checked_out(manager):  # noqa: ASYNC110
            await anyio.sleep(0.01)


def json_body(response: HTTPResponse) -> Any:
    import json

    assert response.body is not None
    return json.loads(response.body)
