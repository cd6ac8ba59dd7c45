"""What a manager's scopes share: the ContextVar, the configuration, the counters.

The manager creates one :class:`ScopeHome` and hands it to every scope it opens;
scopes read and write it directly (a couple of slot accesses on every entry),
never the manager's private attributes.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._errors import NotConfiguredError
from ._stats import Ledger, ScopeRegistry

if TYPE_CHECKING:
    from ._config import Binding

__all__ = ["ScopeHome"]


class ScopeHome(Ledger):
    """What a manager's scopes share: created by the manager, read and written by its scopes.

    It is also the manager's :class:`~._stats.Ledger` (the counters are its own slots):
    every scope entry counts itself, and one attribute hop is cheaper than two.
    """

    __slots__ = (
        "binding",
        "current",
        "label",
        "loop",
        "open_scopes",
        "thread",
        "untouched",
        "wrote_at",
    )

    def __init__(self, label: str | None, key: int) -> None:
        super().__init__()
        #: The manager's name in the user's code, for messages (``None``: unknown).
        self.label = label
        self.current: ContextVar[Any] = ContextVar(f"tasksession.scope.{key}")
        #: When this task (or the task that started it) last committed a write.
        self.wrote_at: ContextVar[float] = ContextVar(f"tasksession.wrote_at.{key}")
        self.binding: Binding | None = None
        self.open_scopes = ScopeRegistry()
        #: The registry's scopes whose session was never used (see _stats): every
        #: scope entry adds itself here.
        self.untouched = self.open_scopes.untouched
        # The loop and thread scopes last ran on: asking that loop for its task
        # skips get_running_loop() (a getpid() system call on CPython 3.11).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = -1

    @property
    def ledger(self) -> Ledger:
        """The counters: this object itself."""
        return self

    def require_binding(self) -> Binding:
        """The current configuration; :class:`NotConfiguredError` if there is none."""
        binding = self.binding
        if binding is None:
            raise NotConfiguredError(self.label)
        return binding
