"""Another database for a manager's scopes, for a while: the hook test isolation is built on.

:meth:`SessionManager.bound_to` swaps the manager's :class:`~._config.Binding` for
one made here from the current settings: on a connection inside a transaction
(every session joins it in SAVEPOINTs), on an engine, or on a URL.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._commit import CommitWatchdog
from ._config import Binding, create_binding

__all__ = ["binding_for"]


def binding_for(
    previous: Binding,
    target: AsyncConnection | AsyncEngine | str | URL,
    session_class: type[AsyncSession],
) -> Binding:
    """``previous``'s settings on another database (``SessionManager.bound_to``).

    ``target``: a connection inside a transaction (:func:`connection_binding`), an
    engine (used as it is), or a URL (an engine with the same settings, no replicas).
    """
    if isinstance(target, AsyncConnection):
        if not target.in_transaction():
            raise ValueError(
                "bound_to(connection) needs a connection inside a transaction: "
                "`connection = await engine.connect(); await connection.begin()`"
            )
        return connection_binding(previous, target, session_class)
    options = replace(previous.options, replicas=())
    if isinstance(target, AsyncEngine):
        return create_binding(None, target, options, {}, session_class)
    return create_binding(target, None, options, previous.engine_kwargs, session_class)


def connection_binding(
    previous: Binding, connection: AsyncConnection, session_class: type[AsyncSession]
) -> Binding:
    """``previous``'s configuration, with every session joining ``connection``'s transaction.

    Readonly scopes and replicas use the connection too (it is the test's whole
    database); ``commit_timeout`` is off: a COMMIT here is a RELEASE, which the
    ``session_class`` may make wait for its turn on the connection.

    :param session_class: the guarded class scopes create (``session_class_for``).
    """
    join = {"join_transaction_mode": "create_savepoint"}
    bind: Any = connection  # sessions accept a connection wherever they take an engine
    return replace(
        previous,
        write_engine=bind,
        readonly_engine=bind,
        replica_engines=(),
        replica_readonly_engines=(),
        extra_engines=(),
        owns_engines=False,
        options=replace(previous.options, commit_timeout=None, replicas=()),
        session_class=session_class,
        session_kwargs={**previous.session_kwargs, **join},
        write_session_kwargs={**previous.write_session_kwargs, **join},
        commit_watchdog=CommitWatchdog(),
        replica_turn=itertools.count(),
    )
