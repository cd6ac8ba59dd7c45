"""The notes app: models, handlers and the ``Application`` factory."""

from __future__ import annotations

import html
import http.client
import os
from typing import Any

import tornado.escape
import tornado.web
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasksession import SessionManager
from tasksession.tornado import SessionMixin

DEFAULT_URL = "sqlite+aiosqlite:///notes.db"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200), unique=True)
    body: Mapped[str] = mapped_column(String(2000), default="")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "body": self.body}


def make_manager(url: str | None = None) -> SessionManager:
    """The app's manager: ``NOTES_DATABASE_URL`` or a SQLite file by default."""
    url = url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_URL)
    # On PostgreSQL, read-only requests skip BEGIN/ROLLBACK (see the Tornado docs page).
    fast_reads = url.startswith("postgresql+asyncpg")
    return SessionManager(url, readonly_autocommit=fast_reads)


async def create_tables(db: SessionManager) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


class BaseHandler(SessionMixin, tornado.web.RequestHandler):
    session_readonly = frozenset({"GET", "HEAD"})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Also used for a commit that failed: the client gets this page with a 500.
        reason = http.client.responses.get(status_code, "Error")
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, tornado.web.HTTPError) and error.reason:
            reason = error.reason
        if self.request.path.startswith("/api/"):
            self.finish({"error": reason, "status": status_code})
        else:
            self.finish(f"<h1>{status_code} {html.escape(reason)}</h1>")


class NotesApi(BaseHandler):
    async def get(self) -> None:
        notes = await self.session.scalars(select(Note).order_by(Note.id))
        self.write({"notes": [note.to_json() for note in notes]})

    async def post(self) -> None:
        data = tornado.escape.json_decode(self.request.body or b"{}")
        title = str(data.get("title", "")).strip()
        if not title:
            raise tornado.web.HTTPError(400, reason="title is required")
        note = Note(title=title, body=str(data.get("body", "")))
        self.session.add(note)
        await self.session.flush()  # assigns note.id; the commit happens before the 201 goes out
        self.set_status(201)
        self.set_header("Location", f"/api/notes/{note.id}")
        self.write(note.to_json())


class NoteApi(BaseHandler):
    async def get(self, ident: str) -> None:
        note = await self.session.get(Note, int(ident))
        if note is None:
            raise tornado.web.HTTPError(404, reason="no such note")
        self.write(note.to_json())

    async def delete(self, ident: str) -> None:
        note = await self.session.get(Note, int(ident))
        if note is None:
            raise tornado.web.HTTPError(404, reason="no such note")
        await self.session.delete(note)
        self.set_status(204)


class NotesPage(BaseHandler):
    async def get(self) -> None:
        notes = await self.session.scalars(select(Note).order_by(Note.id))
        items = "".join(
            f"<li><b>{html.escape(n.title)}</b> {html.escape(n.body)}</li>" for n in notes
        )
        self.write(
            "<!doctype html><title>Notes</title><h1>Notes</h1>"
            f"<ul>{items}</ul>"
            '<form method="post"><input name="title"> <input name="body">'
            "<button>Add</button></form>"
        )

    async def post(self) -> None:
        title = self.get_body_argument("title", "").strip()
        if not title:
            raise tornado.web.HTTPError(400, reason="title is required")
        self.session.add(Note(title=title, body=self.get_body_argument("body", "")))
        self.redirect("/", status=303)  # redirect() finishes: committed first


def make_app(db: SessionManager) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/", NotesPage),
            (r"/api/notes", NotesApi),
            (r"/api/notes/([0-9]+)", NoteApi),
        ],
        session_manager=db,
    )
