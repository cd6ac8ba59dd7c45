"""Testing an application built on tasksession: every test on a clean, real database.

* :func:`isolated` runs a block against a database state thrown away at its end:
  ``"savepoint"`` mode (one transaction, SAVEPOINTs, under a millisecond) or
  ``"clone"`` mode (a database of its own, cloned from a template);
* :func:`assert_no_leaks` fails a block that leaves scopes, connections or
  transactions open, naming each;
* :class:`StrayEngineError`: inside ``isolated()``, a query through an engine the
  test did not isolate fails instead of writing to a shared database;
* the pytest plugin (:mod:`tasksession.testing.plugin`, registered through the
  ``pytest11`` entry point) wraps all three in the ``tasksession_db`` fixture.

Nothing here needs pytest. See :doc:`/testing`.
"""

from ._clone import Clone as Clone
from ._clone import SchemaHook as SchemaHook
from ._clone import create_clone as create_clone
from ._clone import drop_templates as drop_templates
from ._isolation import Mode as Mode
from ._isolation import isolated as isolated
from ._leaks import assert_no_leaks as assert_no_leaks
from ._stray import StrayEngineError as StrayEngineError
from ._stray import allow as allow
from ._turns import SavepointIsolationWarning as SavepointIsolationWarning
from ._turns import SharedConnectionTimeoutError as SharedConnectionTimeoutError

__all__ = [
    "Clone",
    "Mode",
    "SavepointIsolationWarning",
    "SchemaHook",
    "SharedConnectionTimeoutError",
    "StrayEngineError",
    "allow",
    "assert_no_leaks",
    "create_clone",
    "drop_templates",
    "isolated",
]

# Shown under their public path (type aliases have no __module__ of their own to set).
for _name in __all__:
    if _name not in ("Mode", "SchemaHook"):
        globals()[_name].__module__ = __name__
del _name
