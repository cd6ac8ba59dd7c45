"""Per-test isolation: what giving each test a clean database costs, three ways, on PostgreSQL.

The schema of anchors-wave2.md §1.9: 20 tables ``(id serial primary key, a int,
b text, c timestamptz default now())``, each with an index on ``a`` and 100 rows.
Every simulated test runs the same tiny body: one scope that adds a row to the
first table, then another scope that reads it back by primary key. Per test:

1. ``savepoint``: ``async with tasksession.testing.isolated(db):`` around the body
   (one connection, an outer transaction rolled back at the end, the scopes in
   SAVEPOINTs of it). Target: overhead ≤ 1 ms (median).
2. ``clone``: ``async with isolated(db, mode="clone", schema=...):`` around the
   body (a database cloned from a template built once per process, dropped at the
   end). The first call, which builds the template, is a warm-up, outside the
   figures. Target: overhead ≤ 250 ms (median).
3. ``TRUNCATE`` (the reference, what Django's ``TransactionTestCase`` flush does):
   the body, then ``TRUNCATE`` of the 20 tables ``RESTART IDENTITY CASCADE`` in one
   statement. Putting the 100 rows per table back afterwards is not timed (its cost
   is printed in a note).

Overhead = the median time of the whole cycle (isolation and body) minus the
median time of the body alone, run without isolation on the benchmark's database
(the row it commits is deleted afterwards, untimed). Each strategy's cycles are
interleaved one by one with bare bodies, and the strategies take turns in rounds
(``--rounds``; the order rotated per round), so that all of them see the same
background load. ``python -m benchmarks isolation [--quick]``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import DateTime, Integer, Table, Text, delete, func, insert, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, mapped_column

from tasksession import SessionManager
from tasksession.testing import drop_templates, isolated

from ._db import postgres_url
from ._harness import Args, rotations

TABLES = 20
ROWS = 100

SAVEPOINT = "savepoint"
CLONE = "clone"
TRUNCATE = "TRUNCATE 20 tables"

#: Tests per strategy and round (full run: x11 rounds; --quick: x3).
PER_ROUND = {SAVEPOINT: 30, CLONE: 2, TRUNCATE: 1}
PER_ROUND_QUICK = {SAVEPOINT: 20, CLONE: 2, TRUNCATE: 1}
#: Median overhead per test, in ms.
TARGETS_MS = {SAVEPOINT: 1.0, CLONE: 250.0}


class IsolationBase(DeclarativeBase):
    """This benchmark's 20 tables, on a metadata of their own (the clone template's schema)."""


def _model(number: int) -> type[IsolationBase]:
    return type(
        f"T{number}",
        (IsolationBase,),
        {
            "__tablename__": f"bench_isolation_t{number}",
            "id": mapped_column(Integer, primary_key=True),
            "a": mapped_column(Integer, index=True),
            "b": mapped_column(Text),
            "c": mapped_column(DateTime(timezone=True), server_default=func.now()),
        },
    )


MODELS = [_model(n) for n in range(1, TABLES + 1)]
T1 = MODELS[0]
TRUNCATE_ALL = text(
    "TRUNCATE " + ", ".join(model.__tablename__ for model in MODELS) + " RESTART IDENTITY CASCADE"
)


def _tables() -> list[Table]:
    return [IsolationBase.metadata.tables[model.__tablename__] for model in MODELS]


def seed(connection: Connection) -> None:
    """``ROWS`` rows in every table (ids from the sequences, which a test's row continues)."""
    for table in _tables():
        connection.execute(insert(table), [{"a": i, "b": f"row {i}"} for i in range(ROWS)])


def build_schema(connection: Connection) -> None:
    """The clone template's hook: the 20 tables and their rows (once per process)."""
    IsolationBase.metadata.create_all(connection)
    seed(connection)


def rebuild(connection: Connection) -> None:
    IsolationBase.metadata.drop_all(connection)
    build_schema(connection)


async def body(db: SessionManager, number: int) -> int:
    """The test: one write in a scope, then one read of it in another. Returns the row's id."""
    async with db.scope() as session:
        row = T1(a=number, b="written by the test")
        session.add(row)
    async with db.scope() as session:
        found = await session.get(T1, row.id)
    assert found is not None, "the test's read did not see its write"
    return row.id


@dataclass
class Samples:
    """Seconds per cycle (isolation and body) and per bare body run next to them."""

    cycles: list[float] = field(default_factory=list)
    bodies: list[float] = field(default_factory=list)


def median_p90_ms(values: Sequence[float]) -> tuple[float, float]:
    median = statistics.median(values) * 1e3
    if len(values) < 2:
        return median, median
    return median, statistics.quantiles(values, n=10, method="inclusive")[8] * 1e3


async def compare(db: SessionManager, args: Args) -> None:
    engine = db.engine
    async with engine.begin() as connection:
        await connection.run_sync(rebuild)
        version = await connection.scalar(text("SHOW server_version"))
        settings = {
            name: await connection.scalar(text(f"SHOW {name}"))
            for name in (
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "shared_buffers",
            )
        }
        size = await connection.scalar(text("SELECT pg_database_size(current_database())"))

    async def bare(number: int) -> float:
        start = time.perf_counter()
        row_id = await body(db, number)
        elapsed = time.perf_counter() - start
        async with engine.begin() as connection:  # back to the clean state, untimed
            await connection.execute(delete(T1).where(T1.id == row_id))
        return elapsed

    async def savepoint(number: int) -> float:
        start = time.perf_counter()
        async with isolated(db):
            await body(db, number)
        return time.perf_counter() - start

    async def clone(number: int) -> float:
        start = time.perf_counter()
        async with isolated(db, mode="clone", schema=build_schema):
            await body(db, number)
        return time.perf_counter() - start

    reseeds: list[float] = []

    async def truncate(number: int) -> float:
        start = time.perf_counter()
        await body(db, number)
        async with engine.begin() as connection:
            await connection.execute(TRUNCATE_ALL)
        elapsed = time.perf_counter() - start
        reseed_start = time.perf_counter()
        async with engine.begin() as connection:  # the next test's starting state, untimed
            await connection.run_sync(seed)
        reseeds.append(time.perf_counter() - reseed_start)
        return elapsed

    cycles: dict[str, Callable[[int], Awaitable[float]]] = {
        SAVEPOINT: savepoint,
        CLONE: clone,
        TRUNCATE: truncate,
    }
    per_round = PER_ROUND_QUICK if args.quick else PER_ROUND

    # Warm-up: connections, statement caches, and the clone template (built by the
    # first clone-mode call, which is left out of the figures).
    template_start = time.perf_counter()
    async with isolated(db, mode="clone", schema=build_schema):
        async with db.scope() as session:
            clone_size = await session.scalar(text("SELECT pg_database_size(current_database())"))
        await body(db, 0)
    first_clone = time.perf_counter() - template_start
    for number in range(20):
        await bare(number)
        await savepoint(number)
    await truncate(0)
    reseeds.clear()

    samples = {name: Samples() for name in cycles}
    number = 0
    started = time.perf_counter()
    for order in rotations(len(cycles), args.rounds):
        for index in order:
            name = list(cycles)[index]
            gc.collect()
            for _ in range(per_round[name]):
                number += 1
                # Alternate which of the pair goes first, so neither always follows the other.
                if number % 2:
                    samples[name].bodies.append(await bare(number))
                    samples[name].cycles.append(await cycles[name](number))
                else:
                    samples[name].cycles.append(await cycles[name](number))
                    samples[name].bodies.append(await bare(number))
    measured = time.perf_counter() - started

    async with engine.begin() as connection:
        left = await connection.scalar(select(func.count()).select_from(T1))
        await connection.run_sync(IsolationBase.metadata.drop_all)
    assert left == ROWS, f"{left} rows in {T1.__tablename__} after the tests, not {ROWS}"

    overheads = {
        name: median_p90_ms(s.cycles)[0] - median_p90_ms(s.bodies)[0] for name, s in samples.items()
    }
    cycle_medians = {name: median_p90_ms(s.cycles)[0] for name, s in samples.items()}

    print(
        f"\n## per-test isolation on PostgreSQL {version}: {TABLES} tables x {ROWS} rows, "
        "an index on each"
    )
    print(
        "  measured per simulated test: the whole cycle (isolation + the body: one scope "
        "writing a row, one scope reading it back) and the body alone without isolation, "
        "interleaved; overhead = median(cycle) - median(body alone)"
    )
    print(
        "  targets: savepoint overhead <= 1 ms, clone overhead <= 250 ms (median); "
        "TRUNCATE (Django's TransactionTestCase flush) is the reference"
    )
    header = [
        "strategy",
        "tests",
        "cycle ms median [p90]",
        "body alone ms median [p90]",
        "overhead ms",
        "overhead / savepoint's",
        "cycle / savepoint's",
        "target",
    ]
    lines = [header]
    for name, s in samples.items():
        cycle_median, cycle_p90 = median_p90_ms(s.cycles)
        body_median, body_p90 = median_p90_ms(s.bodies)
        overhead = overheads[name]
        reference = overheads[SAVEPOINT]
        ratio = f"{overhead / reference:,.0f}x" if reference > 0 else "- (savepoint's <= 0)"
        target = TARGETS_MS.get(name)
        if target is None:
            verdict = "reference"
        else:
            met = "MET" if overhead <= target else "MISSED"
            verdict = f"{met} (overhead ms <= {target:g})"
        lines.append(
            [
                name,
                str(len(s.cycles)),
                f"{cycle_median:.3f} [{cycle_p90:.3f}]",
                f"{body_median:.3f} [{body_p90:.3f}]",
                f"{overhead:.3f}",
                "1x" if name == SAVEPOINT else ratio,
                f"{cycle_median / cycle_medians[SAVEPOINT]:,.1f}x",
                verdict,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    reseed_median = statistics.median(reseeds) * 1e3
    print(
        f"  note: {args.rounds} rounds, {number} tests, {measured:.1f} s; "
        + ", ".join(f"{key}={value}" for key, value in settings.items())
        + " (anchors-wave2.md §1.9 was measured with fsync=on, on disk; the tests' throwaway"
        " clusters live in /dev/shm where there is one: on this machines' disk, ext4 without a"
        " journal, CREATE DATABASE and TRUNCATE grew 2-9x slower as files were created and"
        " deleted, run after run)"
    )
    print(
        f"  note: database {size / 1e6:.1f} MB, clone {clone_size / 1e6:.1f} MB; the first "
        f"clone-mode test (building the template) took {first_clone * 1e3:.0f} ms, left out"
    )
    print(
        f"  note: putting the {TABLES} x {ROWS} rows back after a TRUNCATE (untimed above) "
        f"took {reseed_median:.1f} ms (median)"
    )


async def main(args: Args) -> None:
    with postgres_url() as url:
        async with SessionManager(url) as db:
            try:
                await compare(db, args)
            finally:
                await drop_templates()
