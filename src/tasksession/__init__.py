"""tasksession: one AsyncSession per unit of work, keyed to its task.

Everything public is re-exported here, under its public path: an exported
name's ``__module__`` is ``tasksession`` (tracebacks, reprs, pickles and the
docs say ``tasksession.NoScopeError``, not ``tasksession._errors.NoScopeError``).
Importing this package does not import tornado.

The implementation lives in private modules, one concept each; imports run down
this map only (checked by ``tests/test_architecture.py``; ``docs/architecture.md``
says more):

======  =========================================================================
level   modules
======  =========================================================================
leaf    ``tornado``, ``workers``, ``testing``: framework glue on this public root only
8       ``__init__``: re-exports
7       ``_manager``: ``SessionManager``, composing everything below
6       ``_scope`` (entering, the ContextVar, exit dispatch), ``_transactional``,
        ``_task_group``
5       ``_home`` (what a manager's scopes share), ``_rebind`` (another database
        for a while: test isolation's hook)
4       ``_teardown`` (how a unit ends), ``_session`` (guarded lazy sessions),
        ``_config`` (options, engines, routing)
3       ``_guard``, ``_commit``, ``_savepoint``, ``_pool``, ``_sqlite``
2       ``_loading``, ``_streams``, ``_retry``, ``_completion``, ``_tasks``,
        ``_interrupt``, ``_shortcuts``, ``_outcome``, ``_urls``
1       ``_errors``, ``_stats`` (the ledger), ``_pins``, ``_compat``, ``_members``
======  =========================================================================
"""

from ._errors import CommitOutcomeUnknownError as CommitOutcomeUnknownError
from ._errors import ConcurrentSessionError as ConcurrentSessionError
from ._errors import CrossThreadError as CrossThreadError
from ._errors import DetachedImplicitIOError as DetachedImplicitIOError
from ._errors import ImplicitIOError as ImplicitIOError
from ._errors import NoScopeError as NoScopeError
from ._errors import NotConfiguredError as NotConfiguredError
from ._errors import PoolExhaustedError as PoolExhaustedError
from ._errors import ReadOnlyScopeError as ReadOnlyScopeError
from ._errors import ScopeClosedError as ScopeClosedError
from ._errors import StreamClosedError as StreamClosedError
from ._errors import TaskSessionError as TaskSessionError
from ._errors import UnsupportedBackendError as UnsupportedBackendError
from ._errors import UnsupportedDriverError as UnsupportedDriverError
from ._manager import SessionManager as SessionManager
from ._retry import RetryPolicy as RetryPolicy
from ._scope import Scope as Scope
from ._stats import ManagerStatistics as ManagerStatistics
from ._stats import ScopeInfo as ScopeInfo
from ._task_group import SessionTaskGroup as SessionTaskGroup

__all__ = [
    "CommitOutcomeUnknownError",
    "ConcurrentSessionError",
    "CrossThreadError",
    "DetachedImplicitIOError",
    "ImplicitIOError",
    "ManagerStatistics",
    "NoScopeError",
    "NotConfiguredError",
    "PoolExhaustedError",
    "ReadOnlyScopeError",
    "RetryPolicy",
    "Scope",
    "ScopeClosedError",
    "ScopeInfo",
    "SessionManager",
    "SessionTaskGroup",
    "StreamClosedError",
    "TaskSessionError",
    "UnsupportedBackendError",
    "UnsupportedDriverError",
]

# The private module a name is defined in is no part of its name: show where to import it.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
