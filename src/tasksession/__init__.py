"""tasksession: one AsyncSession per unit of work, keyed to its task.

Everything public is re-exported here; the implementation lives in private
modules, one concept each. Importing this package does not import tornado.
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
