"""Pause a database operation at an exact point, and record what reaches the database.

SQLAlchemy's sync event hooks run inside the greenlet of the task that awaited
the ``AsyncSession`` method, so a hook can block on an async event with
:func:`sqlalchemy.util.await_only`. A :class:`Gate` uses that to hold one
operation in flight (the session is then "busy" for the guard) for as long
as the test needs; a :class:`Wire` records every statement, COMMIT, ROLLBACK
and pool checkout the engine performs, with the task that caused it, so a
test can show that a refused operation sent nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

#: Engine events a :class:`Gate` can stop at (all run inside the greenlet).
GATE_EVENTS = ("before_cursor_execute", "commit", "rollback")


class Gate:
    """Hold the next ``event_name`` on ``engine`` until :meth:`open` is called.

    Only the first occurrence after :meth:`arm` stops; later ones pass.
    """

    def __init__(self, engine: AsyncEngine, event_name: str) -> None:
        assert event_name in GATE_EVENTS
        self._target = engine.sync_engine
        self._event_name = event_name
        self._armed = False
        self.reached = anyio.Event()
        self._released = anyio.Event()
        self.held_task: asyncio.Task[Any] | None = None

    def arm(self) -> None:
        self._armed = True

    def open(self) -> None:
        self._released.set()

    def _hook(self, *args: Any, **kwargs: Any) -> None:
        if not self._armed:
            return
        self._armed = False
        self.held_task = asyncio.current_task()
        self.reached.set()
        await_only(self._released.wait())

    def __enter__(self) -> Gate:
        event.listen(self._target, self._event_name, self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
        event.remove(self._target, self._event_name, self._hook)


class Wire:
    """Record what an engine sends: statements, COMMIT/ROLLBACK, pool checkouts."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.sync_engine
        self.sent: list[tuple[str, str]] = []

    def _record(self, what: str) -> Any:
        def listener(*args: Any, **kwargs: Any) -> None:
            task = asyncio.current_task()
            self.sent.append((task.get_name() if task else "?", what))

        return listener

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        task = asyncio.current_task()
        self.sent.append((task.get_name() if task else "?", statement))

    @contextmanager
    def listening(self) -> Iterator[Wire]:
        hooks: list[tuple[Any, str, Any]] = [
            (self._engine, "before_cursor_execute", self._statement),
            (self._engine, "commit", self._record("COMMIT")),
            (self._engine, "rollback", self._record("ROLLBACK")),
            (self._engine.pool, "checkout", self._record("checkout")),
        ]
        for target, name, fn in hooks:
            event.listen(target, name, fn)
        try:
            yield self
        finally:
            for target, name, fn in hooks:
                event.remove(target, name, fn)

    def by_task(self, task_name: str) -> list[str]:
        return [what for name, what in self.sent if name == task_name]
