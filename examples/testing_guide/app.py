"""A small application to test: a Tornado handler, a fan-out, a queue worker."""

from __future__ import annotations

import tornado.web
from sqlalchemy import String, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasksession import SessionManager
from tasksession.tornado import SessionMixin

db = SessionManager()  # configured at start-up (or by the tests' conftest.py)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "guide_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))
    done: Mapped[bool] = mapped_column(default=False)


class NotesHandler(SessionMixin, tornado.web.RequestHandler):
    """POST text=... adds a note; committed before the 201 is sent."""

    session_manager = db

    async def post(self) -> None:
        self.session.add(Note(text=self.get_body_argument("text")))
        self.set_status(201)


async def import_notes(texts: list[str]) -> None:
    """Store the notes in parallel, each in a unit of work of its own."""

    async def store(text: str) -> None:
        db.session.add(Note(text=text))

    async with db.task_group() as tg:
        for text in texts:
            tg.start_soon(store, text)


async def mark_one_done(session: AsyncSession) -> bool:
    """A worker step (``run_worker``): mark the oldest open note done; False when none is left."""
    note = await session.scalar(
        select(Note)
        .where(Note.done.is_(False))
        .order_by(Note.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if note is None:
        return False
    note.done = True
    return True


async def open_notes() -> int:
    async with db.scope(readonly=True) as session:
        return int(await session.scalar(select(func.count()).where(Note.done.is_(False))) or 0)


async def reopen_all() -> None:
    async with db.scope() as session:
        await session.execute(update(Note).values(done=False))
