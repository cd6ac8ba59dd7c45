"""The open scopes of a manager: untouched ones held strongly, the others weakly.

The manager lists its open scopes for diagnostics (``active_scopes()``,
``statistics()``, :class:`~tasksession.PoolExhaustedError`). A strong reference
to a scope that is never exited (its task ended or was abandoned, its
``__aexit__`` never called) would keep it alive for the life of the process,
together with its session, its connection and an idle-in-transaction backend,
and the garbage-collection report of such a scope could never fire. So a scope
whose session was built (the only kind that can hold a connection) is held
**weakly**: dropped unexited, it is collected, reported, and its connection
given back (see ``Scope`` in :mod:`._scope`).

A scope whose session was never touched holds nothing but memory; it is held
strongly (a plain dict entry, the cheapest registration on every scope's path:
a weak reference would cost a third of an untouched scope), and moved to the
weak side when its session is built.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["ScopeRegistry"]

_ref = weakref.ref
_MIN_PRUNE = 64


class ScopeRegistry:
    """The open scopes: :attr:`untouched` (strong) and those with a session (weak)."""

    __slots__ = ("_prune_at", "built", "untouched")

    def __init__(self) -> None:
        #: Scopes whose session was never used; scopes add and remove themselves.
        self.untouched: dict[Any, None] = {}
        #: id(scope) -> weak reference, for scopes whose session was built.
        self.built: dict[int, weakref.ref[Any]] = {}
        self._prune_at = _MIN_PRUNE

    def session_built(self, scope: Any) -> None:
        """Hold ``scope`` weakly from now on: its session may hold a connection."""
        self.untouched.pop(scope, None)
        built = self.built
        built[id(scope)] = _ref(scope)
        if len(built) > self._prune_at:
            self._prune()

    def discard_built(self, scope: Any) -> None:
        """Forget a scope whose session was built."""
        # While ``scope`` lives nothing else can have its id: an entry under it
        # is its own, or a dead one left by an object that lived at that address.
        self.built.pop(id(scope), None)

    def __iter__(self) -> Iterator[Any]:
        """The open scopes, oldest first."""
        live = list(self.untouched)
        dead = False
        for entry in list(self.built.values()):
            scope = entry()
            if scope is None:
                dead = True
            else:
                live.append(scope)
        if dead:
            self._prune()
        live.sort(key=lambda scope: scope._opened)
        return iter(live)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def _prune(self) -> None:
        built = self.built
        for key in [key for key, entry in built.items() if entry() is None]:
            del built[key]
        self._prune_at = max(_MIN_PRUNE, 2 * len(built))
