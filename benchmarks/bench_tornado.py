"""Tornado request handlers under HTTP load (issue 5 targets), on PostgreSQL through asyncpg.

One server process (started here, on a loopback port) serves every variant;
``wrk`` (Debian package ``wrk``) loads it from a separate process, one variant
after the other, in an order rotated per round. Every request is a GET doing one
primary-key lookup of a random row:

* ``hand-written``: ``AsyncSession`` opened in ``prepare()``, committed and closed
  by a task scheduled from ``on_finish()`` (the usual recipe; the reference);
* ``SessionMixin``: target ≥ 0.97x the hand-written req/s;
* ``SessionMixin readonly``: ``session_readonly = True`` on a manager with
  ``readonly_autocommit=True``: target ≥ 1.3x;
* ``AsyncSession on AUTOCOMMIT, no manager``: the hand-written read-only handler
  (``async with AsyncSession(autocommit_engine)`` around the ``get``), printed as the
  floor any read-only handler built on SQLAlchemy's ``AsyncSession`` starts from;
* ``raw asyncpg``: ``pool.fetchrow`` (the ceiling), and ``hello`` (no database).

Every pool holds 10 connections and no overflow (``max_overflow=0``, as in
perf-anchors.md): with overflow, 50 clients on a pool of 10 make QueuePool open
and close overflow connections during the runs (10-27 new connections per
4-second run were counted), which lands in whichever variant happens to run.

Also reported: server CPU µs per request (from /proc, the server process only),
and the part of it spent in CPython's garbage collector (``gc.callbacks`` in the
server). Collections are set off by swings of the live-object count, not by
garbage: a read-only request does all its work between two round trips, so its
objects come and go in larger bursts than a three-round-trip request's, and the
collector's share differs per variant and from run to run (measured 16-38 µs per
read-only request, under 4 µs per hand-written one); it is printed so that a
ratio moved by it can be told from one moved by the code.
``python -m benchmarks tornado [--quick]``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from ._db import Base, ItemColumns, postgres_url, recreate
from ._harness import Args, Table, Target, paired_rows, rotations

ROWS = 10_000
CONNECTIONS = 50
POOL_SIZE = 10

# path -> variant name, in table order (the first is the reference)
VARIANTS = {
    "/hand/": "hand-written prepare/on_finish",
    "/mixin/": "SessionMixin",
    "/mixin-ro/": "SessionMixin readonly",
    "/plain-ro/": "AsyncSession on AUTOCOMMIT, no manager",
    "/raw/": "raw asyncpg (ceiling)",
    "/hello/": "hello (no database)",
}
REFERENCE = VARIANTS["/hand/"]

WRK_SCRIPT = f"""
math.randomseed(os.time())
request = function()
  return wrk.format("GET", wrk.path .. math.random(0, {ROWS - 1}))
end
"""


# -- the server (runs in its own process) ---------------------------------------------


class Item(ItemColumns, Base):
    __tablename__ = "bench_tornado_items"


def serve(url: str, port: int) -> None:
    """Serve every variant on 127.0.0.1:``port`` until killed."""
    import asyncpg
    import tornado.web
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from tasksession import SessionManager
    from tasksession.tornado import SessionMixin

    pool = {"pool_size": POOL_SIZE, "max_overflow": 0}
    db = SessionManager(url, readonly_autocommit=True, **pool)
    engine = db.engine
    autocommit_engine = create_async_engine(url, isolation_level="AUTOCOMMIT", **pool)
    background: set[asyncio.Task[None]] = set()

    class HandWritten(tornado.web.RequestHandler):
        session: AsyncSession | None = None

        async def prepare(self) -> None:
            self.session = AsyncSession(engine, expire_on_commit=False)

        async def get(self, ident: str) -> None:
            assert self.session is not None
            item = await self.session.get(Item, int(ident))
            assert item is not None
            self.write({"id": item.id, "name": item.name})

        def on_finish(self) -> None:
            # on_finish() is synchronous: the commit and close must be scheduled.
            session = self.session
            if session is not None:
                task = asyncio.ensure_future(self._end(session))
                background.add(task)
                task.add_done_callback(background.discard)

        @staticmethod
        async def _end(session: AsyncSession) -> None:
            try:
                await session.commit()
            finally:
                await session.close()

    class Mixin(SessionMixin, tornado.web.RequestHandler):
        async def get(self, ident: str) -> None:
            item = await self.session.get(Item, int(ident))
            assert item is not None
            self.write({"id": item.id, "name": item.name})

    class MixinReadonly(Mixin):
        session_readonly = True

    class PlainReadonly(tornado.web.RequestHandler):
        async def get(self, ident: str) -> None:
            async with AsyncSession(autocommit_engine, expire_on_commit=False) as session:
                item = await session.get(Item, int(ident))
            assert item is not None
            self.write({"id": item.id, "name": item.name})

    class Raw(tornado.web.RequestHandler):
        pool: Any = None

        async def get(self, ident: str) -> None:
            row = await Raw.pool.fetchrow(
                "SELECT id, name FROM bench_tornado_items WHERE id = $1", int(ident)
            )
            self.write({"id": row["id"], "name": row["name"]})

    class Hello(tornado.web.RequestHandler):
        def get(self, ident: str) -> None:
            self.write({"id": int(ident), "name": "hello"})

    gc_seconds = [0.0, 0.0]  # total so far, start of the collection in progress

    def time_collections(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_seconds[1] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_seconds[1]

    gc.callbacks.append(time_collections)

    class GcSeconds(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write(repr(gc_seconds[0]))

    async def run() -> None:
        raw_url = url.replace("postgresql+asyncpg://", "postgresql://")
        Raw.pool = await asyncpg.create_pool(raw_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
        app = tornado.web.Application(
            [
                (r"/hand/([0-9]+)", HandWritten),
                (r"/mixin/([0-9]+)", Mixin),
                (r"/mixin-ro/([0-9]+)", MixinReadonly),
                (r"/plain-ro/([0-9]+)", PlainReadonly),
                (r"/raw/([0-9]+)", Raw),
                (r"/hello/([0-9]+)", Hello),
                (r"/gc-seconds", GcSeconds),
            ],
            session_manager=db,
            log_function=lambda handler: None,
        )
        app.listen(port, address="127.0.0.1", backlog=1024)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


# -- the load generator (this process) ---------------------------------------------------


async def setup(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        await recreate(engine, Item, ROWS)
    finally:
        await engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gc_seconds(base: str) -> float:
    """The server's time in garbage collection so far."""
    with urllib.request.urlopen(base + "/gc-seconds", timeout=30) as response:
        return float(response.read())


def _wrk(url: str, script: str, seconds: int) -> tuple[int, float, int]:
    """Run wrk; return (requests completed, seconds, wrk timeouts)."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", script, url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match is None or "Non-2xx" in out or (errors and any(int(n) for n in errors.groups()[:3])):
        raise RuntimeError(f"wrk run failed or saw errors:\n{out}")
    duration = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    # A timeout is wrk giving up waiting (2 s) on an overloaded box, not a failed request.
    timeouts = int(errors.group(4)) if errors else 0
    return int(match.group(1)), duration, timeouts


def _load(
    url: str, rounds: int, seconds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]], int]:
    """Start the server process and run wrk against every variant, rotated per round.

    Returns req/s, server CPU µs/request and server GC µs/request per path and
    round, and wrk's timeout count.
    """
    paths = list(VARIANTS)
    rates: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, list[float]] = {p: [] for p in paths}
    collecting: dict[str, list[float]] = {p: [] for p in paths}
    total_timeouts = 0
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "random_id.lua")
        with open(script, "w") as file:
            file.write(WRK_SCRIPT)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_tornado", "--serve", url, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the benchmark server did not start")
            base = f"http://127.0.0.1:{port}"
            for path in paths:  # warm-up: connections, statement caches
                _wrk(base + path, script, 1)
            rng = random.Random(5)
            for order in rotations(len(paths), rounds):
                for path in (paths[index] for index in order):
                    gc_before = _gc_seconds(base)
                    cpu_before = _cpu_seconds(server.pid)
                    requests, duration, timeouts = _wrk(base + path, script, seconds)
                    used = _cpu_seconds(server.pid) - cpu_before
                    collected = _gc_seconds(base) - gc_before
                    total_timeouts += timeouts
                    rates[path].append(requests / duration)
                    cpu[path].append(used / requests * 1e6)
                    collecting[path].append(collected / requests * 1e6)
                    time.sleep(0.2 + rng.random() * 0.1)  # let the pool settle
        finally:
            server.kill()
            server.wait(timeout=30)
    return rates, cpu, collecting, total_timeouts


async def main(args: Args) -> None:
    if shutil.which("wrk") is None:
        print(
            "SKIPPED: the Tornado benchmark needs wrk (HTTP load from a separate process): "
            "apt-get install wrk"
        )
        return
    seconds = 2 if args.quick else max(3, round(args.seconds * 4))
    rounds = args.rounds
    with postgres_url() as url:
        await setup(url)
        rates, cpu, collecting, total_timeouts = await asyncio.to_thread(
            _load, url, rounds, seconds
        )
    rows = paired_rows(list(VARIANTS), rates, cpu, "/hand/")
    for row in rows:
        row.name = VARIANTS[row.name]
    # kind "throughput" makes the harness print the ops/s and CPU columns.
    table = Table(rows, REFERENCE, "throughput")
    table.notes.append(
        f"HTTP load: wrk -t2 -c{CONNECTIONS} -d{seconds}s per variant per round, {rounds} "
        f"rounds in rotated order, pool_size={POOL_SIZE} max_overflow=0; ops/s = requests/s"
    )
    table.notes.append("client CPU µs/op here = the server process's CPU per request")
    table.notes.append("µs/op column is 1e6 / req/s (throughput, not latency)")
    table.notes.append(
        "server CPU µs/request in garbage collection (median; included in the CPU column): "
        + ", ".join(f"{VARIANTS[p]} {statistics.median(collecting[p]):.1f}" for p in VARIANTS)
    )
    if total_timeouts:
        table.notes.append(f"wrk timeouts (>2 s waits on a loaded box): {total_timeouts}")
    table.print(
        "Tornado GET with one PK lookup",
        targets={
            "SessionMixin": Target("ratio", ">=", 0.97),
            "SessionMixin readonly": Target("ratio", ">=", 1.3),
        },
    )


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--serve":
    serve(sys.argv[2], int(sys.argv[3]))
