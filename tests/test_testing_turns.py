"""Savepoint isolation's turn-taking: concurrent scopes on one connection never interleave.

A derandomized program of nested, concurrent units (gather, task groups, independent
scopes in the same task; some fail) runs under ``isolated(db)``: no savepoint error,
no timeout, and exactly the rows a model of nested SAVEPOINTs predicts are visible
(a unit's row stands when it and every unit it is nested in committed). Where a
failing unit undoes what units nested in it committed (which production would keep),
:class:`SavepointIsolationWarning` says so, once per such unit. The control shows
what the turn-taking prevents: the same connection without it fails with
``savepoint ... does not exist``.
"""

# Assertions read `expected == actual`, as in the test suite (STYLE.md).

from __future__ import annotations

import asyncio
import itertools
import random
import warnings
from dataclasses import dataclass, field

import anyio
import pytest
from sqlalchemy import exc, select

from tasksession import CommitOutcomeUnknownError, SessionManager
from tasksession.testing import SavepointIsolationWarning, isolated

from .models import User

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


@dataclass
class Model:
    """What a program of nested units should leave visible, and warn about."""

    #: Each unit's row, with the outcome flags of the units it is nested in and its own
    #: (a list filled with True or False when that unit ends).
    rows: list[tuple[str, list[list[bool]]]] = field(default_factory=list)
    undone_warnings: int = 0

    @property
    def visible(self) -> set[str]:
        """A row stands when its unit and every unit it is nested in committed."""
        return {name for name, chain in self.rows if all(flag == [True] for flag in chain)}


async def run_program(db: SessionManager, seed: int) -> Model:
    rng = random.Random(seed)
    names = itertools.count()
    model = Model()

    async def unit(depth: int, chain_committed: list[list[bool]]) -> bool:
        """One unit: write a row, run children (nested in it), maybe fail. True: committed."""
        name = f"u{next(names)}"
        fails = rng.random() < 0.3
        children = rng.randrange(0, 4) if depth < 2 else 0
        how = rng.choice(["gather", "task group", "same task"])
        mine: list[bool] = []  # filled in once this unit knows whether it committed
        results: list[bool] = []
        try:
            async with db.scope(independent=True) as session:
                session.add(User(name=name))
                await session.flush()  # from here on the unit holds the connection
                await asyncio.sleep(0)  # let the others try it meanwhile
                chain = [*chain_committed, mine]
                model.rows.append((name, chain))
                if how == "gather":
                    results = list(
                        await asyncio.gather(*(unit(depth + 1, chain) for _ in range(children)))
                    )
                elif how == "task group":

                    async def child() -> None:
                        results.append(await unit(depth + 1, chain))

                    async with anyio.create_task_group() as tg:
                        for _ in range(children):
                            tg.start_soon(child)
                else:
                    for _ in range(children):
                        results.append(await unit(depth + 1, chain))
                await session.execute(select(User.id).limit(1))
                if fails:
                    raise Boom(name)
        except Boom:
            mine.append(False)
            if any(results):  # what its children committed is undone with it
                model.undone_warnings += 1
            return False
        mine.append(True)
        return True

    top = rng.randrange(3, 6)
    await asyncio.gather(*(unit(0, []) for _ in range(top)))
    return model


@pytest.mark.parametrize("seed", range(4))
async def test_random_nested_concurrent_units_never_interleave(
    db: SessionManager, seed: int
) -> None:
    with anyio.fail_after(60), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with isolated(db):
            model = await run_program(db, seed)
            async with db.scope() as session:
                visible = set(await session.scalars(select(User.name)))
    assert model.visible == visible
    undone = [w for w in caught if issubclass(w.category, SavepointIsolationWarning)]
    assert model.undone_warnings == len(undone)
    assert [] == [w for w in caught if not issubclass(w.category, SavepointIsolationWarning)]
    async with db.scope() as session:
        assert [] == list(await session.scalars(select(User.name)))  # nothing persisted


async def failing_request_with_an_audit_row(db: SessionManager) -> None:
    with pytest.raises(Boom):
        async with db.scope(name="request") as session:
            session.add(User(name="request"))
            await session.flush()
            async with db.scope(independent=True, name="audit") as audit:
                audit.add(User(name="audit"))  # in production: committed, whatever follows
            raise Boom


async def test_the_warning_names_the_scopes(db: SessionManager) -> None:
    async with isolated(db):
        with pytest.warns(SavepointIsolationWarning) as caught:
            await failing_request_with_an_audit_row(db)
    message = str(caught[0].message)
    assert "scope 'request'" in message
    assert "scope 'audit'" in message
    assert 'mode="clone"' in message


async def test_without_taking_turns_savepoints_interleave(db: SessionManager) -> None:
    # The control: the same connection, sessions joining it in SAVEPOINTs, no turns:
    # SQLite loses a savepoint, asyncpg refuses the second of two overlapping commands.
    connection = await db.engine.connect()
    try:
        await connection.begin()
        async with db.bound_to(connection):
            both_wrote = anyio.Event()
            wrote: list[int] = []

            async def unit(n: int) -> None:
                async with db.scope() as session:
                    session.add(User(name=f"u{n}"))
                    await session.flush()
                    wrote.append(n)
                    if len(wrote) == 2:
                        both_wrote.set()
                    await both_wrote.wait()

            with pytest.raises(
                (exc.DBAPIError, CommitOutcomeUnknownError),
                match=r"savepoint|nested transaction|another operation",
            ):
                await asyncio.gather(unit(1), unit(2))
    finally:
        await connection.close()
