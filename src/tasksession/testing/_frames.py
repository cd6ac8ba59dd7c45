"""Where the application's code is: the first frame outside the libraries doing its I/O."""

from __future__ import annotations

import sys
from types import FrameType

from greenlet import getcurrent  # type: ignore[import-untyped]  # ships no type hints

__all__ = ["application_frame"]

# Frames of these top-level packages are plumbing between the application and the
# driver; so are those of private top-level modules (a test runner's internals).
_PLUMBING = frozenset(
    {"sqlalchemy", "asyncio", "greenlet", "tasksession", "anyio", "contextlib", "asyncpg",
     "aiosqlite", "pytest_asyncio", "pluggy", "tornado"}
)  # fmt: skip


def _first_outside(frame: FrameType | None) -> str | None:
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        top = module.split(".", 1)[0]
        if top not in _PLUMBING and not top.startswith("_"):
            code = frame.f_code
            return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return None


def application_frame() -> str:
    """``file:line in function`` of the application code that led here.

    SQLAlchemy's asyncio layer runs the synchronous half of an operation in a
    greenlet, whose stack ends at the switch: the application's frames are on
    the greenlet that started it, suspended there.
    """
    found = _first_outside(sys._getframe(1))
    current = getcurrent()
    while found is None and current.parent is not None:
        current = current.parent
        found = _first_outside(current.gr_frame)
    return found or "<unknown>"
