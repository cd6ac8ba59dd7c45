"""Generated programs of scopes, task groups, gathers, errors and cancellations, on PostgreSQL.

Hypothesis generates small programs (:class:`Program`): nested (joined), savepoint and
independent scopes, ``db.task_group()`` children, gathers of tasks sharing one session,
errors raised in blocks (caught around a scope, or not), and cancellations of every kind
(an anyio cancel scope, a native ``Task.cancel()``, :func:`asyncio.timeout`), either at
a fixed point of a block or after a seeded number of event-loop iterations (which lands
anywhere: mid-statement, in a savepoint's RELEASE, in the COMMIT).

Each program runs on real PostgreSQL and every insert writes a row named after its
place in the program. Two checks:

* **the invariants**, always: given which scopes the program was told committed
  (a normal exit, or ``tasksession_outcome == "committed"`` on a cancellation; an
  outcome reported unknown is counted apart), the rows that must exist exist, no other
  row exists, none twice; no connection checked out, no scope open, no backend idle
  in transaction, no warning, every cancellation obeyed within 1 s;
* **the model's predictions**, for programs without a delayed cancellation: which
  scopes commit (joined scopes commit with the outer one, a savepoint block that
  raises is rolled back to its savepoint, an independent scope commits on its own,
  a ``task_group`` child when it returns), which inserts run, what each gather child
  gets (the first one runs, the others get :class:`~tasksession.ConcurrentSessionError`)
  and what each top-level step raises.

One event loop (an :class:`asyncio.Runner`) and one manager serve all examples, as in a
long-lived application; ``derandomize=True`` makes the programs the same on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel
import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasksession import ConcurrentSessionError, SessionManager

from .faults import (
    HANG_SLACK,
    FaultRow,
    fault_manager,
    idle_in_transaction,
    recording_warnings,
    reported_outcome,
    reset_fault_table,
)

Path = tuple[int | str, ...]
Region = Literal["anyio", "task", "timeout"] | None
Kind = Literal["own", "joined", "savepoint"]

# -- programs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Insert:
    """Insert this step's row: a Core INSERT, an ORM add + flush, or an ORM add left pending."""

    how: Literal["core", "flush", "pending"]


@dataclass(frozen=True)
class Fail:
    """Raise :class:`UserError` here."""


@dataclass(frozen=True)
class CancelHere:
    """Cancel the innermost cancellable region of this task, here (no-op if there is none)."""


@dataclass(frozen=True)
class CancelLater:
    """Cancel the innermost cancellable region of this task ``iterations`` loop passes from now.

    The code goes on meanwhile: the cancellation lands in what comes next, often the
    next statement or the scope's exit (its COMMIT, its RELEASE), or never if the
    region has ended by then.
    """

    iterations: int


@dataclass(frozen=True)
class Gather:
    """``asyncio.gather`` of ``width`` tasks that each insert a row through the shared session."""

    width: int


@dataclass(frozen=True)
class ScopeStep:
    """``async with db.scope(...)`` around ``body``, maybe inside a cancellable region.

    ``catch``: the code around the block catches a :class:`UserError` from it.
    """

    kind: Literal["nested", "savepoint", "independent"]
    body: tuple[Step, ...]
    catch: bool
    region: Region


@dataclass(frozen=True)
class GroupStep:
    """``async with db.task_group() as tg``, one child per entry of ``children``."""

    children: tuple[tuple[Step, ...], ...]
    catch: bool
    region: Region


Step = Insert | Fail | CancelHere | CancelLater | Gather | ScopeStep | GroupStep


@dataclass(frozen=True)
class Program:
    """Top-level steps, each run on its own; ``delayed``: (region ordinal, loop iterations).

    With ``delayed``, the region opened ``ordinal``-th is cancelled after that many
    event-loop iterations, wherever its code is by then.
    """

    steps: tuple[ScopeStep | GroupStep, ...]
    delayed: tuple[int, int] | None


class UserError(Exception):
    """The error a :class:`Fail` step raises."""


def only_user_errors(error: BaseException) -> bool:
    """Whether ``error`` is a :class:`UserError` or a group of nothing else (a task group's)."""
    if isinstance(error, BaseExceptionGroup):
        return all(only_user_errors(e) for e in error.exceptions)
    return isinstance(error, UserError)


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions in ``error``, looking inside exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def describe(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if only_user_errors(error):
        return "UserError"
    return type(error).__name__


# -- strategies -------------------------------------------------------------------------

MAX_DEPTH = 3
REGIONS: list[Region] = [None, "anyio", "task", "timeout"]


@functools.cache
def block(depth: int, in_group: bool, min_size: int = 0) -> st.SearchStrategy[tuple[Step, ...]]:
    """Steps of a block at ``depth`` (inside a scope); no task group inside a task group.

    Weighted (a strategy listed twice is drawn twice as often) towards inserts and
    nested scopes, so that most programs have rows whose fate depends on how the
    scopes around them ended.
    """
    insert = st.builds(Insert, st.sampled_from(["core", "flush", "pending"]))
    steps: list[st.SearchStrategy[Step]] = [
        insert,
        insert,
        insert,
        st.just(Fail()),
        st.just(Fail()),
        st.just(CancelHere()),
        st.builds(CancelLater, st.integers(0, 4)),
        st.builds(Gather, st.integers(2, 3)),
    ]
    if depth < MAX_DEPTH:
        inner = scope_step(depth + 1, in_group)
        steps += [inner, inner, inner]
        if not in_group:
            steps.append(group_step(depth + 1))
    return st.lists(st.one_of(steps), min_size=min_size, max_size=5 if depth < 2 else 3).map(tuple)


@functools.cache
def scope_step(depth: int, in_group: bool) -> st.SearchStrategy[ScopeStep]:
    return st.builds(
        ScopeStep,
        kind=st.sampled_from(["nested", "savepoint", "independent"]),
        body=block(depth, in_group, min_size=1),
        catch=st.sampled_from([True, True, False]),
        region=st.sampled_from(REGIONS),
    )


@functools.cache
def group_step(depth: int) -> st.SearchStrategy[GroupStep]:
    return st.builds(
        GroupStep,
        children=st.lists(block(depth, True), min_size=1, max_size=3).map(tuple),
        catch=st.sampled_from([True, True, False]),
        region=st.sampled_from(REGIONS),
    )


programs = st.builds(
    Program,
    steps=st.lists(st.one_of(scope_step(1, False), group_step(1)), min_size=1, max_size=4).map(
        tuple
    ),
    delayed=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(0, 30))),
)

# -- what a run (or the model) says happened -----------------------------------------------


@dataclass
class Trace:
    """Scopes (resolved kind, outcome), inserts, gathers and top-level results, by path."""

    scopes: dict[Path, tuple[Kind, str]] = field(default_factory=dict)
    parents: dict[Path, Path | None] = field(default_factory=dict)  # savepoint/joined -> outer
    inserts: dict[Path, str] = field(default_factory=dict)  # "started" | "completed"
    insert_how: dict[Path, str] = field(default_factory=dict)
    insert_scope: dict[Path, Path] = field(default_factory=dict)
    gathers: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    tops: dict[Path, str] = field(default_factory=dict)
    unpredictable: set[Path] = field(default_factory=set)  # subtrees the model leaves open

    def predicted(self, path: Path) -> bool:
        return not any(path[: len(p)] == p for p in self.unpredictable)


def resolve(kind: str, outer: Path | None) -> Kind:
    """What ``db.scope(...)`` opens, given the open scope of this task (``outer``)."""
    if outer is None or kind == "independent":
        return "own"
    return "savepoint" if kind == "savepoint" else "joined"


def clean_outcome(kind: Kind) -> str:
    return {"own": "committed", "savepoint": "released", "joined": "joined"}[kind]


def exit_outcome(kind: Kind, error: BaseException, inherited: bool) -> str:
    """What the caller learns from a scope exit that raised ``error``.

    ``inherited``: ``error`` already left an inner scope of this program carrying a
    ``tasksession_outcome``: that mark is the inner scope's (the innermost scope a
    cancellation leaves records its outcome), not this one's.
    """
    if kind == "joined":
        return "joined"
    outcome = "rolled_back" if inherited else reported_outcome(error)
    if kind == "savepoint":
        return {"committed": "released", "unknown": "unknown"}.get(outcome, "rolled_back")
    return outcome


def stated_outcome(kind: Kind, scope: Any) -> str | None:
    """``scope.outcome`` in the trace's terms, or None (not recorded, or not offered)."""
    stated = getattr(scope, "outcome", None)
    if stated is None or kind == "joined":
        return None
    if stated == "committed":
        return "released" if kind == "savepoint" else "committed"
    return {"rolled back": "rolled_back", "unknown": "unknown"}.get(str(stated), str(stated))


def fate(trace: Trace, insert_path: Path) -> Literal["must", "must_not", "may"]:
    """Whether the row of ``insert_path`` must exist, must not, or may, given ``trace``."""
    state = trace.inserts.get(insert_path)
    if state is None:
        return "must_not"
    node: Path | None = trace.insert_scope[insert_path]
    uncertain = False
    while node is not None:
        kind, outcome = trace.scopes.get(node, ("own", "pending"))
        if outcome == "rolled_back":
            return "must_not"
        if outcome in ("unknown", "pending"):
            uncertain = True
        if kind == "own":
            break
        node = trace.parents[node]
    if uncertain:
        return "may"
    if state == "completed":
        return "must"
    # Started, never finished: a Core INSERT was not sent, or its connection was
    # lost (then its transaction cannot commit); an ORM object whose flush was
    # cancelled before any I/O stays pending and may be flushed by the COMMIT.
    return "must_not" if trace.insert_how[insert_path] == "core" else "may"


# -- the model ----------------------------------------------------------------------------


class _Raised(Exception):
    """The model's view of a UserError propagating."""


class _Cancelled(Exception):
    """The model's view of the cancellation of region ``path`` propagating."""

    def __init__(self, region: Path) -> None:
        self.region = region


def predict(program: Program) -> Trace:
    """Run ``program`` in the model: what must happen when no cancellation is delayed."""
    trace = Trace()

    def run_block(
        steps: tuple[Step, ...], path: Path, node: Path, regions: tuple[Path, ...]
    ) -> None:
        for index, step in enumerate(steps):
            run_step(step, (*path, index), node, regions)

    def run_step(step: Step, path: Path, node: Path | None, regions: tuple[Path, ...]) -> None:
        if isinstance(step, Insert):
            assert node is not None
            trace.inserts[path] = "completed"
            trace.insert_how[path] = step.how
            trace.insert_scope[path] = node
        elif isinstance(step, Fail):
            raise _Raised()
        elif isinstance(step, CancelHere):
            if regions:
                raise _Cancelled(regions[-1])
        elif isinstance(step, CancelLater):
            pass  # the model's predictions are only checked when it never fired
        elif isinstance(step, Gather):
            assert node is not None
            # The first task's statement is in flight when the others try: refused.
            trace.gathers[path] = ("ok",) + ("ConcurrentSessionError",) * (step.width - 1)
            for index in range(step.width):
                child = (*path, index)
                trace.inserts[child] = "completed" if index == 0 else "started"
                trace.insert_how[child] = "core"
                trace.insert_scope[child] = node
        elif isinstance(step, ScopeStep):
            inner_regions = (*regions, path) if step.region else regions
            try:
                try:
                    kind = resolve(step.kind, node)
                    trace.parents[path] = None if kind == "own" else node
                    try:
                        run_block(step.body, path, path, inner_regions)
                    except (_Raised, _Cancelled):
                        trace.scopes[path] = (kind, "joined" if kind == "joined" else "rolled_back")
                        raise
                    trace.scopes[path] = (kind, clean_outcome(kind))
                except _Raised:
                    if not step.catch:
                        raise
            except _Cancelled as cancelled:
                if cancelled.region != path:
                    raise
        else:
            run_group(step, path, regions)

    def run_group(step: GroupStep, path: Path, regions: tuple[Path, ...]) -> None:
        failed = False
        for index, child in enumerate(step.children):
            child_path = (*path, "c", index)
            trace.parents[child_path] = None
            try:
                run_block(child, child_path, child_path, ())
            except _Raised:
                failed = True
                trace.scopes[child_path] = ("own", "rolled_back")
            else:
                trace.scopes[child_path] = ("own", "committed")
        if failed:
            # A failing child cancels its siblings wherever they are: what they did
            # is not predicted (the invariants still hold them to what they reported).
            for index in range(len(step.children)):
                trace.unpredictable.add((*path, "c", index))
            if not step.catch:
                raise _Raised()

    for index, top in enumerate(program.steps):
        try:
            run_step(top, (index,), None, ())
        except _Raised:
            trace.tops[(index,)] = "UserError"
        else:
            trace.tops[(index,)] = "ok"
    return trace


# -- the real run -----------------------------------------------------------------------


@dataclass
class RegionHandle:
    kind: Region
    path: Path
    fire: Any = None
    fired_at: float | None = None
    exited_at: float | None = None
    delivered: bool = False
    active: bool = True
    late: bool = False  # fired by a timer, not at a fixed point of the program

    def cancel(self) -> None:
        if self.fired_at is None:
            self.fired_at = time.monotonic()
            self.fire()

    def cancel_after(self, iterations: int) -> None:
        """Cancel the region after ``iterations`` event-loop passes, if it is still open."""
        loop = asyncio.get_running_loop()

        def hop(left: int) -> None:
            if not self.active:
                return
            if left:
                loop.call_soon(hop, left - 1)
            else:
                self.late = True
                self.cancel()

        loop.call_soon(hop, iterations)


class Run:
    """Runs one program against the manager, recording what each scope's caller saw."""

    def __init__(self, db: SessionManager, program: Program, prefix: str) -> None:
        self.db = db
        self.program = program
        self.prefix = prefix
        self.trace = Trace()
        self.regions_opened = 0
        self.regions: list[RegionHandle] = []
        self.returned: dict[Path, bool] = {}
        self.foreign: list[str] = []  # errors of task groups other than their children's
        self.tagged: dict[int, BaseException] = {}  # errors that left a scope with a mark
        self.problems: list[str] = []

    def unit(self, path: Path) -> str:
        return f"{self.prefix}-" + ".".join(map(str, path))

    # -- cancellable regions --

    @contextlib.asynccontextmanager
    async def region(self, kind: Region, path: Path) -> AsyncIterator[RegionHandle | None]:
        if kind is None:
            yield None
            return
        handle = RegionHandle(kind, path)
        self.regions.append(handle)
        ordinal = self.regions_opened
        self.regions_opened += 1
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        delayed = self.program.delayed

        def arm() -> None:
            if delayed is not None and delayed[0] == ordinal:
                handle.cancel_after(delayed[1])

        try:
            if kind == "anyio":
                with anyio.CancelScope() as cancel_scope:
                    handle.fire = cancel_scope.cancel
                    arm()
                    yield handle
                handle.delivered = cancel_scope.cancelled_caught or handle.fired_at is None
            elif kind == "timeout":
                try:
                    async with asyncio.timeout(None) as timeout:
                        handle.fire = lambda: timeout.reschedule(loop.time())
                        arm()
                        yield handle
                except TimeoutError:
                    if handle.fired_at is None:
                        raise
                    handle.delivered = True
            else:
                handle.fire = task.cancel
                arm()
                try:
                    yield handle
                except asyncio.CancelledError:
                    if handle.fired_at is None:
                        raise
                    task.uncancel()
                    handle.delivered = True
        finally:
            handle.active = False
            handle.exited_at = time.monotonic()
        if handle.fired_at is not None and not handle.delivered and kind != "anyio":
            # Fired as the block ended: the request is pending on the task; take it here.
            with contextlib.suppress(asyncio.CancelledError):
                for _ in range(10):
                    await asyncio.sleep(0)
            if kind == "task" and task.cancelling():
                task.uncancel()

    # -- steps --

    async def run_block(
        self, steps: tuple[Step, ...], path: Path, node: Path, regions: tuple[RegionHandle, ...]
    ) -> None:
        for index, step in enumerate(steps):
            await self.run_step(step, (*path, index), node, regions)

    async def run_step(
        self, step: Step, path: Path, node: Path | None, regions: tuple[RegionHandle, ...]
    ) -> None:
        trace = self.trace
        if isinstance(step, Insert):
            assert node is not None
            trace.insert_how[path] = step.how
            trace.insert_scope[path] = node
            trace.inserts[path] = "started"
            session = self.db.session
            if step.how == "core":
                await session.execute(insert(FaultRow).values(unit=self.unit(path)))
            else:
                session.add(FaultRow(unit=self.unit(path)))
                if step.how == "flush":
                    await session.flush()
            trace.inserts[path] = "completed"
        elif isinstance(step, Fail):
            raise UserError(path)
        elif isinstance(step, CancelHere):
            if regions:
                regions[-1].cancel()
                for _ in range(100):  # the cancellation is delivered at one of these
                    await anyio.lowlevel.checkpoint()
                raise AssertionError(f"the cancellation of region {regions[-1].path} never arrived")
        elif isinstance(step, CancelLater):
            if regions:
                regions[-1].cancel_after(step.iterations)
        elif isinstance(step, Gather):
            assert node is not None
            await self.run_gather(step, path, node)
        elif isinstance(step, ScopeStep):
            await self.run_scope(step, path, node, regions)
        else:
            await self.run_group(step, path)

    async def run_gather(self, step: Gather, path: Path, node: Path) -> None:
        trace = self.trace

        async def child(index: int) -> None:
            child_path = (*path, index)
            trace.insert_how[child_path] = "core"
            trace.insert_scope[child_path] = node
            trace.inserts[child_path] = "started"
            # db.session in a child task: the parent's session, shared.
            await self.db.session.execute(insert(FaultRow).values(unit=self.unit(child_path)))
            trace.inserts[child_path] = "completed"

        results = await asyncio.gather(
            *(child(i) for i in range(step.width)), return_exceptions=True
        )
        trace.gathers[path] = tuple(
            "ConcurrentSessionError"
            if isinstance(r, ConcurrentSessionError)
            else describe(r if isinstance(r, BaseException) else None)
            for r in results
        )

    async def run_scope(
        self, step: ScopeStep, path: Path, node: Path | None, regions: tuple[RegionHandle, ...]
    ) -> None:
        trace = self.trace
        async with self.region(step.region, path) as handle:
            inner_regions = (*regions, handle) if handle is not None else regions
            try:
                kind = resolve(step.kind, node)
                trace.parents[path] = None if kind == "own" else node
                scope = self.db.scope(
                    savepoint=step.kind == "savepoint", independent=step.kind == "independent"
                )
                told = clean_outcome(kind)
                try:
                    async with scope:
                        await self.run_block(step.body, path, path, inner_regions)
                except BaseException as error:
                    told = exit_outcome(kind, error, id(error) in self.tagged)
                    if getattr(error, "tasksession_outcome", None) is not None:
                        self.tagged[id(error)] = error
                    raise
                finally:
                    # Scope.outcome, where offered, is the scope's own record: it
                    # decides (a savepoint released just before a cancellation
                    # arrived says so only there). What the caller was told must
                    # agree with it for an own scope.
                    stated = stated_outcome(kind, scope)
                    if stated is not None and kind == "own" and stated != told:
                        self.problems.append(
                            f"scope {path}: the caller was told {told}, scope.outcome is {stated}"
                        )
                    trace.scopes[path] = (kind, stated or told)
            except BaseException as error:
                if not (step.catch and only_user_errors(error)):
                    raise

    async def run_group(self, step: GroupStep, path: Path) -> None:
        trace = self.trace
        child_paths = [(*path, "c", index) for index in range(len(step.children))]
        async with self.region(step.region, path):
            group_error: BaseException | None = None
            try:
                async with self.db.task_group() as tg:
                    for child_path, child in zip(child_paths, step.children, strict=True):
                        trace.parents[child_path] = None
                        tg.start_soon(self.run_child, child, child_path, name=self.unit(child_path))
            except BaseException as error:
                group_error = error
                if not (step.catch and only_user_errors(error)):
                    raise
            finally:
                # A child commits when it returns. Its COMMIT failing would reach the
                # group's error as something else than the children's UserErrors (or
                # a cancellation): then which child it was is not known.
                foreign = group_error is not None and any(
                    not isinstance(leaf, UserError | asyncio.CancelledError)
                    for leaf in leaves(group_error)
                )
                if foreign and group_error is not None:
                    self.foreign.extend(describe(leaf) for leaf in leaves(group_error))
                for child_path in child_paths:
                    if self.returned.get(child_path):
                        outcome = "unknown" if foreign else "committed"
                    else:
                        outcome = "rolled_back"
                    trace.scopes[child_path] = ("own", outcome)

    async def run_child(self, steps: tuple[Step, ...], path: Path) -> None:
        self.returned[path] = False
        await self.run_block(steps, path, path, ())
        self.returned[path] = True

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        for index, top in enumerate(self.program.steps):
            try:
                await self.run_step(top, (index,), None, ())
            except BaseException as error:
                self.trace.tops[(index,)] = describe(error)
                while task.cancelling():  # a cancellation that escaped its region
                    task.uncancel()
            else:
                self.trace.tops[(index,)] = "ok"


# -- checking ---------------------------------------------------------------------------


@dataclass
class Machine:
    """The event loop, the manager and the checks shared by every example."""

    runner: asyncio.Runner
    db: SessionManager
    admin: AsyncEngine
    examples: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def check(self, program: Program) -> list[str]:
        self.examples += 1
        return self.runner.run(self._check(program, f"sm{self.examples}"))

    async def _check(self, program: Program, prefix: str) -> list[str]:
        problems: list[str] = []
        run = Run(self.db, program, prefix)
        with recording_warnings() as seen:
            try:
                with anyio.fail_after(20):
                    await run.run()
            except TimeoutError:
                problems.append("the program hung (> 20 s)")
        trace = run.trace
        problems.extend(run.problems)
        async with self.admin.connect() as conn:
            rows = dict(
                (unit, int(count))
                for unit, count in await conn.execute(
                    text("SELECT unit, count(*) FROM fault_rows WHERE unit LIKE :p GROUP BY unit"),
                    {"p": f"{prefix}-%"},
                )
            )
        for path in trace.inserts:
            unit = run.unit(path)
            expected = fate(trace, path)
            count = rows.pop(unit, 0)
            if count > 1:
                problems.append(f"row {unit} exists {count} times")
            if expected == "must" and count == 0:
                problems.append(f"row {unit} is missing: {self._chain(trace, path)}")
            if expected == "must_not" and count:
                problems.append(f"row {unit} exists but must not: {self._chain(trace, path)}")
        if rows:
            problems.append(f"rows no insert wrote: {sorted(rows)}")
        checked_out = self.db.statistics().pool_checked_out
        if checked_out:
            problems.append(f"{checked_out} connection(s) still checked out")
        if self.db.active_scopes():
            problems.append(f"scopes still open: {self.db.active_scopes()}")
        idle = await idle_in_transaction(self.admin, within=2.0)
        if idle:
            problems.append(f"backends idle in transaction: {idle}")
        for handle in run.regions:
            if handle.fired_at is not None and handle.exited_at is not None:
                late = handle.exited_at - handle.fired_at
                if late > HANG_SLACK:
                    problems.append(
                        f"region {handle.path} ({handle.kind}) ended {late:.2f}s after its cancel"
                    )
        problems.extend(f"warning: {w.category.__name__}: {w.message}" for w in seen)
        if not any(handle.late for handle in run.regions):
            problems.extend(self._compare(predict(program), trace))
        self._count(run)
        return problems

    @staticmethod
    def _chain(trace: Trace, path: Path) -> str:
        node: Path | None = trace.insert_scope[path]
        links = [f"insert {trace.inserts[path]} ({trace.insert_how[path]})"]
        while node is not None:
            kind, outcome = trace.scopes.get(node, ("own", "pending"))
            links.append(f"{kind} {node} {outcome}")
            if kind == "own":
                break
            node = trace.parents[node]
        return " <- ".join(links)

    @staticmethod
    def _compare(model: Trace, actual: Trace) -> list[str]:
        problems = []
        for name in ("scopes", "inserts", "gathers", "tops"):
            want: dict[Path, Any] = getattr(model, name)
            got: dict[Path, Any] = getattr(actual, name)
            for path in sorted(set(want) | set(got), key=str):
                if not model.predicted(path):
                    continue
                if want.get(path) != got.get(path):
                    problems.append(f"{name}[{path}]: model {want.get(path)}, run {got.get(path)}")
        return problems

    def _count(self, run: Run) -> None:
        stats = self.stats
        stats["programs"] = stats.get("programs", 0) + 1
        stats["late cancels"] = stats.get("late cancels", 0) + sum(h.late for h in run.regions)
        for kind, outcome in run.trace.scopes.values():
            key = f"{kind} {outcome}"
            stats[key] = stats.get(key, 0) + 1
        stats["inserts"] = stats.get("inserts", 0) + len(run.trace.inserts)
        for name in run.foreign:
            key = f"task group error {name}"
            stats[key] = stats.get(key, 0) + 1
        stats["cancels"] = stats.get("cancels", 0) + sum(
            h.fired_at is not None for h in run.regions
        )


@pytest.fixture(scope="module")
def machine(postgres_url: str) -> Iterator[Machine]:
    runner = asyncio.Runner()

    async def start() -> tuple[SessionManager, AsyncEngine]:
        admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT", pool_size=2)
        await reset_fault_table(admin)
        db = fault_manager(postgres_url, pool_size=20, max_overflow=20, pool_timeout=10)
        return db, admin

    db, admin = runner.run(start())
    machine = Machine(runner, db, admin)
    # The gathers make the guard log a warning each time it refuses a task (thousands
    # of lines in a failure report); errors still show.
    logger = logging.getLogger("tasksession")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield machine
    finally:
        logger.setLevel(level)
        print(f"state machine: {machine.stats}")

        async def stop() -> None:
            await db.dispose()
            await admin.dispose()

        runner.run(stop())
        runner.close()


def scope(kind: str, *body: Step, catch: bool = False, region: Region = None) -> ScopeStep:
    return ScopeStep(kind, tuple(body), catch=catch, region=region)  # type: ignore[arg-type]


def program(*steps: ScopeStep | GroupStep) -> Program:
    return Program(tuple(steps), delayed=None)


# Spelled out, run first on every run: the rules the model encodes, one program each.
EXAMPLES = {
    # an error caught around a savepoint block rolls back only the block
    "savepoint": program(
        scope("nested", Insert("core"), scope("savepoint", Insert("flush"), Fail(), catch=True))
    ),
    # a joined scope commits with the outer one, even if its block raised (caught outside)
    "joined": program(
        scope("nested", scope("nested", Insert("pending"), Fail(), catch=True), Insert("core"))
    ),
    # an independent scope commits on its own, whatever the outer one does
    "independent": program(scope("nested", scope("independent", Insert("core")), Fail())),
    # task-group children commit when they return; a failing one rolls back alone
    "task group": program(
        scope("nested", Insert("core")),
        GroupStep(((Insert("core"),), (Insert("flush"), Fail())), catch=True, region=None),
    ),
    # tasks sharing the session: the first runs, the others are refused, nothing is lost
    "gather": program(scope("nested", Insert("pending"), Gather(3), Insert("core"))),
    # a cancellation at a fixed point, of each kind, rolls back to the savepoint
    **{
        f"cancel {kind}": program(
            scope(
                "nested",
                Insert("core"),
                scope("savepoint", Insert("flush"), CancelHere(), region=kind),
                Insert("core"),
            )
        )
        for kind in ("anyio", "task", "timeout")
    },
    # a cancellation of each kind landing in the COMMIT: the caller is told it committed
    **{
        f"cancel in commit {kind}": program(
            scope("nested", Insert("core"), CancelLater(0), region=kind)
        )
        for kind in ("anyio", "task", "timeout")
    },
}


def with_examples(test: Any) -> Any:
    for example in EXAMPLES.values():
        test = hypothesis.example(program=example)(test)
    return test


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@with_examples
@given(program=programs)
def test_generated_programs_end_every_scope_exactly_once(
    machine: Machine, program: Program
) -> None:
    assert [] == machine.check(program)


def test_the_model_rolls_back_what_the_outer_scope_rolls_back_except_independent_scopes() -> None:
    # The model itself, on one program spelled out: joined and savepoint scopes in
    # an own scope that fails, an error caught around the savepoint, an independent scope.
    model = predict(
        program(
            scope(
                "nested",
                Insert("core"),
                scope("nested", Insert("pending")),
                scope("savepoint", Insert("flush"), Fail(), catch=True),
                scope("independent", Insert("core")),
                Fail(),
            )
        )
    )
    assert {
        (0, 0): "must_not",  # the outer scope rolled back (the last Fail)
        (0, 1, 0): "must_not",  # joined: rolled back with the outer
        (0, 2, 0): "must_not",  # rolled back to its savepoint
        (0, 3, 0): "must",  # independent: committed on its own
    } == {path: fate(model, path) for path in model.inserts}


def test_the_model_keeps_a_released_savepoint_with_the_committed_outer_scope() -> None:
    model = predict(program(scope("nested", scope("savepoint", Insert("flush")), Insert("core"))))
    assert {(0, 0, 0): "must", (0, 1): "must"} == {
        path: fate(model, path) for path in model.inserts
    }
