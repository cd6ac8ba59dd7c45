"""The guard refuses overlapping use of one session, before anything reaches the database.

Each test holds one task (the *holder*) inside an operation on a scope's
session, paused at an exact point by a :class:`~tests.gate.Gate`, then lets
1 or 49 other tasks of the same ``asyncio.gather`` try an operation on that
session. Exactly those overlapping callers get :class:`ConcurrentSessionError`;
the :class:`~tests.gate.Wire` shows that nothing was sent while they were
refused, and after the scope commits the table shows the holder's work and
none of theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from tasksession import ConcurrentSessionError, SessionManager

from .gate import Gate, Wire
from .models import User

pytestmark = pytest.mark.anyio

Caller = Callable[[AsyncSession, int, User], Awaitable[Any]]


def _rejected(i: int) -> str:
    return f"rejected-{i}"


async def _stream(session: AsyncSession, i: int, existing: User) -> None:
    result = await session.stream(select(User))
    await result.close()


async def _stream_scalars(session: AsyncSession, i: int, existing: User) -> None:
    result = await session.stream_scalars(select(User))
    await result.close()


async def _begin(session: AsyncSession, i: int, existing: User) -> None:
    await session.begin()


async def _add(session: AsyncSession, i: int, existing: User) -> None:
    session.add(User(name=_rejected(i)))


async def _add_all(session: AsyncSession, i: int, existing: User) -> None:
    session.add_all([User(name=_rejected(i))])


async def _expunge(session: AsyncSession, i: int, existing: User) -> None:
    session.expunge(existing)


async def _expunge_all(session: AsyncSession, i: int, existing: User) -> None:
    session.expunge_all()


async def _expire(session: AsyncSession, i: int, existing: User) -> None:
    session.expire(existing)


async def _expire_all(session: AsyncSession, i: int, existing: User) -> None:
    session.expire_all()


async def _transaction_commit(session: AsyncSession, i: int, existing: User) -> None:
    transaction = session.get_transaction()
    assert transaction is not None
    await transaction.commit()


async def _transaction_rollback(session: AsyncSession, i: int, existing: User) -> None:
    transaction = session.get_transaction()
    assert transaction is not None
    await transaction.rollback()


#: operation name reported by the error -> what a refused caller tries. Writes
#: would leave a ``rejected-N`` row (or delete ``existing``, or roll the
#: holder's row back) if they got through.
CALLERS: dict[str, tuple[str, Caller]] = {
    "execute": (
        "execute",
        lambda s, i, e: s.execute(insert(User).values(name=_rejected(i))),
    ),
    "scalar": (
        "scalar",
        lambda s, i, e: s.scalar(insert(User).values(name=_rejected(i)).returning(User.id)),
    ),
    "scalars": (
        "scalars",
        lambda s, i, e: s.scalars(insert(User).values(name=_rejected(i)).returning(User.id)),
    ),
    "get": ("get", lambda s, i, e: s.get(User, e.id, populate_existing=True)),
    "get_one": ("get_one", lambda s, i, e: s.get_one(User, e.id, populate_existing=True)),
    "stream": ("stream", _stream),
    "stream_scalars": ("stream_scalars", _stream_scalars),
    "flush": ("flush", lambda s, i, e: s.flush()),
    "commit": ("commit", lambda s, i, e: s.commit()),
    "rollback": ("rollback", lambda s, i, e: s.rollback()),
    "close": ("close", lambda s, i, e: s.close()),
    "aclose": ("aclose", lambda s, i, e: s.aclose()),
    "reset": ("reset", lambda s, i, e: s.reset()),
    "invalidate": ("invalidate", lambda s, i, e: s.invalidate()),
    "refresh": ("refresh", lambda s, i, e: s.refresh(e)),
    "merge": ("merge", lambda s, i, e: s.merge(User(name=_rejected(i)))),
    "merge_all": ("merge_all", lambda s, i, e: s.merge_all([User(name=_rejected(i))])),
    "delete": ("delete", lambda s, i, e: s.delete(e)),
    "delete_all": ("delete_all", lambda s, i, e: s.delete_all([e])),
    "run_sync": (
        "run_sync",
        lambda s, i, e: s.run_sync(lambda sync: sync.execute(insert(User).values(name="x"))),
    ),
    "connection": ("connection", lambda s, i, e: s.connection()),
    "begin": ("begin", _begin),
    "begin_nested": ("begin_nested", lambda s, i, e: s.begin_nested()),
    "transaction.commit": ("commit", _transaction_commit),
    "transaction.rollback": ("rollback", _transaction_rollback),
    "add": ("add", _add),
    "add_all": ("add_all", _add_all),
    "expunge": ("expunge", _expunge),
    "expunge_all": ("expunge_all", _expunge_all),
    "expire": ("expire", _expire),
    "expire_all": ("expire_all", _expire_all),
}
# merge_all() and delete_all() are new in SQLAlchemy 2.1; CI also runs on 2.0.
CALLERS = {
    kind: caller
    for kind, caller in CALLERS.items()
    if kind.startswith("transaction.") or hasattr(AsyncSession, caller[0])
}


@dataclass(frozen=True)
class Holder:
    """The operation the first task is paused in, and what the table holds afterwards."""

    operation: str
    gate_event: str
    expected_names: frozenset[str]
    run: Callable[[AsyncSession, User, Gate], Awaitable[None]]


async def _hold_execute(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    await session.execute(insert(User).values(name="holder"))


async def _hold_flush(session: AsyncSession, existing: User, gate: Gate) -> None:
    session.add(User(name="holder"))
    gate.arm()
    await session.flush()


async def _hold_commit(session: AsyncSession, existing: User, gate: Gate) -> None:
    session.add(User(name="holder"))
    gate.arm()
    await session.commit()


async def _hold_rollback(session: AsyncSession, existing: User, gate: Gate) -> None:
    await session.execute(insert(User).values(name="holder"))
    gate.arm()
    await session.rollback()


async def _hold_close(session: AsyncSession, existing: User, gate: Gate) -> None:
    await session.execute(insert(User).values(name="holder"))
    gate.arm()
    await session.close()


async def _hold_refresh(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    await session.refresh(existing)


async def _hold_get(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    await session.get(User, existing.id, populate_existing=True)


async def _hold_scalars(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    (await session.scalars(select(User))).all()


async def _hold_stream(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    result = await session.stream(select(User))
    await result.close()


async def _hold_merge(session: AsyncSession, existing: User, gate: Gate) -> None:
    gate.arm()
    # Not in the identity map: merge() SELECTs it (paused there), then adds it.
    await session.merge(User(id=existing.id + 1000, name="holder"))


_BOTH = frozenset({"existing", "holder"})
_EXISTING = frozenset({"existing"})

HOLDERS: dict[str, Holder] = {
    "execute": Holder("execute", "before_cursor_execute", _BOTH, _hold_execute),
    "flush": Holder("flush", "before_cursor_execute", _BOTH, _hold_flush),
    "commit": Holder("commit", "commit", _BOTH, _hold_commit),
    "rollback": Holder("rollback", "rollback", _EXISTING, _hold_rollback),
    "close": Holder("close", "rollback", _EXISTING, _hold_close),
    "refresh": Holder("refresh", "before_cursor_execute", _EXISTING, _hold_refresh),
    "get": Holder("get", "before_cursor_execute", _EXISTING, _hold_get),
    "scalars": Holder("scalars", "before_cursor_execute", _EXISTING, _hold_scalars),
    "stream": Holder("stream", "before_cursor_execute", _EXISTING, _hold_stream),
    "merge": Holder("merge", "before_cursor_execute", _BOTH, _hold_merge),
}


@dataclass
class Outcome:
    results: list[Any]
    sent_while_refusing: list[tuple[str, str]]
    names: set[str]
    violations: int


async def run_overlap(db: SessionManager, holder: Holder, caller: Caller, tasks: int) -> Outcome:
    """Gather ``tasks`` tasks on one scope's session: the first holds ``holder``, the rest call."""
    async with db.scope() as session:
        session.add(User(name="existing"))
    violations_before = db.statistics().concurrent_violations
    wire = Wire(db.engine)
    refusing: list[tuple[str, str]] = []
    with Gate(db.engine, holder.gate_event) as gate, wire.listening():
        async with db.scope(name="shared") as session:
            # The session holds a connection already: SQLAlchemy itself detects nothing now.
            existing = (await session.scalars(select(User))).one()
            callers_left = tasks - 1
            mark = 0

            async def hold() -> None:
                await holder.run(session, existing, gate)

            async def call(i: int) -> Any:
                nonlocal callers_left, mark
                await gate.reached.wait()
                if callers_left == tasks - 1:
                    mark = len(wire.sent)
                try:
                    return await caller(session, i, existing)
                finally:
                    callers_left -= 1
                    if callers_left == 0:
                        refusing.extend(wire.sent[mark:])
                        gate.open()

            with anyio.fail_after(10):
                results = await asyncio.gather(
                    hold(), *(call(i) for i in range(1, tasks)), return_exceptions=True
                )
    async with db.scope() as session:
        names = set((await session.scalars(select(User.name))).all())
    return Outcome(
        results=results,
        sent_while_refusing=refusing,
        names=names,
        violations=db.statistics().concurrent_violations - violations_before,
    )


def _assert_only_overlapping_callers_refused(
    outcome: Outcome, holder: Holder, operation: str, tasks: int
) -> None:
    assert outcome.results[0] is None, outcome.results[0]
    errors = outcome.results[1:]
    assert [ConcurrentSessionError] * (tasks - 1) == [type(e) for e in errors], errors
    assert {(holder.operation, operation)} == {
        (e.holder_operation, e.caller_operation) for e in errors
    }
    assert [] == outcome.sent_while_refusing
    assert holder.expected_names == outcome.names
    assert tasks - 1 == outcome.violations


def _cases(kinds: tuple[str, ...], holders: tuple[str, ...], callers: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(kind, holder, caller, tasks, id=f"{kind}-{holder}-vs-{caller}-x{tasks}")
        for kind in kinds
        for holder in holders
        for caller in callers
        for tasks in (2, 50)
    ]


EVERY_CALLER = tuple(CALLERS)
SQLITE_CALLERS = ("execute", "get", "flush", "commit", "rollback", "close", "add")


@pytest.mark.parametrize(
    ("database_url", "holder_name", "caller_name", "tasks"),
    [
        *_cases(("postgres",), ("execute",), EVERY_CALLER),
        *_cases(("postgres",), tuple(HOLDERS), ("execute", "rollback", "add")),
        *_cases(("sqlite",), ("execute",), SQLITE_CALLERS),
        *_cases(("sqlite",), ("flush", "commit", "rollback"), ("execute", "add")),
    ],
    indirect=["database_url"],
)
async def test_only_overlapping_callers_are_refused_and_send_nothing(
    db: SessionManager, holder_name: str, caller_name: str, tasks: int
) -> None:
    holder = HOLDERS[holder_name]
    operation, caller = CALLERS[caller_name]

    outcome = await run_overlap(db, holder, caller, tasks)

    _assert_only_overlapping_callers_refused(outcome, holder, operation, tasks)


async def test_gather_of_fifty_inserts_lets_the_first_through_and_refuses_the_rest(
    db: SessionManager,
) -> None:
    async with db.scope() as session:
        with anyio.fail_after(10):
            results = await asyncio.gather(
                *(session.execute(insert(User).values(name=f"user-{i}")) for i in range(50)),
                return_exceptions=True,
            )
    async with db.scope() as session:
        names = (await session.scalars(select(User.name))).all()

    assert [ConcurrentSessionError] * 49 == [type(r) for r in results[1:]]
    assert ["user-0"] == names


async def test_calls_one_after_another_from_several_tasks_are_allowed(
    pg_db: SessionManager,
) -> None:
    async with pg_db.scope() as session:

        async def insert_user(name: str) -> None:
            await session.execute(insert(User).values(name=name))

        for name in ("a", "b", "c"):
            await asyncio.create_task(insert_user(name))
    async with pg_db.scope() as session:
        names = (await session.scalars(select(User.name).order_by(User.name))).all()

    assert ["a", "b", "c"] == names


async def test_a_refused_caller_leaves_the_session_usable(pg_db: SessionManager) -> None:
    async with pg_db.scope() as session:
        with Gate(pg_db.engine, "before_cursor_execute") as gate:
            gate.arm()
            holder = asyncio.create_task(session.execute(text("SELECT 1")))
            with anyio.fail_after(10):
                await gate.reached.wait()
            with pytest.raises(ConcurrentSessionError):
                await session.execute(insert(User).values(name="refused"))
            gate.open()
            with anyio.fail_after(10):
                await holder
        await session.execute(insert(User).values(name="after"))
    async with pg_db.scope() as session:
        names = (await session.scalars(select(User.name))).all()

    assert ["after"] == names
