"""Fault injection for the reliability suite: units of work, what each reported, the invariants.

Shared by ``tests/test_faults.py`` (the short, bounded form), ``tests/test_state_machine.py``
and ``benchmarks/bench_faults.py`` (the long form). Everything runs on real PostgreSQL;
faults (restarts, terminated and paused backends) only on a cluster the tests started.

A **unit** is one ``async with db.scope()`` (or one ``@db.transactional`` call) that
inserts one row of :class:`FaultRow` carrying the unit's unique id. The caller learns
how the unit ended from what the scope's exit did (see :func:`reported_outcome`):

* it exited normally, or a cancellation it re-raised carries
  ``tasksession_outcome == "committed"``: **committed**, its row must exist, once;
* it raised :class:`~tasksession.CommitOutcomeUnknownError`, or a cancellation carries
  ``tasksession_outcome == "unknown"``: **unknown**, counted apart (the row may exist);
* anything else raised (an error, a cancellation without that mark): **rolled back**,
  its row must not exist.

Where the scope offers its own record (``Scope.outcome``), it must say the same.

:func:`check_invariants` then compares the :class:`Ledger` with the database and the
manager: committed rows == units reported committed, no duplicates, no connection
checked out, no open scope, no backend idle in transaction, no unit that ended more
than :data:`HANG_SLACK` seconds after its deadline, no warning.

The scenario runners at the end (:func:`cancel_storm`, :func:`restart_under_load`,
:func:`terminate_storm`, :func:`pause_storm`) are seeded: the schedule of faults is
reproducible, the interleaving with the server is not (it is real I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from sqlalchemy import Float, Integer, MetaData, String, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from tasksession import CommitOutcomeUnknownError, RetryPolicy, SessionManager

from .postgres_server import PostgresServer

__all__ = [
    "APP",
    "HANG_SLACK",
    "CancelKind",
    "FaultEnv",
    "FaultRow",
    "Ledger",
    "Outcome",
    "Pauser",
    "Report",
    "Shape",
    "UnitRecord",
    "admin_engine",
    "cancel_storm",
    "check_invariants",
    "fault_manager",
    "idle_in_transaction",
    "pause_storm",
    "recording_warnings",
    "reported_outcome",
    "reset_fault_table",
    "restart_server",
    "restart_under_load",
    "terminate_storm",
]

#: ``application_name`` of the connections under test (the checks look for these backends).
APP = "ts-faults"
#: A unit may end at most this many seconds after its deadline.
HANG_SLACK = 1.0

Outcome = Literal["committed", "rolled_back", "unknown"]
CancelKind = Literal["anyio", "task", "timeout"]
Shape = Literal["plain", "pending", "savepoint"]


class FaultBase(DeclarativeBase):
    metadata = MetaData()


class FaultRow(FaultBase):
    """One row per committed unit; ``unit`` is deliberately not unique (duplicates must show)."""

    __tablename__ = "fault_rows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit: Mapped[str] = mapped_column(String(80), index=True)
    # Seconds the INSERT (a BEFORE trigger) and the COMMIT (a deferred trigger) take
    # on the server: windows for a fault to land in mid-statement and mid-COMMIT.
    insert_sleep: Mapped[float] = mapped_column(Float, default=0.0)
    commit_sleep: Mapped[float] = mapped_column(Float, default=0.0)


_TRIGGERS = [
    """
    CREATE FUNCTION fault_rows_sleep_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(NEW.insert_sleep); RETURN NEW; END $$
    """,
    """
    CREATE TRIGGER fault_rows_sleep_insert BEFORE INSERT ON fault_rows
    FOR EACH ROW WHEN (NEW.insert_sleep > 0) EXECUTE FUNCTION fault_rows_sleep_insert()
    """,
    """
    CREATE FUNCTION fault_rows_sleep_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(NEW.commit_sleep); RETURN NULL; END $$
    """,
    """
    CREATE CONSTRAINT TRIGGER fault_rows_sleep_commit AFTER INSERT ON fault_rows
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.commit_sleep > 0) EXECUTE FUNCTION fault_rows_sleep_commit()
    """,
]


def admin_engine(url: str) -> AsyncEngine:
    """An AUTOCOMMIT engine for the checks: no pool, so a restart leaves nothing stale."""
    return create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


async def reset_fault_table(admin: AsyncEngine) -> None:
    """(Re)create ``fault_rows`` and its sleep triggers, empty."""
    async with admin.connect() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS fault_rows"))
        await conn.execute(text("DROP FUNCTION IF EXISTS fault_rows_sleep_insert"))
        await conn.execute(text("DROP FUNCTION IF EXISTS fault_rows_sleep_commit"))
        await conn.run_sync(FaultBase.metadata.create_all)
        for statement in _TRIGGERS:
            await conn.execute(text(statement))


def fault_manager(url: str, *, connect_args: dict[str, Any] | None = None, **options: Any) -> Any:
    """A :class:`SessionManager` whose connections the checks can find (``application_name``).

    ``synchronous_commit=on`` for these sessions (the throwaway cluster runs with it
    off): an acknowledged COMMIT must survive an immediate shutdown, or the check
    would blame the library for what the server configuration lost.
    """
    # ssl=False: the throwaway cluster has no TLS, and asyncpg's TLS probe, when a
    # cancellation cuts a connect short, leaves a future whose error nobody reads
    # (asyncio logs it): noise that is asyncpg's, not what this suite is about.
    args = {"ssl": False, **(connect_args or {})}
    settings = {"application_name": APP, "synchronous_commit": "on"}
    settings.update(args.pop("server_settings", {}))
    args["server_settings"] = settings
    db = SessionManager(url, connect_args=args, **options)  # named so: messages say "db."
    return db


# -- what a unit reported ------------------------------------------------------------


def reported_outcome(error: BaseException | None) -> Outcome:
    """How the caller of a unit that ended with ``error`` (``None``: normally) learns its fate."""
    if error is None:
        return "committed"
    if isinstance(error, CommitOutcomeUnknownError):
        return "unknown"
    tagged = getattr(error, "tasksession_outcome", None)
    if tagged == "committed":
        return "committed"
    if tagged == "unknown":
        return "unknown"
    return "rolled_back"


@dataclass
class UnitRecord:
    """One unit: when it started, by when it must have ended, and what its caller saw."""

    unit: str
    started: float
    deadline: float
    outcome: Outcome | None = None
    ended: float | None = None
    error: str | None = None  # type of what reached the caller
    stated: str | None = None  # the scope's own record (Scope.outcome), where offered

    @property
    def overrun(self) -> float:
        """Seconds past the deadline the unit ended (or has been running, if still running)."""
        end = self.ended if self.ended is not None else time.monotonic()
        return end - self.deadline


def _error_name(error: BaseException) -> str:
    name = type(error).__name__
    tagged = getattr(error, "tasksession_outcome", None)
    return f"{name}[{tagged}]" if tagged is not None else name


class Ledger:
    """What every unit of one scenario reported, keyed by its unit id."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.records: dict[str, UnitRecord] = {}

    def new(self, deadline_in: float) -> UnitRecord:
        """A new unit, which must end within ``deadline_in`` seconds (+ :data:`HANG_SLACK`)."""
        now = time.monotonic()
        unit = f"{self.prefix}-{len(self.records)}"
        record = UnitRecord(unit=unit, started=now, deadline=now + deadline_in)
        self.records[unit] = record
        return record

    def end(self, record: UnitRecord, error: BaseException | None, scope: Any = None) -> None:
        record.ended = time.monotonic()
        record.outcome = reported_outcome(error)
        record.error = None if error is None else _error_name(error)
        stated = getattr(scope, "outcome", None)
        if stated is not None:
            record.stated = str(stated).replace(" ", "_")  # "rolled back" -> "rolled_back"

    async def scope_unit(
        self,
        record: UnitRecord,
        db: SessionManager,
        body: Callable[[AsyncSession], Awaitable[None]],
    ) -> None:
        """Run ``body(session)`` in ``async with db.scope()``; record what the caller saw."""
        scope = db.scope(name=record.unit)
        try:
            async with scope as session:
                await body(session)
        except BaseException as error:
            self.end(record, error, scope)
            raise
        self.end(record, None, scope)

    async def call_unit(self, record: UnitRecord, call: Callable[[], Awaitable[object]]) -> None:
        """Await ``call()`` (a ``@db.transactional`` function); record what the caller saw."""
        try:
            await call()
        except BaseException as error:
            self.end(record, error)
            raise
        self.end(record, None)

    def outcomes(self) -> Counter[str]:
        return Counter(r.outcome or "pending" for r in self.records.values())

    def errors(self) -> Counter[str]:
        return Counter(r.error for r in self.records.values() if r.error is not None)


# -- the invariants -------------------------------------------------------------------


@dataclass
class Report:
    """The invariants of one scenario, checked: :meth:`violations` lists what broke."""

    scenario: str
    units: int
    outcomes: Counter[str]
    errors: Counter[str]
    rows: int
    duplicates: dict[str, int]
    missing: list[str]  # reported committed, no row
    unexpected: list[str]  # reported rolled back, yet a row exists
    unknown_present: int  # outcome unknown, row exists
    checked_out: int | None
    open_scopes: int
    idle_in_transaction: list[str]
    hung: dict[str, float]  # unit -> seconds past its deadline
    disagreements: list[str]  # what the caller was told differs from Scope.outcome
    warnings: list[str]
    max_overrun: float
    faults: dict[str, int] = field(default_factory=dict)

    def violations(self) -> list[str]:
        found = []
        if self.missing:
            found.append(
                f"{len(self.missing)} unit(s) reported committed have no row: {self.missing[:5]}"
            )
        if self.unexpected:
            found.append(
                f"{len(self.unexpected)} unit(s) reported rolled back have a row: {self.unexpected[:5]}"
            )
        if self.duplicates:
            found.append(
                f"{len(self.duplicates)} unit(s) have duplicate rows: {dict(list(self.duplicates.items())[:5])}"
            )
        if self.checked_out:
            found.append(f"{self.checked_out} connection(s) still checked out")
        if self.open_scopes:
            found.append(f"{self.open_scopes} scope(s) still open")
        if self.idle_in_transaction:
            found.append(f"backends idle in transaction: {self.idle_in_transaction[:5]}")
        if self.hung:
            worst = sorted(self.hung.items(), key=lambda item: -item[1])[:5]
            found.append(
                f"{len(self.hung)} unit(s) ended more than {HANG_SLACK}s after their deadline: "
                + ", ".join(f"{unit} +{late:.2f}s" for unit, late in worst)
            )
        if self.disagreements:
            found.append(
                f"{len(self.disagreements)} unit(s) told one outcome while Scope.outcome says "
                f"another: {self.disagreements[:5]}"
            )
        if self.outcomes.get("pending"):
            found.append(f"{self.outcomes['pending']} unit(s) never reported an outcome")
        if self.warnings:
            found.append(f"{len(self.warnings)} warning(s): {self.warnings[:3]}")
        return found

    def summary(self) -> str:
        return (
            f"{self.scenario}: {self.units} units, outcomes {dict(self.outcomes)}, "
            f"rows {self.rows} (unknown with a row: {self.unknown_present}), "
            f"faults {self.faults}, errors {dict(self.errors.most_common(8))}, "
            f"max overrun {self.max_overrun:+.2f}s; violations: {self.violations() or 'none'}"
        )


@contextlib.contextmanager
def recording_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (instead of raising it, as the test run's filter does).

    A warning raised as an exception inside a library's teardown changes what the
    teardown does; recorded, it is reported as a violation and nothing else changes.
    """
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield seen


async def idle_in_transaction(admin: AsyncEngine, within: float = 3.0) -> list[str]:
    """Backends of :data:`APP` idle in a transaction, after waiting up to ``within`` seconds.

    A connection being closed may leave its backend idle in transaction for a moment
    (the server notices the closed socket asynchronously): only what stays counts.
    """
    query = text(
        "SELECT pid, state, query FROM pg_stat_activity "
        "WHERE application_name = :app AND state LIKE 'idle in transaction%'"
    )
    found: list[str] = []
    with anyio.move_on_after(within):
        while True:
            async with admin.connect() as conn:
                found = [
                    f"{pid} {state}: {q[:60]}"
                    for pid, state, q in await conn.execute(query, {"app": APP})
                ]
            if not found:
                break
            await anyio.sleep(0.05)
    return found


async def check_invariants(
    scenario: str,
    ledger: Ledger,
    db: SessionManager,
    admin: AsyncEngine,
    seen_warnings: list[warnings.WarningMessage],
    faults: dict[str, int] | None = None,
) -> Report:
    """Compare what the units reported with the database and the manager's pool."""
    records = ledger.records
    checked_out = db.statistics().pool_checked_out
    async with admin.connect() as conn:
        counts = {
            unit: int(n)
            for unit, n in await conn.execute(
                text("SELECT unit, count(*) FROM fault_rows WHERE unit LIKE :p GROUP BY unit"),
                {"p": f"{ledger.prefix}-%"},
            )
        }
    committed = {u for u, r in records.items() if r.outcome == "committed"}
    unknown = {u for u, r in records.items() if r.outcome == "unknown"}
    present = set(counts)
    hung = {u: r.overrun for u, r in records.items() if r.ended is None or r.overrun > HANG_SLACK}
    return Report(
        scenario=scenario,
        units=len(records),
        outcomes=ledger.outcomes(),
        errors=ledger.errors(),
        rows=sum(counts.values()),
        duplicates={u: n for u, n in counts.items() if n > 1},
        missing=sorted(committed - present),
        unexpected=sorted(present - committed - unknown),
        unknown_present=len(present & unknown),
        checked_out=checked_out,
        open_scopes=len(db.active_scopes()),
        idle_in_transaction=await idle_in_transaction(admin),
        hung=hung,
        disagreements=[
            f"{u}: told {r.outcome}, Scope.outcome {r.stated}"
            for u, r in records.items()
            if r.stated is not None and r.stated != r.outcome
        ],
        warnings=[f"{w.category.__name__}: {w.message}" for w in seen_warnings],
        max_overrun=max((r.overrun for r in records.values()), default=0.0),
        faults=dict(faults or {}),
    )


# -- faults ---------------------------------------------------------------------------


def restart_server(server: PostgresServer, mode: Literal["fast", "immediate"]) -> float:
    """Restart the cluster the tests started (``pg_ctl -m fast|immediate``); return seconds taken.

    ``immediate`` is a crash: no shutdown checkpoint, the server recovers from WAL
    when it starts again.
    """
    if not server.self_started:
        raise RuntimeError("refusing to restart a PostgreSQL server the tests did not start")
    started = time.monotonic()
    server._pg_ctl("-m", mode, "-w", "-t", "60", "restart", "-l", str(server.log_file))
    return time.monotonic() - started


class Pauser:
    """Pause backends (``SIGSTOP``) and resume them (``SIGCONT``) after a bounded time.

    Use it as a context manager: leaving it resumes every backend still paused, so
    that a failing test never leaves the cluster with a stopped process.
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self._handles: list[asyncio.TimerHandle] = []

    def pause(self, pid: int, seconds: float) -> None:
        self.pids.add(pid)
        os.kill(pid, signal.SIGSTOP)
        self._handles.append(asyncio.get_running_loop().call_later(seconds, self.resume, pid))

    def resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def resume_all(self) -> None:
        for handle in self._handles:
            handle.cancel()
        for pid in self.pids:
            self.resume(pid)

    async def settle(self, admin: AsyncEngine, within: float = 5.0) -> None:
        """Resume every backend and wait until none of them is still running a statement.

        A COMMIT that the paused backend received completes once it resumes: only
        then do the rows say what the server did.
        """
        self.resume_all()
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids) AND state = 'active'"
        )
        with anyio.move_on_after(within):
            while True:
                async with admin.connect() as conn:
                    if not await conn.scalar(query, {"pids": list(self.pids)}):
                        return
                await anyio.sleep(0.02)

    def __enter__(self) -> Pauser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume_all()


# -- scenarios ------------------------------------------------------------------------


@dataclass
class FaultEnv:
    """The server faults may be injected into, and an AUTOCOMMIT engine for the checks."""

    server: PostgresServer
    admin: AsyncEngine

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def _managed(env: FaultEnv, **options: Any) -> AsyncIterator[Any]:
    db = fault_manager(env.url, **options)
    try:
        yield db
    finally:
        await db.dispose()


def _unit_body(
    db: SessionManager, rng: random.Random, unit: str, shape: Shape, statement_sleep: float
) -> Callable[[AsyncSession], Awaitable[None]]:
    """The body of one unit: insert its row (in savepoints for that shape), maybe wait a little.

    Each unit gets server-side pauses in some phases (seeded): a fault then has time
    to land mid-INSERT, mid-statement and mid-COMMIT.
    """
    insert_sleep = statement_sleep if rng.random() < 0.3 else 0.0
    commit_sleep = statement_sleep * 3 if rng.random() < 0.5 else 0.0
    sleep = statement_sleep if rng.random() < 0.3 else 0.0

    async def body(session: AsyncSession) -> None:
        # A new object per attempt: a retried unit must insert afresh.
        row = FaultRow(unit=unit, insert_sleep=insert_sleep, commit_sleep=commit_sleep)
        if shape == "savepoint":
            async with db.scope(savepoint=True), db.scope(savepoint=True):
                session.add(row)
                await session.flush()
                if sleep:
                    await session.execute(text("SELECT pg_sleep(:s)"), {"s": sleep})
            return
        session.add(row)
        if shape == "plain":
            await session.flush()
        if sleep:
            await session.execute(text("SELECT pg_sleep(:s)"), {"s": sleep})

    return body


def _transactional(
    db: SessionManager,
    policy: RetryPolicy,
    name: str,
    body: Callable[[AsyncSession], Awaitable[None]],
) -> Callable[[], Awaitable[None]]:
    """``body`` as a ``@db.transactional(retry=policy)`` function (it reaches ``db.session``)."""

    @db.transactional(retry=policy, name=name)
    async def unit() -> None:
        await body(db.session)

    return unit


async def cancel_storm(
    env: FaultEnv,
    *,
    kind: CancelKind,
    shape: Shape,
    units: int,
    concurrency: int = 16,
    seed: int = 0,
    max_delay: float | None = None,
    statement_sleep: float = 0.005,
) -> Report:
    """``units`` units, each cancelled after a random delay by ``kind``; check the invariants.

    ``anyio``: an :func:`anyio.move_on_after` cancel scope around the unit; ``task``: a
    native ``Task.cancel()`` of the unit's task; ``timeout``: :func:`asyncio.timeout`.
    The delays (seeded, uniform up to ``max_delay``; by default 1.5 times the 90th
    percentile of how long ``2 * concurrency`` uncancelled units took first) spread the
    cancellations over waiting for a connection, the INSERT, a statement, the
    savepoints and the COMMIT (``commit_sleep`` keeps it in flight for a while);
    ``concurrency`` units at a time on a pool of half as many.
    """
    ledger = Ledger(f"storm-{kind}-{shape}-{seed}")
    pool = max(concurrency // 2, 1)
    async with _managed(env, pool_size=pool, max_overflow=0, pool_timeout=30) as db:
        with recording_warnings() as seen:
            loop = asyncio.get_running_loop()

            async def run_one(n: int, delay: float | None) -> float:
                """Run unit ``n``, cancelled after ``delay`` seconds (never if None); its seconds."""
                rng = random.Random(f"{seed}-{kind}-{shape}-{n}")
                record = ledger.new(deadline_in=30.0 if delay is None else delay)
                body = _unit_body(db, rng, record.unit, shape, statement_sleep)
                if delay is None:
                    await ledger.scope_unit(record, db, body)
                elif kind == "anyio":
                    with anyio.move_on_after(delay):
                        await ledger.scope_unit(record, db, body)
                elif kind == "timeout":
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await ledger.scope_unit(record, db, body)
                else:
                    task = loop.create_task(ledger.scope_unit(record, db, body))
                    handle = loop.call_later(delay, task.cancel)
                    try:
                        await asyncio.wait([task])
                    finally:
                        handle.cancel()
                    if not task.cancelled():
                        task.exception()  # retrieved: the ledger has it
                return time.monotonic() - record.started

            async def run_all(numbers: list[int], delays: list[float | None]) -> list[float]:
                pending = list(zip(numbers, delays, strict=True))
                pending.reverse()  # pop() takes them in order
                durations: list[float] = []

                async def worker() -> None:
                    while pending:
                        n, delay = pending.pop()
                        with contextlib.suppress(Exception):
                            durations.append(await run_one(n, delay))

                async with anyio.create_task_group() as tg:
                    for _ in range(concurrency):
                        tg.start_soon(worker)
                return durations

            limit = max_delay or 0.0
            with anyio.move_on_after(units * 0.2 + 30):
                # Calibration, also a warm-up (cancelling a connect is not what this
                # is about): uncancelled units say how long a unit lasts here, now.
                warm = concurrency * 2
                durations = sorted(await run_all(list(range(warm)), [None] * warm))
                if max_delay is None:
                    limit = 1.5 * durations[int(len(durations) * 0.9)]
                rng = random.Random(f"{seed}-{kind}-{shape}-delays")
                await run_all(
                    list(range(warm, warm + units)),
                    [rng.uniform(0, limit) for _ in range(units)],
                )
            return await check_invariants(
                f"cancel storm ({kind}, {shape})",
                ledger,
                db,
                env.admin,
                seen,
                {"cancel delays up to (ms)": round(limit * 1000)},
            )


async def restart_under_load(
    env: FaultEnv,
    *,
    mode: Literal["fast", "immediate"],
    workers: int = 50,
    seed: int = 0,
    unit_timeout: float = 10.0,
    restarts: int = 1,
) -> Report:
    """``workers`` tasks run units back to back while the server restarts ``restarts`` time(s).

    Half the units are plain scopes, half ``@db.transactional`` calls with a retry
    policy (so a retry that applied a unit twice would show as a duplicate). Each
    unit runs under ``anyio.fail_after(unit_timeout)``. After the last restart every
    worker must commit a unit again (bounded), then the invariants are checked.
    """
    rng = random.Random(f"{seed}-restart-{mode}")
    ledger = Ledger(f"restart-{mode}-{seed}")
    policy = RetryPolicy(attempts=4, backoff=0.05, max_backoff=0.2)
    faults: Counter[str] = Counter()
    async with _managed(
        env,
        pool_size=workers // 2,
        max_overflow=workers - workers // 2,
        pool_timeout=30,
        connect_args={"timeout": 5},
    ) as db:
        with recording_warnings() as seen:
            restarted = anyio.Event()
            back: set[int] = set()
            all_back = anyio.Event()
            warm = anyio.Event()
            stop = anyio.Event()

            async def worker(index: int) -> None:
                while not stop.is_set():
                    record = ledger.new(deadline_in=unit_timeout)
                    body = _unit_body(db, rng, record.unit, "plain", 0.005)
                    try:
                        with anyio.fail_after(unit_timeout):
                            if rng.random() < 0.5:
                                await ledger.scope_unit(record, db, body)
                            else:
                                unit = _transactional(db, policy, record.unit, body)
                                await ledger.call_unit(record, unit)
                    except Exception:
                        await anyio.sleep(0.02)  # the server is down: do not spin
                        continue
                    if len(ledger.records) >= workers * 2:
                        warm.set()
                    if restarted.is_set():
                        back.add(index)
                        if len(back) == workers:
                            all_back.set()

            async with anyio.create_task_group() as tg:
                for index in range(workers):
                    tg.start_soon(worker, index)
                with anyio.fail_after(30):
                    await warm.wait()
                for _ in range(restarts):
                    back.clear()
                    await anyio.to_thread.run_sync(restart_server, env.server, mode)
                    faults[f"{mode} restarts"] += 1
                    restarted.set()
                    with anyio.move_on_after(30):
                        await all_back.wait()
                    all_back = anyio.Event()
                stop.set()
            return await check_invariants(
                f"{mode} restart under {workers} concurrent units",
                ledger,
                db,
                env.admin,
                seen,
                dict(faults),
            )


async def terminate_storm(
    env: FaultEnv,
    *,
    units: int,
    concurrency: int = 16,
    seed: int = 0,
    interval: float = 0.01,
) -> Report:
    """Run ``units`` units while a killer terminates a random busy backend every ``interval``.

    The killer picks (seeded) among the units' backends that are running a
    statement (an INSERT, a ``pg_sleep``, a COMMIT running its deferred trigger) or
    idle in a transaction, and calls ``pg_terminate_backend`` on it.
    """
    rng = random.Random(f"{seed}-terminate")
    ledger = Ledger(f"terminate-{seed}")
    faults: Counter[str] = Counter()
    async with _managed(env, pool_size=concurrency, max_overflow=0, pool_timeout=30) as db:
        with recording_warnings() as seen:
            pending = list(range(units - 1, -1, -1))
            done = anyio.Event()

            async def worker() -> None:
                while pending:
                    n = pending.pop()
                    record = ledger.new(deadline_in=10.0)
                    body = _unit_body(
                        db, random.Random(f"{seed}-terminate-{n}"), record.unit, "plain", 0.005
                    )
                    with contextlib.suppress(Exception):
                        with anyio.fail_after(10.0):
                            await ledger.scope_unit(record, db, body)

            async def killer() -> None:
                busy = text(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = :app "
                    "AND (state = 'active' OR state LIKE 'idle in transaction%') ORDER BY pid"
                )
                async with env.admin.connect() as conn:
                    while not done.is_set():
                        victims = list(await conn.execute(busy, {"app": APP}))
                        if victims:
                            pid, state, query = rng.choice(victims)
                            await conn.execute(
                                text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
                            )
                            what = query.split()[0].upper() if state == "active" and query else ""
                            faults[f"terminated {state} {what}".strip()] += 1
                        await anyio.sleep(rng.uniform(0, interval * 2))

            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                with anyio.move_on_after(units * 0.05 + 30):
                    async with anyio.create_task_group() as units_group:
                        for _ in range(concurrency):
                            units_group.start_soon(worker)
                done.set()
            return await check_invariants(
                "backends terminated mid-transaction", ledger, db, env.admin, seen, dict(faults)
            )


async def pause_storm(
    env: FaultEnv,
    *,
    phase: Literal["statement", "commit"],
    units: int = 8,
    seed: int = 0,
    command_timeout: float = 0.5,
    pause: float = 1.5,
    deadline: float = 2.5,
) -> Report:
    """``units`` concurrent units, most with their backend paused (``SIGSTOP``) in ``phase``.

    With asyncpg's ``command_timeout`` the client gives up on the paused round trip
    after ``command_timeout`` seconds; the backend resumes after ``pause`` seconds
    and then runs what it received (a paused COMMIT commits). Half the units are
    ``@db.transactional`` calls whose policy retries ``TimeoutError``: a COMMIT that
    timed out must not be retried (a duplicate row shows it). Every unit runs under
    ``anyio.fail_after(deadline)``.
    """
    rng = random.Random(f"{seed}-pause-{phase}")
    ledger = Ledger(f"pause-{phase}-{seed}")
    policy = RetryPolicy(attempts=3, backoff=0.01, exceptions=(TimeoutError,))
    faults: Counter[str] = Counter()
    async with _managed(
        env,
        pool_size=units * 2,
        max_overflow=0,
        pool_timeout=30,
        connect_args={"command_timeout": command_timeout},
    ) as db:
        with recording_warnings() as seen, Pauser() as pauser:

            def body_for(
                record: UnitRecord, paused: bool
            ) -> Callable[[AsyncSession], Awaitable[None]]:
                first = [paused]  # only the first attempt is paused: a retry runs freely

                async def body(session: AsyncSession) -> None:
                    pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
                    pause_now, first[0] = first[0], False
                    if pause_now and phase == "statement":
                        pauser.pause(pid, pause)
                        faults["paused mid-statement"] += 1
                    session.add(FaultRow(unit=record.unit))
                    await session.flush()
                    if pause_now and phase == "commit":
                        pauser.pause(pid, pause)  # the COMMIT that follows waits for it
                        faults["paused before COMMIT"] += 1

                return body

            async def run_one(transactional: bool, paused: bool) -> None:
                record = ledger.new(deadline_in=deadline)
                body = body_for(record, paused)
                with contextlib.suppress(Exception), anyio.fail_after(deadline):
                    if transactional:
                        await ledger.call_unit(
                            record, _transactional(db, policy, record.unit, body)
                        )
                    else:
                        await ledger.scope_unit(record, db, body)

            # Every combination: plain scope or @db.transactional, paused or not (a
            # quarter run undisturbed, as controls), in a seeded order.
            plans = [(n % 2 == 1, n % 4 < 2 or n % 8 >= 6) for n in range(units)]
            rng.shuffle(plans)
            async with anyio.create_task_group() as tg:
                for transactional, paused in plans:
                    tg.start_soon(run_one, transactional, paused)
            await pauser.settle(env.admin)
            return await check_invariants(
                f"backend paused during {phase}", ledger, db, env.admin, seen, dict(faults)
            )
