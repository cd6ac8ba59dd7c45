"""Tornado integration: one scope per request, committed before the response is sent.

The usual recipe, a session opened in ``prepare()`` and committed in
``on_finish()``, commits *after* the response went out (``on_finish`` runs
after ``finish()`` wrote it, is synchronous, and can run without
``prepare()``): a failing commit still answered 200 and the data is gone.
:class:`SessionMixin` instead

* opens the request's scope around Tornado's ``_execute`` (so it exists before
  ``prepare()`` and is closed however the request ends, whether or not
  ``prepare()`` ran or called ``super()``); the session itself is built on
  first use, so a handler that never touches it costs no session and no
  connection;
* commits when the response is about to be sent: after the handler method
  returned, or inside ``finish()`` when the handler (or ``render()``,
  ``redirect()``, ``raise Finish``) finishes it itself. A failed commit turns
  into a 500 through ``send_error``/``write_error`` and nothing is persisted;
* rolls back on a status >= 400, an exception, or a client disconnect (the
  handler's task is cancelled, so the connection goes back to the pool even
  if the handler is awaiting something else; a statement already running is
  let finish first, so the connection is not invalidated);
* for a streamed response (``flush()`` before ``finish()``), commits in
  ``finish()``; if that fails (or the handler fails after the headers went
  out) the connection is aborted, so the client sees an incomplete response
  rather than a complete 200.

This module uses only the public API of :mod:`tasksession`; importing
:mod:`tasksession` never imports it (or tornado).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, ClassVar, Final

from sqlalchemy.ext.asyncio import AsyncSession
from tornado import web, websocket
from tornado.concurrent import Future, chain_future
from tornado.routing import Router

from . import Scope, ScopeClosedError, SessionManager, TaskSessionError

__all__ = ["MissingSessionManagerError", "SessionMixin", "WebSocketSessionMixin"]

logger = logging.getLogger("tasksession.tornado")

#: The ``Application`` setting that names the manager.
SETTING: Final = "session_manager"

# The request scope's life: not opened, open, commit/rollback in progress, ended.
_NONE, _OPEN, _ENDING, _ENDED = 0, 1, 2, 3


class MissingSessionManagerError(TaskSessionError):
    """A handler using :class:`SessionMixin` found no :class:`SessionManager` to use."""

    error_code = "ts-tornado-manager"

    def __init__(self, handler: str) -> None:
        self.handler = handler
        super().__init__(
            f"{handler} uses self.session, but no SessionManager was given to it. "
            "Pass it to the Application, or set it on the handler class:\n\n"
            f"    app = tornado.web.Application(routes, {SETTING}=db)\n\n"
            f"    class {handler}(SessionMixin, tornado.web.RequestHandler):\n"
            f"        {SETTING} = db"
        )


class _NotCommitted(Exception):
    """Why a request's scope ends with a rollback (handed to the scope's exit)."""


def _find_route(router: Any, handler_class: type) -> str | None:
    for rule in getattr(router, "rules", ()):
        target = rule.target
        if target is handler_class:
            regex = getattr(rule.matcher, "regex", None)
            if regex is None:
                return repr(rule.matcher)
            pattern: str = regex.pattern
            return pattern[:-1] if pattern.endswith("$") else pattern
        if isinstance(target, Router):
            found = _find_route(target, handler_class)
            if found is not None:
                return found
    return None


def _scope_name(handler: web.RequestHandler, method: str) -> str:
    """``"GET /notes/([0-9]+)"``: the method and route pattern, cached per application."""
    app = handler.application
    names: dict[tuple[type, str], str] | None = app.__dict__.get("_tasksession_scope_names")
    if names is None:
        names = app.__dict__["_tasksession_scope_names"] = {}
    key = (type(handler), method)
    name = names.get(key)
    if name is None:
        route = (
            _find_route(app.wildcard_router, type(handler))
            or _find_route(app.default_router, type(handler))
            or type(handler).__qualname__
        )
        name = names[key] = f"{method} {route}"
    return name


def _manager_of(handler: web.RequestHandler) -> SessionManager:
    manager = getattr(handler, SETTING, None)
    if manager is None:
        manager = handler.application.settings.get(SETTING)
        if manager is None:
            raise MissingSessionManagerError(type(handler).__qualname__)
    return manager  # type: ignore[no-any-return]


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

    _ts_scope: Scope | None = None
    _ts_error: BaseException | None = None
    _ts_task: asyncio.Task[Any] | None = None
    _ts_state = _NONE
    _ts_failed = False
    _ts_disconnected = False
    _ts_running = False  # the request's task is inside Tornado's _execute (the handler)
    _ts_finishing: asyncio.Future[None] | None = None
    _ts_logged: BaseException | None = None

    @property
    def session(self) -> AsyncSession:
        """The request's session (created on first use).

        :raises MissingSessionManagerError: no manager was configured for the handler.
        :raises ScopeClosedError: the request's scope has ended (the response was decided).
        """
        scope = self._ts_scope
        if scope is None:
            error = self._ts_error
            if error is not None:
                raise error.with_traceback(None)
            _manager_of(self)  # raises the explanatory error if that is the problem
            raise RuntimeError(
                "self.session is available once Tornado executes the request (from "
                "prepare() on), not in __init__() or initialize()"
            )
        if scope.closed:
            raise ScopeClosedError(scope.name, "self.session")
        return scope.session  # type: ignore[no-any-return]

    # -- the request's life ---------------------------------------------------

    async def _execute(
        self, transforms: list[web.OutputTransform], *args: bytes, **kwargs: bytes
    ) -> None:
        method = self.request.method or "GET"
        try:
            manager = _manager_of(self)
            readonly = self.session_readonly
            if readonly.__class__ is not bool:
                readonly = method in readonly  # type: ignore[operator]
            scope = manager.scope(name=_scope_name(self, method), readonly=bool(readonly))
            await scope.__aenter__()
        except TaskSessionError as error:
            # No scope (no manager, manager not configured): the handler still runs;
            # self.session raises this error, so Tornado answers 500 and logs it.
            self._ts_error = error
            await super()._execute(transforms, *args, **kwargs)
            return
        self._ts_scope = scope
        self._ts_task = scope.owner  # the task running the request (it entered the scope)
        self._ts_state = _OPEN
        # Finishing after a normal return is done here, so the commit runs in this task.
        auto_finish = self._auto_finish
        self._auto_finish = False
        try:
            self._ts_running = True
            await super()._execute(transforms, *args, **kwargs)
            self._ts_running = False
            if auto_finish and not self._finished and not self._ts_disconnected:
                if self._ts_must_commit_first():
                    await self._ts_commit_and_finish()
                else:
                    if scope.readonly:
                        # Nothing to commit: the connection goes back before the
                        # response is written, not after.
                        await self._ts_end()
                    self._ts_finish_now()
            finishing = self._ts_finishing
            if finishing is not None:
                await finishing
        except BaseException as error:
            self._ts_running = False
            await self._ts_exit(error)
            raise
        await self._ts_end()

    def _ts_must_commit_first(self) -> bool:
        scope = self._ts_scope
        return (
            self._ts_state == _OPEN
            and not self._ts_failed
            and not self._ts_disconnected
            and self.get_status() < 400
            and scope is not None
            and not scope.readonly
            and scope.pending
        )

    async def _ts_exit(self, error: BaseException | None) -> None:
        """End the request's scope once: commit when ``error`` is None, else roll back."""
        if self._ts_state != _OPEN:
            return
        self._ts_state = _ENDING
        scope = self._ts_scope
        assert scope is not None
        try:
            if error is None:
                await scope.__aexit__(None, None, None)
            else:
                await scope.__aexit__(type(error), error, error.__traceback__)
        finally:
            self._ts_state = _ENDED

    async def _ts_end(self) -> None:
        """After the handler: roll back whatever was not committed before the response."""
        scope = self._ts_scope
        if self._ts_state != _OPEN or scope is None:
            return
        if not scope.pending:
            await self._ts_exit(None)  # nothing to commit or roll back: no I/O
            return
        if self._ts_disconnected:
            reason = "the client disconnected"
        elif self._ts_failed or self.get_status() >= 400:
            reason = f"the response status is {self.get_status()}"
        elif scope.readonly:
            await self._ts_exit(None)  # a clean exit: readonly scopes never commit
            return
        else:
            reason = "the work was done after the response had been sent"
            logger.warning(
                "scope %r: database work done after the response was sent was rolled back "
                "(do it before finish(), or in a scope of its own)",
                scope.name,
            )
        await self._ts_exit(_NotCommitted(f"rolled back: {reason}"))

    async def _ts_commit(self) -> BaseException | None:
        """Commit (ending the scope); return the failure instead of raising it."""
        if self._ts_disconnected:
            await self._ts_exit(_NotCommitted("rolled back: the client disconnected"))
            return None
        try:
            await self._ts_exit(None)
        except Exception as error:  # noqa: BLE001 - whatever failed, the answer is a 500
            return error
        return None

    async def _ts_commit_and_finish(self) -> None:
        error = await self._ts_commit()
        if error is None:
            self._ts_finish_now()
        else:
            self._ts_commit_failed(error)

    def _ts_finish_now(self, resumed: bool = False) -> Future[None] | None:
        """Finish outside Tornado's error handling, handling its errors as Tornado would.

        :param resumed: continue a ``finish()`` call that was deferred for the commit
            (skip the overrides it already went through), rather than start one.
        """
        try:
            if resumed:
                return super().finish()
            return self.finish()
        except Exception as error:  # noqa: BLE001 - e.g. a body with a 204, as in Tornado
            self.log_exception(type(error), error, error.__traceback__)
            self._ts_logged = error
            if not self._finished:
                self.send_error(500, exc_info=(type(error), error, error.__traceback__))
            return None

    def _ts_commit_failed(self, error: BaseException) -> None:
        """Answer a failed commit: a 500 through send_error, or abort a streamed response."""
        self.log_exception(type(error), error, error.__traceback__)
        self._ts_logged = error
        if self._headers_written:
            self._ts_abort()
        else:
            self.send_error(500, exc_info=(type(error), error, error.__traceback__))

    def _ts_abort(self) -> None:
        """Close the connection without completing the response (its headers already said 2xx)."""
        connection: Any = self.request.connection
        connection.set_close_callback(None)
        self._status_code = 500  # for the access log: the 2xx on the wire was not kept
        connection.close()
        self._finished = True
        self.application.log_request(self)
        self.on_finish()

    async def _ts_commit_then_finish(self, chunk_future: Future[None]) -> None:
        # Runs as a task started by finish(): finish() itself cannot wait.
        error = await self._ts_commit()
        self._finished = False
        if error is None:
            flushed = self._ts_finish_now(resumed=True)
            if flushed is not None:
                chain_future(flushed, chunk_future)
                return
            error = self._ts_logged
            assert error is not None
        else:
            self._ts_commit_failed(error)
        if not chunk_future.done():
            chunk_future.set_exception(error)
            chunk_future.exception()  # awaiting it raises; not awaiting it is fine too

    # -- Tornado hooks ----------------------------------------------------------

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        """Finish the response; commit first when there is something to commit.

        With something to commit, the response goes out once the commit succeeded
        (the returned future resolves when it was sent, as Tornado's does); if the
        commit fails, the client gets a 500 instead (or, for a streamed response,
        an aborted connection) and awaiting the future raises the commit error.
        """
        if self._ts_state != _OPEN or self._finished:
            return super().finish(chunk)
        if not self._ts_must_commit_first():
            scope = self._ts_scope
            if self._ts_failed and self._headers_written and scope is not None and scope.pending:
                # Failed after a 2xx went out: the rollback must not look like success.
                self._ts_abort()
                future: Future[None] = Future()
                future.set_result(None)
                return future
            return super().finish(chunk)
        if chunk is not None:
            self.write(chunk)
        self._finished = True  # as after Tornado's finish(): no more write() or finish()
        done: Future[None] = Future()
        self._ts_finishing = asyncio.ensure_future(self._ts_commit_then_finish(done))
        return done

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        """Send an error response; the request's transaction is rolled back."""
        self._ts_failed = True
        super().send_error(status_code, **kwargs)

    def on_connection_close(self) -> None:
        """The client went away: roll back (see :attr:`cancel_on_disconnect`)."""
        super().on_connection_close()
        if self._ts_state != _OPEN or self._ts_disconnected:
            return
        self._ts_disconnected = True
        rollback = _NotCommitted("rolled back: the client disconnected")
        if not self.cancel_on_disconnect:
            self._ts_finishing = asyncio.ensure_future(self._ts_exit(rollback))
            return
        scope = self._ts_scope
        assert scope is not None
        if scope.operation_in_flight and scope.holds_connection:
            self._ts_finishing = asyncio.ensure_future(self._ts_cancel_when_idle(rollback))
        else:
            # Nothing runs on a connection (the handler awaits something else, or
            # waits for a connection from the pool): stopping it costs nothing, and
            # the scope's exit rolls back.
            self._ts_cancel_handler()

    async def _ts_cancel_when_idle(self, rollback: _NotCommitted) -> None:
        """Let the statement in flight return, roll back, then cancel the handler.

        Cancelling a task inside a round trip makes SQLAlchemy invalidate the
        connection, and the pool then opens a new one: clients giving up under
        load would turn into a storm of reconnects. So the statement already
        running may finish (within :attr:`disconnect_grace` seconds; after that
        it is cut off, and cancelled on the server), the scope rolls back and
        returns its connection intact, and then the handler is cancelled (if it
        uses ``self.session`` meanwhile, that raises ScopeClosedError).
        """
        ending = asyncio.ensure_future(self._ts_exit(rollback))
        await asyncio.wait((ending,), timeout=self.disconnect_grace)
        # The scope has ended, or the grace period is over (then this cuts the
        # statement off, and the scope's exit goes on once it was).
        self._ts_cancel_handler()
        await ending

    def _ts_cancel_handler(self) -> None:
        """Cancel the request's task while it runs the handler (not once it ends the scope)."""
        task = self._ts_task
        if self._ts_running and task is not None:
            task.cancel()

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failed commit is logged once, when it happens; not again when it
        # surfaces from an awaited finish().
        if value is not None and value is self._ts_logged:
            return
        super().log_exception(typ, value, tb)


# -- WebSockets ------------------------------------------------------------------------


def _in_scope(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def run_in_scope(self: WebSocketSessionMixin, *args: Any, **kwargs: Any) -> None:
        manager = _manager_of(self)
        route = _scope_name(self, "WS")
        async with manager.scope(name=f"{route} {kind}"):
            result = method(self, *args, **kwargs)
            if inspect.isawaitable(result):
                await result

    run_in_scope._ts_wrapped = True  # type: ignore[attr-defined]
    return run_in_scope


class WebSocketSessionMixin(websocket.WebSocketHandler):
    """Give a ``WebSocketHandler`` a scope per ``open()`` call and per ``on_message()`` call.

    ::

        class Feed(WebSocketSessionMixin, tornado.websocket.WebSocketHandler):
            async def on_message(self, message):
                self.session.add(Event(text=message))   # committed when on_message returns

    Each call commits when it returns and rolls back when it raises. The manager
    comes from :attr:`session_manager` or the ``session_manager`` application setting.
    """

    #: The :class:`SessionManager` to use; ``None``: the ``session_manager`` application setting.
    session_manager: ClassVar[SessionManager | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind, name in (("open", "open"), ("message", "on_message")):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_ts_wrapped", False):
                setattr(cls, name, _in_scope(kind, method))

    @property
    def session(self) -> AsyncSession:
        """The session of the running ``open()`` / ``on_message()`` call.

        :raises NoScopeError: used outside of ``open()`` and ``on_message()``.
        """
        return _manager_of(self).session
