"""Which members of ``AsyncSession`` the guard covers, and which it leaves alone.

Every public member is in exactly one list: the test suite fails when SQLAlchemy
grows a public member that is in none of them (``tests/test_guard_coverage.py``).
"""

from __future__ import annotations

__all__ = ["GUARDED_COROUTINES", "GUARDED_SYNC", "UNGUARDED"]

#: Coroutine methods that may do I/O or change transaction state.
GUARDED_COROUTINES = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "stream",
    "stream_scalars",
    "flush",
    "commit",
    "rollback",
    "close",
    "aclose",
    "reset",
    "invalidate",
    "refresh",
    "merge",
    "merge_all",
    "delete",
    "delete_all",
    "run_sync",
    "connection",
)

#: Synchronous methods that change session state (guarded against another
#: task's in-flight operation; ``begin``/``begin_nested`` also guard the
#: transaction object they return).
GUARDED_SYNC = (
    "add",
    "add_all",
    "expunge",
    "expunge_all",
    "expire",
    "expire_all",
    "begin",
    "begin_nested",
)

#: Public ``AsyncSession`` members that are safe without the guard: they only
#: read state, or configure binds before use. The test suite fails when
#: SQLAlchemy grows a public member that is in none of these three lists.
UNGUARDED = frozenset(
    {
        "bind",
        "binds",
        "bind_mapper",
        "bind_table",
        "close_all",
        "dirty",
        "deleted",
        "new",
        "identity_map",
        "identity_key",
        "in_transaction",
        "in_nested_transaction",
        "is_active",
        "is_modified",
        "autoflush",
        "no_autoflush",
        "info",
        "execution_options",
        "get_bind",
        "get_async_bind",
        "get_transaction",
        "get_nested_transaction",
        "object_session",
        "sync_session",
        "sync_session_class",
        "dispatch",
    }
)
