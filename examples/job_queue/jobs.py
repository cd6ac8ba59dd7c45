"""The job queue: schema, enqueueing, and the worker step.

A job is a row of ``jobs``. A worker step claims the oldest pending job with
``SELECT ... FOR UPDATE SKIP LOCKED`` (concurrent workers skip each other's
claimed rows instead of waiting), runs the handler, records its outcome and
marks the job done, **all in the step's one transaction**. So:

* a worker that crashes, is cancelled or loses its connection mid-job rolls
  back: the job was never marked done, its row lock is released, and another
  worker (or the restarted one) picks it up: **no job is lost**;
* the outcome and the ``done`` mark commit together or not at all:
  **no job is completed twice**, even when a COMMIT's fate is unknown (the
  database, not the worker, decides, and a job whose COMMIT went through is
  not pending any more).

The handler must keep its effects inside the session (or be idempotent): a
rolled-back attempt is repeated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Job",
    "Outcome",
    "create_schema",
    "enqueue",
    "job_step",
    "pending_count",
    "process",
]


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    # Only pending jobs are searched; keep that index small.
    __table_args__ = (Index("jobs_pending", "id", postgresql_where=text("status = 'pending'")),)

    id: Mapped[int] = mapped_column(primary_key=True)
    payload: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(10), default="pending")
    done_at: Mapped[datetime | None] = mapped_column(default=None)


class Outcome(Base):
    """What a job produced. Deliberately no unique constraint on ``job_id``:
    a job completed twice would show up as two rows."""

    __tablename__ = "job_outcomes"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    output: Mapped[str] = mapped_column(String(200))


Handler = Callable[[AsyncSession, Job], Awaitable[str]]


async def create_schema(engine: AsyncEngine) -> None:
    """Create the queue's tables (dropping old ones)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


async def enqueue(session: AsyncSession, payloads: Sequence[str]) -> list[int]:
    """Add jobs; they become visible to workers when ``session``'s scope commits."""
    jobs = [Job(payload=payload) for payload in payloads]
    session.add_all(jobs)
    await session.flush()
    return [job.id for job in jobs]


async def pending_count(session: AsyncSession) -> int:
    """Jobs not (committed as) done yet."""
    count = await session.scalar(select(func.count()).where(Job.status == "pending"))
    return int(count or 0)


async def process(session: AsyncSession, job: Job) -> str:
    """The example handler: ``sleep:<seconds> ...`` sleeps in the database; the output
    is the payload in capitals."""
    if job.payload.startswith("sleep:"):
        seconds = float(job.payload.removeprefix("sleep:").split()[0])
        await session.execute(select(func.pg_sleep(seconds)))
    return job.payload.upper()


_CLAIM = (
    select(Job)
    .where(Job.status == "pending")
    .order_by(Job.id)
    .limit(1)
    .with_for_update(skip_locked=True)
)


def job_step(handler: Handler = process) -> Callable[[AsyncSession], Awaitable[bool]]:
    """A ``run_worker`` step that runs one job through ``handler``."""

    async def step(session: AsyncSession) -> bool:
        job = await session.scalar(_CLAIM)
        if job is None:
            return False  # nothing claimable: the worker waits idle_delay
        output = await handler(session, job)
        session.add(Outcome(job_id=job.id, output=output))
        job.status = "done"
        job.done_at = func.now()
        return True  # committed by run_worker when the step returns

    return step
