"""examples/quickstart.py is the first thing a newcomer runs: it must work, and say what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"

#: Lines the tour must print, in this order (each shows one behaviour worked).
EXPECTED_LINES = [
    "1. A scope commits when its block ends cleanly.",
    "   committed users: ['ada']",
    "2. A scope rolls back when its block raises; the exception goes on.",
    "   ValueError('payment declined') left the scope, which rolled back",
    "   committed users: ['ada']",
    "   db.session is session: True",
    "   committed users: ['ada', 'grace']",
    "4. A savepoint scope undoes only its own block.",
    "   IntegrityError in the savepoint: only the savepoint rolled back",
    "   committed users: ['ada', 'grace', 'linus']",
    "5. Outside any scope, db.session raises NoScopeError, which says what to do:",
    "   db.session was used outside of a scope. A session belongs to a unit of work, "
    "and a unit of work is an `async with` block; there is none open in this task "
    "(or in the task that started it).",
    "Done: every scope was committed or rolled back, and closed.",
]


def run_quickstart(cwd: Path, database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "TASKSESSION_DATABASE_URL"}
    if database_url is not None:
        env["TASKSESSION_DATABASE_URL"] = database_url
    # -W error: a warning in the newcomer's first run is a bug too.
    return subprocess.run(
        [sys.executable, "-W", "error", str(QUICKSTART)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def printed_in_order(expected: list[str], output: str) -> list[str]:
    """The expected lines that are missing from ``output`` (or out of order)."""
    lines = output.splitlines()
    missing, position = [], 0
    for line in expected:
        try:
            position = lines.index(line, position) + 1
        except ValueError:
            missing.append(line)
    return missing


@dataclass(frozen=True)
class Run:
    cwd: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One run of the quickstart as a newcomer runs it: no settings, the SQLite default."""
    cwd = tmp_path_factory.mktemp("quickstart")
    return Run(cwd, run_quickstart(cwd, None))


def test_quickstart_on_the_default_sqlite_exits_0(sqlite_run: Run) -> None:
    result = sqlite_run.result
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "" == result.stderr


def test_quickstart_prints_each_step_of_the_tour(sqlite_run: Run) -> None:
    result = sqlite_run.result
    assert [] == printed_in_order(EXPECTED_LINES, result.stdout), result.stdout + result.stderr


def test_quickstart_leaves_no_files_behind(sqlite_run: Run) -> None:
    assert [] == sorted(path.name for path in sqlite_run.cwd.iterdir())


@pytest.mark.postgres
def test_quickstart_on_postgresql_exits_0(tmp_path: Path, postgres_url: str) -> None:
    result = run_quickstart(tmp_path, postgres_url)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert [] == printed_in_order(EXPECTED_LINES, result.stdout), result.stdout
