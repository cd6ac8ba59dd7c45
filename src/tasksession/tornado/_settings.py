"""What a handler's class and its Application say: the manager to use, the scope's name."""

from __future__ import annotations

import weakref
from typing import Any, Final

from tornado import web
from tornado.routing import Router

from tasksession import SessionManager, TaskSessionError

#: The ``Application`` setting that names the manager.
SETTING: Final = "session_manager"

# Scope names ("GET /notes/([0-9]+)") per application, by (handler class, method).
# Kept here rather than in the Application's __dict__, which belongs to Tornado
# and the user; an application that is garbage-collected takes its entry along.
_scope_names: weakref.WeakKeyDictionary[web.Application, dict[tuple[type, str], str]] = (
    weakref.WeakKeyDictionary()
)


class MissingSessionManagerError(TaskSessionError):
    """A handler using :class:`SessionMixin` found no :class:`SessionManager` to use."""

    __module__ = "tasksession.tornado"  # its public path, in tracebacks and the docs
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


def manager_of(handler: web.RequestHandler) -> SessionManager:
    """The handler class's :attr:`session_manager`, else the application setting.

    :raises MissingSessionManagerError: neither names a manager.
    """
    manager = getattr(handler, SETTING, None)
    if manager is None:
        manager = handler.application.settings.get(SETTING)
        if manager is None:
            raise MissingSessionManagerError(type(handler).__qualname__)
    return manager  # type: ignore[no-any-return]


def scope_name(handler: web.RequestHandler, method: str) -> str:
    """``"GET /notes/([0-9]+)"``: the method and the handler's route pattern (cached)."""
    app = handler.application
    names = _scope_names.get(app)
    if names is None:
        names = _scope_names[app] = {}
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


def _find_route(router: Any, handler_class: type) -> str | None:
    """The pattern of the first rule that leads to ``handler_class`` (nested routers too)."""
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
