"""Fault suite, long form (issue 13): every unit ends exactly once, and its caller knows how.

The scenarios of ``tests/test_faults.py`` (see :mod:`tests.faults`), with many more
units and faults, on a throwaway PostgreSQL cluster started here (faults are only
injected into a server we started):

* random-cancel storms: anyio cancel scopes, native ``Task.cancel()`` and
  :func:`asyncio.timeout`, each on three unit shapes (INSERT flushed in the block,
  INSERT left to the COMMIT's flush, INSERT inside two nested savepoints);
* PostgreSQL restarted (``pg_ctl -m fast`` and ``-m immediate``) several times under
  50 concurrent units;
* backends terminated mid-transaction (``pg_terminate_backend``) at random;
* backends paused (``SIGSTOP``, then ``SIGCONT``) mid-statement and during COMMIT,
  with asyncpg's ``command_timeout`` so that the reply comes after the client gave up.

For each: the units, what their callers were told (committed / rolled back / outcome
unknown), the rows, and the invariants (0 missing, 0 unexpected, 0 duplicates, 0
connections checked out, 0 backends idle in transaction, 0 units ended more than 1 s
past their deadline, 0 warnings). ``python -m benchmarks faults [--quick]``; the
figures are in docs/reliability.md.

With ``TASKSESSION_BENCH_DATABASE_URL`` set, only the cancel storms run (the other
faults need a cluster started here).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from tests.faults import (
    CancelKind,
    FaultEnv,
    Report,
    Shape,
    admin_engine,
    cancel_storm,
    pause_storm,
    reset_fault_table,
    restart_under_load,
    terminate_storm,
)
from tests.postgres_server import PostgresServer, start_cluster

from ._db import ENV_URL
from ._harness import Args

COLUMNS = [
    "scenario",
    "units",
    "committed",
    "of which cancelled",
    "rolled back",
    "unknown (row)",
    "rows",
    "missing",
    "unexpected",
    "dup",
    "out",
    "idle tx",
    "hung",
    "warn",
    "faults",
    "verdict",
]


def row_of(report: Report) -> list[str]:
    outcomes = report.outcomes
    faults = ", ".join(f"{name} {count}" for name, count in sorted(report.faults.items()))
    return [
        report.scenario,
        str(report.units),
        str(outcomes.get("committed", 0)),
        str(sum(n for name, n in report.errors.items() if name.endswith("[committed]"))),
        str(outcomes.get("rolled_back", 0)),
        f"{outcomes.get('unknown', 0)} ({report.unknown_present})",
        str(report.rows),
        str(len(report.missing)),
        str(len(report.unexpected)),
        str(len(report.duplicates)),
        str(report.checked_out),
        str(len(report.idle_in_transaction)),
        str(len(report.hung)),
        str(len(report.warnings)),
        faults or "-",
        "ok" if not report.violations() else "VIOLATED",
    ]


def print_table(reports: list[Report]) -> None:
    lines = [COLUMNS, *(row_of(r) for r in reports)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    print("\n## every unit ends exactly once (committed / rolled back / unknown: what callers saw)")
    for index, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(
        "  note: of which cancelled = committed units whose caller got the cancellation, "
        "marked tasksession_outcome='committed' (it landed during the COMMIT); "
        "unknown (row) = units told CommitOutcomeUnknownError or "
        "tasksession_outcome='unknown' (in brackets: how many of them did commit); "
        "out = connections checked out after the scenario; hung = units that ended more "
        "than 1 s after their deadline"
    )
    for report in reports:
        errors = ", ".join(f"{name} {count}" for name, count in report.errors.most_common(6))
        print(
            f"  {report.scenario}: errors callers saw: {errors or 'none'}; "
            f"latest end vs deadline {report.max_overrun:+.2f}s"
        )
        for violation in report.violations():
            print(f"    VIOLATED: {violation}")


async def main(args: Args) -> None:
    quick = args.quick
    external = os.environ.get(ENV_URL)
    server = PostgresServer(url=external, self_started=False) if external else start_cluster()
    admin = admin_engine(server.url)
    env = FaultEnv(server, admin)
    reports: list[Report] = []
    started = time.monotonic()

    async def run(scenario: Callable[[], Awaitable[Report]]) -> None:
        report = await scenario()
        print(f"  [{time.monotonic() - started:6.1f}s] {report.summary()}", flush=True)
        reports.append(report)

    try:
        await reset_fault_table(admin)
        units = 400 if quick else 3200
        kinds: tuple[CancelKind, ...] = ("anyio", "task", "timeout")
        shapes: tuple[Shape, ...] = ("plain", "pending", "savepoint")
        for seed, kind in enumerate(kinds):
            for shape in shapes:
                await run(
                    functools.partial(
                        cancel_storm, env, kind=kind, shape=shape, units=units, seed=seed
                    )
                )
        if server.self_started:
            modes: tuple[Literal["fast", "immediate"], ...] = ("fast", "immediate")
            for mode in modes:
                await run(
                    functools.partial(
                        restart_under_load, env, mode=mode, workers=50, restarts=1 if quick else 3
                    )
                )
            await run(functools.partial(terminate_storm, env, units=300 if quick else 2000))
            phases: tuple[Literal["statement", "commit"], ...] = ("statement", "commit")
            for phase in phases:
                for seed in range(1 if quick else 5):
                    await run(functools.partial(pause_storm, env, phase=phase, units=16, seed=seed))
        else:
            print(f"  {ENV_URL} is set: restarts, terminations and pauses skipped")
    finally:
        await admin.dispose()
        server.stop()
    print_table(reports)
