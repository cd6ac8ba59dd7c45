"""examples/fan_out.py is a working program: it runs and exits 0, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fan_out.py"


def run_example(url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TASKSESSION_DATABASE_URL"}
    if url is not None:
        env["TASKSESSION_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _assert_tour_ran(result: subprocess.CompletedProcess[str]) -> None:
    assert 0 == result.returncode, result.stderr
    assert "3 of 4 calls refused: ConcurrentSessionError" in result.stdout
    assert "committed: {'apple': 2, 'fig': 0, 'pear': 1, 'plum': 0}" in result.stdout
    assert "fig: 0 prices (rolled back)" in result.stdout
    assert "the scope rolled back everything" in result.stdout


def test_fan_out_example_runs_on_sqlite() -> None:
    _assert_tour_ran(run_example(None))


def test_fan_out_example_runs_on_postgres(postgres_url: str) -> None:
    _assert_tour_ran(run_example(postgres_url))
