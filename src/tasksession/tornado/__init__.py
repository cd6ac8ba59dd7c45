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

:class:`WebSocketSessionMixin` gives each ``open()`` and ``on_message()`` call
a scope of its own.

This package uses only the public API of :mod:`tasksession` (importing
:mod:`tasksession` never imports it, or tornado). Its private modules:
``_settings`` (the manager and the scope's name, from the handler and its
application), ``_unit`` (one request's scope and how it ends), ``_handler``
(:class:`SessionMixin`'s hooks, and the Tornado internals they rely on),
``_websocket``; imports run in that order, upwards.
"""

from ._handler import SessionMixin as SessionMixin
from ._settings import SETTING as SETTING
from ._settings import MissingSessionManagerError as MissingSessionManagerError
from ._websocket import WebSocketSessionMixin as WebSocketSessionMixin

__all__ = ["MissingSessionManagerError", "SessionMixin", "WebSocketSessionMixin"]
