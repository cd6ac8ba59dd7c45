"""``python -m examples.job_queue URL [--concurrency N] [--enqueue N] [--create]``: run a worker.

Stops gracefully on SIGINT/SIGTERM: the running jobs finish and commit, then
the program exits. Killed harder than that, it loses nothing either: the jobs
it was running roll back and another worker takes them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import anyio

from tasksession import RetryPolicy, SessionManager
from tasksession.workers import run_worker

from .jobs import create_schema, enqueue, job_step


async def main(url: str, concurrency: int, jobs: int, create: bool) -> None:
    db = SessionManager(url, pool_size=concurrency, connect_args=_app_name())
    try:
        if create:
            await create_schema(db.engine)
        if jobs:
            async with db.scope() as session:
                await enqueue(session, [f"job {n}" for n in range(jobs)])
        stop = anyio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"worker ready: concurrency={concurrency}", flush=True)
        await run_worker(
            db,
            job_step(),
            concurrency=concurrency,
            idle_delay=0.2,
            retry=RetryPolicy(attempts=5),
            stop=stop,
            name="job-queue",
        )
    finally:
        await db.dispose()


def _app_name() -> dict[str, dict[str, str]]:
    return {"server_settings": {"application_name": "job-queue-worker"}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="postgresql+asyncpg://user@host/db")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--enqueue", type=int, default=0, metavar="N", help="add N jobs first")
    parser.add_argument("--create", action="store_true", help="(re)create the tables first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(args.url, args.concurrency, args.enqueue, args.create))
