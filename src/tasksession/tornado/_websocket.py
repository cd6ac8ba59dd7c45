"""WebSocketSessionMixin: a scope per ``open()`` call and per ``on_message()`` call."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncSession
from tornado import websocket

from tasksession import SessionManager

from ._settings import manager_of, scope_name

# The callbacks that run in a scope of their own, by the word their scope's name ends in.
_CALLBACKS = (("open", "open"), ("message", "on_message"))


class WebSocketSessionMixin(websocket.WebSocketHandler):
    """Give a ``WebSocketHandler`` a scope per ``open()`` call and per ``on_message()`` call.

    ::

        class Feed(WebSocketSessionMixin, tornado.websocket.WebSocketHandler):
            async def on_message(self, message):
                self.session.add(Event(text=message))   # committed when on_message returns

    Each call commits when it returns and rolls back when it raises. The manager
    comes from :attr:`session_manager` or the ``session_manager`` application setting.
    """

    __module__ = "tasksession.tornado"  # its public path

    #: The :class:`SessionManager` to use; ``None``: the ``session_manager`` application setting.
    session_manager: ClassVar[SessionManager | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind, name in _CALLBACKS:
            method = cls.__dict__.get(name)
            if method is not None and method not in _wrappers:
                setattr(cls, name, _in_scope(kind, method))

    @property
    def session(self) -> AsyncSession:
        """The session of the running ``open()`` / ``on_message()`` call.

        :raises NoScopeError: used outside of ``open()`` and ``on_message()``.
        """
        return manager_of(self).session


# The wrappers _in_scope made: one that is assigned to a subclass is not wrapped again.
_wrappers: weakref.WeakSet[Callable[..., Awaitable[None]]] = weakref.WeakSet()


def _in_scope(kind: str, method: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    """Run ``method`` in a scope of its own: committed when it returns, rolled back if it raises."""

    @functools.wraps(method)
    async def run_in_scope(self: WebSocketSessionMixin, *args: Any, **kwargs: Any) -> None:
        manager = manager_of(self)
        route = scope_name(self, "WS")
        async with manager.scope(name=f"{route} {kind}"):
            result = method(self, *args, **kwargs)
            if inspect.isawaitable(result):
                await result

    _wrappers.add(run_in_scope)
    return run_in_scope
