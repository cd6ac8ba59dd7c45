"""The fault suite (short form): every unit ends exactly once, and its caller knows how.

Each test runs a seeded scenario of :mod:`tests.faults` on the PostgreSQL cluster the
tests started (faults are never injected into a server we did not start) and checks,
afterwards, the same invariants (:func:`tests.faults.check_invariants`):

* committed rows == units reported committed (a unit whose outcome was reported
  unknown is counted apart: its row may or may not exist), 0 duplicate rows;
* 0 connections checked out, 0 scopes open, 0 backends idle in transaction;
* no unit ended more than 1 s after its deadline, and no warning was emitted.

The long form, with many more units and faults, is ``python -m benchmarks faults``;
docs/reliability.md gives the figures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from .faults import (
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
from .postgres_server import PostgresServer

pytestmark = pytest.mark.anyio

SEED = 13


@pytest.fixture
async def env(postgres_server: PostgresServer) -> AsyncIterator[FaultEnv]:
    if not postgres_server.self_started:
        pytest.skip("injects faults: only on a PostgreSQL cluster the tests started")
    admin = admin_engine(postgres_server.url)
    try:
        await reset_fault_table(admin)
        yield FaultEnv(postgres_server, admin)
    finally:
        await admin.dispose()


def violations(report: Report) -> list[str]:
    # The summary rides along in the assertion message: outcomes, faults, errors.
    print(report.summary())
    return report.violations()


# -- random-cancel storms ----------------------------------------------------------------


@pytest.mark.parametrize("shape", ["plain", "pending", "savepoint"])
async def test_anyio_cancel_scope_storm_keeps_every_unit_exactly_once(
    env: FaultEnv, shape: Shape
) -> None:
    with anyio.fail_after(40):
        report = await cancel_storm(env, kind="anyio", shape=shape, units=200, seed=SEED)
    assert [] == violations(report), report.summary()


@pytest.mark.parametrize("shape", ["plain", "pending", "savepoint"])
async def test_task_cancel_storm_keeps_every_unit_exactly_once(env: FaultEnv, shape: Shape) -> None:
    with anyio.fail_after(40):
        report = await cancel_storm(env, kind="task", shape=shape, units=200, seed=SEED)
    assert [] == violations(report), report.summary()


@pytest.mark.parametrize("shape", ["plain", "pending", "savepoint"])
async def test_asyncio_timeout_storm_keeps_every_unit_exactly_once(
    env: FaultEnv, shape: Shape
) -> None:
    with anyio.fail_after(40):
        report = await cancel_storm(env, kind="timeout", shape=shape, units=200, seed=SEED)
    assert [] == violations(report), report.summary()


# -- the server goes away ------------------------------------------------------------------


async def test_fast_restart_under_50_concurrent_units_keeps_every_unit_exactly_once(
    env: FaultEnv,
) -> None:
    with anyio.fail_after(90):
        report = await restart_under_load(env, mode="fast", workers=50, seed=SEED)
    assert [] == violations(report), report.summary()


async def test_immediate_restart_under_50_concurrent_units_keeps_every_unit_exactly_once(
    env: FaultEnv,
) -> None:
    with anyio.fail_after(90):
        report = await restart_under_load(env, mode="immediate", workers=50, seed=SEED)
    assert [] == violations(report), report.summary()


async def test_backends_terminated_mid_transaction_keep_every_unit_exactly_once(
    env: FaultEnv,
) -> None:
    with anyio.fail_after(60):
        report = await terminate_storm(env, units=200, seed=SEED)
    assert [] == violations(report), report.summary()


# -- the server stalls ---------------------------------------------------------------------


async def test_backend_paused_mid_statement_keeps_every_unit_exactly_once(env: FaultEnv) -> None:
    with anyio.fail_after(30):
        report = await pause_storm(env, phase="statement", units=8, seed=SEED)
    assert [] == violations(report), report.summary()


async def test_backend_paused_during_commit_reports_the_outcome_unknown_and_never_retries(
    env: FaultEnv,
) -> None:
    with anyio.fail_after(30):
        report = await pause_storm(env, phase="commit", units=8, seed=SEED)
    assert [] == violations(report), report.summary()
