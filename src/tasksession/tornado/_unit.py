"""One request's unit of work: its scope, and when and how it ends (:class:`RequestUnit`).

The handler keeps one :class:`RequestUnit` per request, under one attribute;
its hooks (``_execute``, ``finish``, ``send_error``, ``on_connection_close``)
decide *when* and call the unit's methods, which decide *how*. The unit holds
no reference to the handler (it is passed in), so the two form no reference
cycle: a finished request is freed by reference counting, not by the cycle
collector, whose passes a busy server pays for in throughput.

Tornado internals read or set here (each is listed, with why, in the mixin's
module docstring): ``_finished``, ``_headers_written``, ``_status_code``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from tornado import web
from tornado.concurrent import Future, chain_future

from tasksession import Scope

logger = logging.getLogger("tasksession.tornado")

# Where the request's scope stands: open, commit/rollback under way, ended.
OPEN, ENDING, ENDED = 1, 2, 3

DISCONNECTED = "the client disconnected"


class RequestUnit:
    """The request's scope and the state of its end.

    :param scope: the request's scope, entered by the task that runs the request.
    """

    __slots__ = ("disconnected", "failed", "finishing", "logged", "running", "scope", "state")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.state = OPEN
        #: ``send_error()`` was called: the response is an error, the unit rolls back.
        self.failed = False
        #: The client went away before the response was complete.
        self.disconnected = False
        #: The request's task is inside Tornado's ``_execute`` (the handler may be cancelled).
        self.running = False
        #: The task that ends the scope out of line (a deferred ``finish()``, a disconnect).
        self.finishing: asyncio.Future[None] | None = None
        #: The error already logged (a failed commit): not logged again when it resurfaces.
        self.logged: BaseException | None = None

    def must_commit_first(self, handler: web.RequestHandler) -> bool:
        """Whether the response has to wait for a commit: a success with work to commit."""
        scope = self.scope
        return (
            self.state == OPEN
            and not self.failed
            and not self.disconnected
            and handler.get_status() < 400
            and not scope.readonly
            and scope.pending
        )

    async def end(self, commit: bool, reason: BaseException | str | None = None) -> None:
        """End the scope, once (:meth:`Scope.end`); later calls do nothing."""
        if self.state != OPEN:
            return
        self.state = ENDING
        try:
            await self.scope.end(commit, reason)
        finally:
            self.state = ENDED

    async def conclude(self, handler: web.RequestHandler, *, sent: bool) -> None:
        """End the scope as the response says: commit a success, roll back an error.

        :param sent: the response went out already: what is left is rolled back
            (and, unless the response was an error, warned about).
        :raises Exception: the commit failed (or a readonly scope refused its
            unflushed writes).
        """
        if self.state != OPEN:
            return
        scope = self.scope
        if not scope.pending:
            await self.end(True)  # nothing to commit or roll back: no I/O
            return
        if self.disconnected:
            reason = DISCONNECTED
        elif self.failed or handler.get_status() >= 400:
            reason = f"the response status is {handler.get_status()}"
        elif not sent or scope.readonly:
            await self.end(True)  # commits; a readonly scope rolls back (it never commits)
            return
        else:
            reason = "the work was done after the response had been sent"
            logger.warning(
                "scope %r: database work done after the response was sent was rolled back "
                "(do it before finish(), or in a scope of its own)",
                scope.name,
            )
        await self.end(False, reason)

    async def conclude_and_finish(self, handler: web.RequestHandler) -> None:
        """After the handler returned: end the scope, then send the response.

        Used when there is something to commit, and for a readonly scope (which
        gives its connection back before Tornado formats and sends the response,
        not after). A failure answers a 500 instead.
        """
        try:
            await self.conclude(handler, sent=False)
        except Exception as error:  # noqa: BLE001 - whatever failed, the answer is a 500
            self.failed_to_end(handler, error)
            return
        self.finish_now(handler, handler.finish)

    def finish_now(
        self, handler: web.RequestHandler, finish: Callable[[], Future[None]]
    ) -> Future[None] | None:
        """Call ``finish`` outside Tornado's error handling, handling its errors as Tornado would.

        :param finish: the handler's ``finish``, or (to resume a ``finish()`` call
            deferred for the commit) the one after the mixin's in the MRO, so the
            overrides it already went through do not run twice.
        """
        try:
            return finish()
        except Exception as error:  # noqa: BLE001 - e.g. a body with a 204, as in Tornado
            handler.log_exception(type(error), error, error.__traceback__)
            self.logged = error
            if not handler._finished:
                handler.send_error(500, exc_info=(type(error), error, error.__traceback__))
            return None

    def failed_to_end(self, handler: web.RequestHandler, error: BaseException) -> None:
        """Answer a failed commit: a 500 through send_error, or abort a streamed response."""
        handler.log_exception(type(error), error, error.__traceback__)
        self.logged = error
        if handler._headers_written:
            self.abort(handler)
        else:
            handler.send_error(500, exc_info=(type(error), error, error.__traceback__))

    def abort(self, handler: web.RequestHandler) -> None:
        """Close the connection without completing the response (its headers already said 2xx)."""
        connection: Any = handler.request.connection
        connection.set_close_callback(None)
        handler._status_code = 500  # for the access log: the 2xx on the wire was not kept
        connection.close()
        handler._finished = True
        handler.application.log_request(handler)
        handler.on_finish()

    async def commit_then_finish(
        self,
        handler: web.RequestHandler,
        finish: Callable[[], Future[None]],
        chunk_future: Future[None],
    ) -> None:
        """Commit, then resume the deferred ``finish()``; runs as a task ``finish()`` started.

        :param finish: Tornado's ``finish`` (the one after the mixin's in the MRO).
        :param chunk_future: the future that deferred ``finish()`` returned.
        """
        try:
            await self.conclude(handler, sent=False)
        except Exception as failure:  # noqa: BLE001 - whatever failed, the answer is a 500
            handler._finished = False  # set by the deferred finish(): let send_error run
            self.failed_to_end(handler, failure)
            error: BaseException | None = failure
        else:
            handler._finished = False  # set by the deferred finish(): let Tornado's run now
            flushed = self.finish_now(handler, finish)
            if flushed is not None:
                chain_future(flushed, chunk_future)
                return
            error = self.logged
        assert error is not None
        if not chunk_future.done():
            chunk_future.set_exception(error)
            chunk_future.exception()  # awaiting it raises; not awaiting it is fine too

    def client_gone(self, cancel: bool, grace: float) -> None:
        """The client disconnected: roll back, and cancel the handler if ``cancel``.

        :param grace: seconds a statement in flight may take to return first.
        """
        if self.state != OPEN or self.disconnected:
            return
        self.disconnected = True
        if not cancel:
            self.finishing = asyncio.ensure_future(self.end(False, DISCONNECTED))
            return
        scope = self.scope
        task = scope.owner  # the task running the request (it entered the scope)
        if scope.operation_in_flight and scope.holds_connection:
            self.finishing = asyncio.ensure_future(self.cancel_when_idle(task, grace))
        else:
            # Nothing runs on a connection (the handler awaits something else, or
            # waits for a connection from the pool): stopping it costs nothing, and
            # the scope's exit rolls back.
            self.cancel_handler(task)

    async def cancel_when_idle(self, task: asyncio.Task[Any] | None, grace: float) -> None:
        """Let the statement in flight return, roll back, then cancel the handler.

        Cancelling a task inside a round trip makes SQLAlchemy invalidate the
        connection, and the pool then opens a new one: clients giving up under
        load would turn into a storm of reconnects. So the statement already
        running may finish (within ``grace`` seconds; after that it is cut off,
        and cancelled on the server), the scope rolls back and returns its
        connection intact, and then the handler is cancelled (if it uses
        ``self.session`` meanwhile, that raises ScopeClosedError).
        """
        ending = asyncio.ensure_future(self.end(False, DISCONNECTED))
        await asyncio.wait((ending,), timeout=grace)
        # The scope has ended, or the grace period is over (then this cuts the
        # statement off, and the scope's exit goes on once it was).
        self.cancel_handler(task)
        await ending

    def cancel_handler(self, task: asyncio.Task[Any] | None) -> None:
        """Cancel the request's task while it runs the handler (not once it ends the scope)."""
        if self.running and task is not None:
            task.cancel()
