"""Worker throughput (issue 6 target): ``run_worker`` vs a hand-written loop, same queue.

Both variants drain the same PostgreSQL job queue (``FOR UPDATE SKIP LOCKED``,
perf-anchors.md "Worker loop") with 10 concurrent workers on a pool of 10:
each job is ``BEGIN``, claim one pending row, mark it done, ``COMMIT`` (4 round
trips) through the ORM.

* ``hand-written``: 10 tasks, each ``async with AsyncSession(engine)`` and
  ``session.begin()`` per job (the reference);
* ``run_worker``: ``run_worker(db, step, concurrency=10)`` with a default
  ``RetryPolicy``: target ≥ 0.95x the hand-written jobs/s.

The queue is refilled and VACUUMed before every run; runs alternate in an
order rotated per round and ratios are paired per round.
``python -m benchmarks workers [--quick]``.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

import anyio
from sqlalchemy import Integer, String, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, mapped_column

from tasksession import SessionManager
from tasksession.workers import run_worker

from ._db import Base, postgres_url, recreate
from ._harness import Args, Table, Target, paired_rows, rotations

WORKERS = 10


class BenchJob(Base):
    __tablename__ = "bench_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(10))
    payload: Mapped[str] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(Integer)


CLAIM = (
    select(BenchJob)
    .where(BenchJob.status == "pending")
    .order_by(BenchJob.id)
    .limit(1)
    .with_for_update(skip_locked=True)
)


async def refill(admin: AsyncEngine, jobs: int) -> None:
    async with admin.connect() as conn:
        await conn.execute(text("TRUNCATE bench_jobs"))
        await conn.execute(
            text(
                "INSERT INTO bench_jobs SELECT n, 'pending', 'payload ' || n, 0 "
                "FROM generate_series(1, :jobs) AS n"
            ),
            {"jobs": jobs},
        )
        await conn.execute(text("VACUUM ANALYZE bench_jobs"))


async def hand_written(engine: AsyncEngine) -> None:
    async def worker() -> None:
        while True:
            async with (
                AsyncSession(engine, expire_on_commit=False) as session,
                session.begin(),
            ):
                job = await session.scalar(CLAIM)
                if job is None:
                    return
                job.status = "done"
                job.attempts += 1

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def with_run_worker(db: SessionManager) -> None:
    stop = anyio.Event()

    async def step(session: AsyncSession) -> bool:
        job = await session.scalar(CLAIM)
        if job is None:
            stop.set()  # drained: the other loops finish their step and return
            return False
        job.status = "done"
        job.attempts += 1
        return True

    await run_worker(db, step, concurrency=WORKERS, stop=stop)


async def main(args: Args) -> None:
    rounds = 3 if args.quick else max(args.rounds, 5)
    jobs = 1000 if args.quick else 3000
    with postgres_url() as url:
        admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
        engine = create_async_engine(url, pool_size=WORKERS, max_overflow=0)
        db = SessionManager(url, pool_size=WORKERS, max_overflow=0)
        try:
            await recreate(admin, BenchJob)
            async with admin.connect() as conn:
                await conn.execute(
                    text(
                        "CREATE INDEX bench_jobs_pending ON bench_jobs (id) "
                        "WHERE status = 'pending'"
                    )
                )
            variants: dict[str, Callable[[], Awaitable[None]]] = {
                "hand-written AsyncSession per job": lambda: hand_written(engine),
                "run_worker": lambda: with_run_worker(db),
            }
            table = await measure(variants, admin, jobs, rounds)
        finally:
            await db.dispose()
            await engine.dispose()
            await admin.dispose()
    table.print(
        f"worker loop: {WORKERS} workers drain {jobs} jobs, {rounds} rounds",
        targets={"run_worker": Target("ratio", ">=", 0.95)},
    )


async def measure(
    variants: dict[str, Callable[[], Awaitable[None]]],
    admin: AsyncEngine,
    jobs: int,
    rounds: int,
) -> Table:
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: connections, statement caches
        await refill(admin, 200)
        await variants[name]()
    for order in rotations(len(names), rounds):
        for index in order:
            name = names[index]
            await refill(admin, jobs)
            gc.collect()
            cpu_start = time.process_time()
            wall_start = time.perf_counter()
            await variants[name]()
            wall = time.perf_counter() - wall_start
            cpu_used = time.process_time() - cpu_start
            async with admin.connect() as conn:
                left = await conn.scalar(
                    text("SELECT count(*) FROM bench_jobs WHERE status <> 'done'")
                )
            assert left == 0, f"{name} left {left} jobs"
            rates[name].append(jobs / wall)
            cpu[name].append(cpu_used / jobs * 1e6)
    reference = names[0]
    rows = paired_rows(names, rates, cpu, reference)
    table = Table(rows, reference, "throughput")  # this kind prints the jobs/s and CPU columns
    table.notes.append(
        "ops/s = jobs/s; ratio = jobs/s(variant) / jobs/s(reference), paired per round; "
        "CPU ratio = client CPU µs/job(variant) / (reference)"
    )
    return table
