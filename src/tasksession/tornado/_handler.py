"""SessionMixin: the handler's hooks, which decide when the request's unit ends.

The request's state lives in one :class:`RequestUnit` under one attribute,
``_tasksession`` (the mixin adds no other names to handler classes).

Tornado internals this leaf relies on, and why (Tornado >= 6.3; CI runs the
Tornado tests on the oldest supported release too):

* ``RequestHandler._execute`` (overridden): the only place that runs around
  ``prepare()``, the handler method and the error handling alike, so the scope
  exists before ``prepare()`` and is closed however the request ends;
* ``_auto_finish`` (read, then set to False while the handler runs): Tornado's
  own ``finish()`` after a normal return would send the response before the
  commit; the mixin finishes itself, after committing;
* ``_finished`` (read; set while a deferred ``finish()`` commits, and when a
  response is aborted): whether the response was already decided;
* ``_headers_written`` (read): a streamed response already said 2xx, so a
  failure can only abort the connection, not answer a 500;
* ``_status_code`` (set when aborting): the access log shows 500, not the 2xx
  that was never completed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from types import TracebackType
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncSession
from tornado import web
from tornado.concurrent import Future

from tasksession import ReadOnlyScopeError, ScopeClosedError, SessionManager, TaskSessionError

from ._settings import manager_of, scope_name
from ._unit import OPEN, RequestUnit


class SessionMixin(web.RequestHandler):
    """Give a ``RequestHandler`` a request-scoped session: ``self.session``.

    ::

        class NoteHandler(SessionMixin, tornado.web.RequestHandler):
            session_readonly = {"GET", "HEAD"}     # optional

            async def post(self) -> None:
                self.session.add(Note(text=self.get_body_argument("text")))
                self.set_status(201)               # committed before the 201 is sent

        app = tornado.web.Application([(r"/notes", NoteHandler)], session_manager=db)

    The manager comes from the class attribute :attr:`session_manager` or the
    ``session_manager`` application setting. The request's scope is named after
    the method and the route (``"POST /notes"``). ``db.session`` inside the
    handler is the same session.
    """

    __module__ = "tasksession.tornado"  # its public path

    #: The :class:`SessionManager` to use; ``None``: the ``session_manager`` application setting.
    session_manager: ClassVar[SessionManager | None] = None
    #: ``True`` to run every request in a ``readonly=True`` scope, or the HTTP methods to
    #: (e.g. ``{"GET", "HEAD"}``): it never commits, and a write raises an error.
    session_readonly: ClassVar[bool | Collection[str]] = False
    #: On a client disconnect, cancel the handler's task (default), so its connection is
    #: back in the pool at once (a statement already running on it may finish first:
    #: :attr:`disconnect_grace`). ``False``: let the handler run on, and roll back and close
    #: the scope as soon as no operation is in flight (further use raises ScopeClosedError).
    cancel_on_disconnect: ClassVar[bool] = True
    #: Seconds a statement that is already running when the client disconnects may
    #: take to return before the handler is cancelled anyway: cancelling it inside
    #: the round trip costs the pooled connection (SQLAlchemy invalidates it) and a
    #: reconnect, so a short statement is let finish and its connection kept.
    disconnect_grace: ClassVar[float] = 1.0

    # The request's unit; the error that kept it from opening (self.session raises
    # it); None before Tornado executes the request.
    _tasksession: RequestUnit | TaskSessionError | None = None

    @property
    def session(self) -> AsyncSession:
        """The request's session (created on first use).

        :raises MissingSessionManagerError: no manager was configured for the handler.
        :raises ScopeClosedError: the request's scope has ended (the response was decided).
        """
        unit = self._tasksession
        if type(unit) is RequestUnit:
            scope = unit.scope
            if scope.closed:
                raise ScopeClosedError(scope.name, "self.session")
            return scope.session  # type: ignore[no-any-return]
        if isinstance(unit, TaskSessionError):
            raise unit.with_traceback(None)
        manager_of(self)  # raises the explanatory error if that is the problem
        raise RuntimeError(
            "self.session is available once Tornado executes the request (from "
            "prepare() on), not in __init__() or initialize()"
        )

    async def _execute(
        self, transforms: list[web.OutputTransform], *args: bytes, **kwargs: bytes
    ) -> None:
        method = self.request.method or "GET"
        try:
            manager = manager_of(self)
            readonly = self.session_readonly
            if readonly.__class__ is not bool:
                readonly = method in readonly  # type: ignore[operator]
            scope = manager.scope(name=scope_name(self, method), readonly=bool(readonly))
            await scope.__aenter__()
        except TaskSessionError as error:
            # No scope (no manager, manager not configured): the handler still runs;
            # self.session raises this error, so Tornado answers 500 and logs it.
            self._tasksession = error
            await super()._execute(transforms, *args, **kwargs)
            return
        unit = self._tasksession = RequestUnit(scope)
        # Finishing after a normal return is done here, so the commit runs in this task.
        auto_finish = self._auto_finish
        self._auto_finish = False
        try:
            unit.running = True
            await super()._execute(transforms, *args, **kwargs)
            unit.running = False
            if auto_finish and not self._finished and not unit.disconnected:
                if scope.readonly or unit.must_commit_first(self):
                    await unit.conclude_and_finish(self)
                else:
                    unit.finish_now(self, self.finish)
            if unit.finishing is not None:
                await unit.finishing
            await unit.conclude(self, sent=True)
        except BaseException as error:
            unit.running = False
            _explain_readonly(self, error)
            await unit.end(False, error)  # does nothing if the scope has ended
            raise
        finally:
            # An error kept for log_exception holds its traceback's frames, and
            # through them this handler: drop it, so no cycle outlives the request.
            unit.logged = None

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        """Finish the response; commit first when there is something to commit.

        With something to commit, the response goes out once the commit succeeded
        (the returned future resolves when it was sent, as Tornado's does); if the
        commit fails, the client gets a 500 instead (or, for a streamed response,
        an aborted connection) and awaiting the future raises the commit error.
        """
        unit = self._tasksession
        if type(unit) is not RequestUnit or unit.state != OPEN or self._finished:
            return super().finish(chunk)
        if not unit.must_commit_first(self):
            if unit.failed and self._headers_written and unit.scope.pending:
                # Failed after a 2xx went out: the rollback must not look like success.
                unit.abort(self)
                future: Future[None] = Future()
                future.set_result(None)
                return future
            return super().finish(chunk)
        if chunk is not None:
            self.write(chunk)
        self._finished = True  # as after Tornado's finish(): no more write() or finish()
        done: Future[None] = Future()
        unit.finishing = asyncio.ensure_future(unit.commit_then_finish(self, super().finish, done))
        return done

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        """Send an error response; the request's transaction is rolled back."""
        unit = self._tasksession
        if type(unit) is RequestUnit:
            unit.failed = True
        super().send_error(status_code, **kwargs)

    def on_connection_close(self) -> None:
        """The client went away: roll back (see :attr:`cancel_on_disconnect`)."""
        super().on_connection_close()
        unit = self._tasksession
        if type(unit) is RequestUnit:
            unit.client_gone(self.cancel_on_disconnect, self.disconnect_grace)

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Log an error as Tornado does; a failed commit only once, with notes of ours."""
        if value is not None:
            unit = self._tasksession
            if type(unit) is RequestUnit and value is unit.logged:
                # Logged when it happened; not again when it surfaces from an
                # awaited finish().
                return
            _explain_readonly(self, value)
        super().log_exception(typ, value, tb)


def _explain_readonly(handler: SessionMixin, error: BaseException) -> None:
    """Note on a :class:`ReadOnlyScopeError` of the request's scope that the way out is
    the handler's ``session_readonly``: a writable ``scope()`` inside the handler
    would join the request's readonly scope and fail alike.
    """
    unit = handler._tasksession
    if not isinstance(error, ReadOnlyScopeError) or type(unit) is not RequestUnit:
        return
    scope = unit.scope
    if not scope.readonly or error.scope_name != scope.name:
        return  # a readonly scope the handler opened itself: the error's fix applies
    method = handler.request.method or "GET"
    because = "is True" if handler.session_readonly is True else f"includes {method!r}"
    manager = scope.label or "manager"
    note = (
        f"The request's scope is readonly because {type(handler).__qualname__}."
        f"session_readonly {because}. To write in this request, leave {method!r} out "
        f"of session_readonly (a {manager}.scope() inside the handler joins the readonly "
        f"scope and fails alike; {manager}.scope(independent=True) commits on its own, "
        "whatever the response)."
    )
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)
