"""Every public error class renders a message that reads right (issue 14, "errors read right").

Each class is constructed with the arguments its raisers pass (the call sites in the
core and the Tornado leaf), its message rendered once per sample, and checked by
:func:`message_problems`:

* it ends with the link to its stable code on the errors page *of the installed
  version* (``.../en/0.1.0/errors.html#ts-noscope``);
* it gives a fix: a code sample (lines indented four spaces after a blank line or a
  colon), or a sentence that starts with an instruction ("Use ...", "Keep ...");
* it spells the manager as the user named it: never ``db.`` unless the user's manager is
  ``db``, and the given name where one was given;
* a property read (``db.session``) is never shown as a call (``session()``, "was
  called"), and no call is shown twice (``execute()()``).

:func:`path_problems` checks that the class shows its public path
(``tasksession.NoScopeError``, not ``tasksession._errors.NoScopeError``) in its
``__module__``, its repr and the last line of a traceback. Both checkers are tested on
planted mistakes, so that a clean report means something. No private module is imported.
"""

from __future__ import annotations

import importlib
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import pytest

import tasksession
from tasksession import ScopeInfo, TaskSessionError

#: Public modules whose ``__all__`` may export error classes, and whether they may be absent
#: (a leaf whose framework is not installed).
PUBLIC_MODULES = {
    "tasksession": False,
    "tasksession.tornado": True,
    "tasksession.workers": False,
    "tasksession.testing": False,
}

#: Sentences that tell the reader what to do, as a fix without a code sample starts.
INSTRUCTIONS = (
    "Bind", "Call", "Check", "Consume", "Do", "Give", "Keep", "Leave", "Load", "Make",
    "Name", "Open", "Pass", "Run", "Set", "Use",
)  # fmt: skip
_INSTRUCTION = re.compile(rf"(?:^|[.?!:;]\s+|\n)(?:or |and )?(?:{'|'.join(INSTRUCTIONS)})\b", re.I)
# A code sample: a line indented four spaces right after a blank line or a line ending in ":".
_CODE_SAMPLE = re.compile(r"(?:\n\n|:\n) {4}\S")


def _importable(name: str, may_be_absent: bool) -> object | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        if may_be_absent:
            return None
        raise


def public_error_classes() -> dict[type[TaskSessionError], str]:
    """Every error class a public module exports, with that module's name (its public path)."""
    found: dict[type[TaskSessionError], str] = {}
    for module_name, may_be_absent in PUBLIC_MODULES.items():
        module = _importable(module_name, may_be_absent)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, TaskSessionError):
                found.setdefault(obj, module_name)
    return found


PUBLIC = public_error_classes()


def expected_errors_page() -> str:
    """The errors page of the installed version, worked out here, not read from tasksession."""
    try:
        installed = version("tasksession")
    except PackageNotFoundError:
        installed = "latest"
    if ".dev" in installed or "+" in installed:  # no pages are published for these
        installed = "latest"
    return f"https://tasksession.readthedocs.io/en/{installed}/errors.html"


# -- the checks ------------------------------------------------------------------------------


def message_problems(
    cls: type[TaskSessionError], message: str, *, manager: str | None, property_read: bool
) -> list[str]:
    """What is wrong with ``message``, an error of ``cls`` raised for a manager the user
    named ``manager`` (``None``: no name given); ``property_read``: about an attribute read."""
    problems = []
    code = cls.error_code
    if not re.fullmatch(r"ts-[a-z]+(?:-[a-z]+)*", code):
        problems.append(f"error code {code!r} is not a stable ts-... code")
    link = f"(Explained at {expected_errors_page()}#{code})"
    if not message.endswith(link):
        problems.append(f"does not end with the versioned link {link}")
    body = message.removesuffix(link)
    if not (_CODE_SAMPLE.search(body) or _INSTRUCTION.search(body)):
        problems.append("gives no fix (no code sample, no instruction)")
    if manager != "db" and re.search(r"\bdb\.", body):
        problems.append("says db. though the manager is not named db")
    if manager is not None and f"{manager}." not in body:
        problems.append(f"does not name the manager {manager!r}")
    if re.search(r"\bsession\(\)", body):
        problems.append("shows the session property as a call: session()")
    if property_read and re.search(r"\bwas called\b", body):
        problems.append("says 'was called' of a property read")
    if "()()" in body:
        problems.append("shows a call twice: ()()")
    return problems


def path_problems(cls: type, public_module: str, error: BaseException) -> list[str]:
    """What is wrong with the path ``cls`` (and its instance ``error``) shows."""
    public = f"{public_module}.{cls.__qualname__}"
    problems = []
    if cls.__module__ != public_module:
        problems.append(f"__module__ is {cls.__module__!r}, not {public_module!r}")
    if getattr(importlib.import_module(public_module), cls.__qualname__, None) is not cls:
        problems.append(f"{public} does not import it")
    if repr(cls) != f"<class '{public}'>":
        problems.append(f"repr is {cls!r}")
    last_line = traceback.format_exception_only(error)[0]
    if not last_line.startswith(f"{public}: "):
        problems.append(f"a traceback shows {last_line.split(':', 1)[0]}")
    return problems


# -- the samples: the arguments the raisers pass -----------------------------------------------


@dataclass(frozen=True)
class Sample:
    make: Callable[[], TaskSessionError]
    manager: str | None = None  # the name the user gave the manager (None: none given)
    property_read: bool = False  # the error is about reading db.session / self.session

    def render(self) -> tuple[TaskSessionError, str]:
        error = self.make()
        return error, str(error)


HOLDER = ScopeInfo(
    name="GET /report",
    task_name="Task-7",
    age=31.5,
    opened_at="app/report.py:40 in get",
    has_session=True,
    holds_connection=True,
    readonly=False,
)
WRITE = "flushing 1 new, 0 changed and 0 deleted object(s) (User)"
LAZY = "Author.books is a lazy-loaded relationship that is not loaded, and a plain attribute access cannot await the query"  # fmt: skip
DETACHED = "the object is detached: it belongs to no session any more (the scope that loaded it has ended, or it was expunged), so there is nothing to run the query with"  # fmt: skip


def samples() -> dict[str, list[Sample]]:
    """Realistic samples for every public error class, by class name (import-free of tornado)."""
    e = tasksession
    concurrent = {
        "scope_name": "GET /users",
        "holder_task": "Task-1",
        "holder_operation": "execute",
        "holder_location": "app/users.py:12 in load",
        "caller_task": "Task-2",
        "caller_operation": "flush",
        "caller_location": "app/users.py:20 in save",
    }
    return {
        "NoScopeError": [
            Sample(lambda: e.NoScopeError(), property_read=True),
            Sample(lambda: e.NoScopeError("db"), manager="db", property_read=True),
            Sample(
                lambda: e.NoScopeError(
                    "sessions",
                    reason="the innermost scope, 'feed' (opened at app/feed.py:3 in rows), "
                    "belongs to an async generator suspended at a yield",
                ),
                manager="sessions",
                property_read=True,
            ),
        ],
        "ScopeClosedError": [
            Sample(lambda: e.ScopeClosedError("GET /users", "execute()")),
            Sample(lambda: e.ScopeClosedError("GET /users", "manager.session"), property_read=True),
            Sample(
                lambda: e.ScopeClosedError("GET /users", "db.session", manager="db"),
                manager="db",
                property_read=True,
            ),
            Sample(lambda: e.ScopeClosedError("GET /notes", "self.session"), property_read=True),
        ],
        "StreamClosedError": [
            Sample(lambda: e.StreamClosedError("export")),
            Sample(lambda: e.StreamClosedError("export", manager="sessions"), manager="sessions"),
        ],
        "ConcurrentSessionError": [
            Sample(lambda: e.ConcurrentSessionError(**concurrent)),
            Sample(
                lambda: e.ConcurrentSessionError(**concurrent, strict=True, manager="db"),
                manager="db",
            ),
        ],
        "ImplicitIOError": [
            Sample(
                lambda: e.ImplicitIOError(
                    class_name="Author",
                    attribute="books",
                    instance="<Author id=1>",
                    reason=LAZY,
                    fixes=[
                        "select(Author).options(selectinload(Author.books))  # with the query",
                        "await author.awaitable_attrs.books  # load it now",
                    ],
                )
            )
        ],
        "DetachedImplicitIOError": [
            Sample(
                lambda: e.DetachedImplicitIOError(
                    class_name="Author",
                    attribute="books",
                    instance="<Author id=1>",
                    reason=DETACHED,
                    fixes=[
                        "author = await session.merge(author); await author.awaitable_attrs.books"
                    ],
                )
            )
        ],
        "NotConfiguredError": [
            Sample(lambda: e.NotConfiguredError()),
            Sample(lambda: e.NotConfiguredError("db"), manager="db"),
            Sample(lambda: e.NotConfiguredError("sessions"), manager="sessions"),
        ],
        "UnsupportedDriverError": [
            Sample(
                lambda: e.UnsupportedDriverError(
                    "postgresql://app@localhost/app",
                    "psycopg2",
                    "postgresql+asyncpg://app@localhost/app",
                )
            ),
            Sample(lambda: e.UnsupportedDriverError("mssql+pyodbc://app@host/app", "pyodbc", None)),
        ],
        "UnsupportedBackendError": [Sample(lambda: e.UnsupportedBackendError("trio"))],
        "CrossThreadError": [
            Sample(lambda: e.CrossThreadError("manager.session"), property_read=True),
            Sample(lambda: e.CrossThreadError("db.session"), manager="db", property_read=True),
            Sample(lambda: e.CrossThreadError("execute()")),
        ],
        "ReadOnlyScopeError": [
            Sample(lambda: e.ReadOnlyScopeError("report", WRITE)),  # positional, as before
            Sample(
                lambda: e.ReadOnlyScopeError(
                    "report",
                    "ending with 1 new, 0 changed and 0 deleted object(s) never flushed (User)",
                )
            ),
            Sample(lambda: e.ReadOnlyScopeError("report", "manager.scope()", nested=True)),
            Sample(
                lambda: e.ReadOnlyScopeError("report", "db.scope()", nested=True, manager="db"),
                manager="db",
            ),
            Sample(lambda: e.ReadOnlyScopeError("GET /w", WRITE, tornado_handler="Notes")),
            Sample(
                lambda: e.ReadOnlyScopeError(
                    "GET /w", "db.scope()", nested=True, manager="db", tornado_handler="Notes"
                ),
                manager="db",
            ),
        ],
        "PoolExhaustedError": [
            Sample(lambda: e.PoolExhaustedError("Pool size: 2  Checked out: 2", [HOLDER])),
            Sample(lambda: e.PoolExhaustedError("Pool size: 2  Checked out: 2", [])),
        ],
        "CommitOutcomeUnknownError": [
            Sample(
                lambda: e.CommitOutcomeUnknownError(
                    "POST /pay", TimeoutError(), reason="no answer within commit_timeout=10.0s"
                )
            ),
            Sample(lambda: e.CommitOutcomeUnknownError("POST /pay", ConnectionResetError(104), 2)),
        ],
        "MissingSessionManagerError": [
            Sample(lambda: PUBLIC_BY_NAME["MissingSessionManagerError"]("UserHandler"))
        ],
        "StrayEngineError": [
            Sample(
                lambda: PUBLIC_BY_NAME["StrayEngineError"](
                    "NullPool", "tests/test_users.py:12 in test_signup", ["users_db"]
                ),
                manager="users_db",
            ),
            Sample(lambda: PUBLIC_BY_NAME["StrayEngineError"]("NullPool", "<unknown>")),
        ],
        "SharedConnectionTimeoutError": [
            Sample(
                lambda: PUBLIC_BY_NAME["SharedConnectionTimeoutError"](
                    "scope 'waiter' (task 'Task-3', opened at t.py:4 in waiter)",
                    "scope 'holder' (task 'Task-2', opened at t.py:9 in holder)",
                    "run a statement",
                    5.0,
                    "db",
                ),
                manager="db",
            ),
        ],
    }


PUBLIC_BY_NAME = {cls.__name__: cls for cls in PUBLIC}
SAMPLES = samples()
RAISED = [cls for cls in PUBLIC if cls is not TaskSessionError]  # the base is never raised


def sample_ids(cls: type) -> str:
    return cls.__name__


# -- every class, every sample -----------------------------------------------------------------


def test_the_public_errors_are_found() -> None:
    assert TaskSessionError in PUBLIC
    assert len(PUBLIC) >= 15  # the root's fourteen, and a leaf's


def test_every_raised_error_class_has_samples() -> None:
    missing = sorted(cls.__name__ for cls in RAISED if not SAMPLES.get(cls.__name__))
    assert [] == missing, "add samples (the arguments its raisers pass) for these"


def test_every_error_class_of_tasksession_is_public() -> None:
    # A class raised but exported nowhere would escape this file's checks.
    seen, pending = set(), [TaskSessionError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == "tasksession":
            seen.add(cls)
    assert [] == sorted(cls.__qualname__ for cls in seen - set(PUBLIC))


@pytest.mark.parametrize("cls", RAISED, ids=sample_ids)
def test_message_names_its_code_and_a_fix(cls: type[TaskSessionError]) -> None:
    report = {}
    for index, sample in enumerate(SAMPLES.get(cls.__name__, [])):
        error, message = sample.render()
        assert type(error) is cls
        found = message_problems(
            cls, message, manager=sample.manager, property_read=sample.property_read
        )
        if found:
            report[f"sample {index}: {message}"] = found
    assert {} == report


@pytest.mark.parametrize("cls", list(PUBLIC), ids=sample_ids)
def test_error_shows_its_public_path(cls: type[TaskSessionError]) -> None:
    samples_of = SAMPLES.get(cls.__name__)
    error = samples_of[0].make() if samples_of else cls("the base class, never raised itself")
    assert [] == path_problems(cls, PUBLIC[cls], error)


def test_the_base_class_links_its_code_too() -> None:
    message = str(TaskSessionError("Something failed."))
    assert message.endswith(f"(Explained at {expected_errors_page()}#ts-base)")


def test_readonly_error_never_offers_a_scope_that_joins_the_readonly_one() -> None:
    # The fix of a readonly refusal is an independent scope, or where the readonly comes
    # from: the code's readonly=True, or the Tornado handler's session_readonly.
    plain = str(tasksession.ReadOnlyScopeError("report", WRITE))
    nested = str(tasksession.ReadOnlyScopeError("report", "db.scope()", nested=True, manager="db"))
    tornado = str(tasksession.ReadOnlyScopeError("GET /w", WRITE, tornado_handler="Notes"))
    for message in (plain, nested, tornado):
        scopes_offered = re.findall(r"async with \w+\.scope\((.*?)\)", message)
        assert ["independent=True"] == scopes_offered, message
    assert "session_readonly" not in plain
    assert "without readonly=True" in plain
    assert "without readonly=True" in nested
    assert "session_readonly" not in nested
    assert "Notes.session_readonly" in tornado
    assert "class Notes(SessionMixin" in tornado
    assert "without readonly=True" not in tornado  # the user wrote no readonly=True


# -- the checkers find planted mistakes ------------------------------------------------------


class PlantedError(TaskSessionError):
    """A made-up error, defined here: its path is this test module's."""

    error_code = "ts-planted"


def test_the_message_checker_finds_each_planted_mistake() -> None:
    link = f"(Explained at {expected_errors_page()}#ts-planted)"
    good = "Something failed. Open a scope for it:\n\n    async with db.scope():\n        ...\n"

    def check(message: str, manager: str | None = "db", property_read: bool = False) -> list[str]:
        return message_problems(PlantedError, message, manager=manager, property_read=property_read)

    assert [] == check(f"{good}{link}")
    assert [] == check(f"Something failed. Keep scopes short.\n{link}", manager=None)
    assert ["does not end with the versioned link " + link] == check(good)
    unversioned = (
        "(Explained at https://tasksession.readthedocs.io/en/stable/errors.html#ts-planted)"
    )
    assert ["does not end with the versioned link " + link] == check(f"{good}{unversioned}")
    assert ["gives no fix (no code sample, no instruction)"] == check(
        f"db.scope() failed: it was a bad day.\n{link}"
    )
    assert ["says db. though the manager is not named db"] == check(f"{good}{link}", manager=None)
    assert [
        "says db. though the manager is not named db",
        "does not name the manager 'sessions'",
    ] == check(f"{good}{link}", manager="sessions")
    assert [
        "shows the session property as a call: session()",
        "says 'was called' of a property read",
    ] == check(f"db.session() was called outside of a scope. {good}{link}", property_read=True)
    assert ["shows a call twice: ()()"] == check(f"execute()() was refused. {good}{link}")


def test_the_path_checker_finds_a_private_path() -> None:
    error = PlantedError("x")
    found = path_problems(PlantedError, "tasksession", error)
    assert 4 == len(found), found
    assert found[0] == f"__module__ is {__name__!r}, not 'tasksession'"
    # and a class of the package passes
    assert [] == path_problems(TaskSessionError, "tasksession", TaskSessionError("x"))
