"""Scopes opened inside async generators: whose code they belong to.

A scope is kept in a :class:`~contextvars.ContextVar`, and an async generator
shares the context of the code iterating it. So a generator suspended at a
``yield`` inside ``async with db.scope():`` leaves its scope visible to the
consumer between iterations: the consumer's ``db.scope()`` would join it (and
commit or roll back with the generator, whenever that ends) and its
``db.session`` would return the generator's session. That scope is not the
consumer's: it must not leak out of the frames that opened it.

Two kinds of generators are told apart by who resumed the generator when it
opened the scope:

* **iterated by the application** (``async for``, ``anext()`` in the
  application's code): the scope is **private** to the generator's frame, and
  code outside that frame does not see it (:func:`private_frame` returns the
  generator's frame, :func:`is_running` says whether the generator is running);
* **driven by a library on the application's behalf**: ``contextlib``'s
  ``@asynccontextmanager``, or a test runner's async fixture. There the code
  that runs while the generator is suspended is the body the generator wraps,
  and the scope is meant to cover it: such a scope is an ordinary one.

Only the opening of a scope in an async generator pays for this (one flag test
on every scope entry otherwise).
"""

from __future__ import annotations

import sys
from types import FrameType

__all__ = ["is_running", "private_frame"]

_getframe = sys._getframe

# Code that resumes a generator on behalf of the code it wraps (context
# managers, test fixtures): a scope it opens covers what runs while it is suspended.
_DRIVERS = (
    "/contextlib.py",
    "/anyio/",
    "/asyncio/",
    "/_pytest/",
    "/pytest_asyncio/",
    "/tasksession/",
)


def private_frame(opener: FrameType) -> FrameType | None:
    """The generator frame a scope opened in ``opener`` is private to, or None.

    :param opener: the frame running ``async with db.scope()``; the caller has
        checked that its code is an async generator's (``inspect.CO_ASYNC_GENERATOR``).
    """
    resumer = opener.f_back
    if resumer is None:
        return None
    filename = resumer.f_code.co_filename
    if any(part in filename for part in _DRIVERS):
        return None
    return opener


def is_running(frame: FrameType) -> bool:
    """Whether ``frame`` is on the calling code's stack (its generator is running it)."""
    current: FrameType | None = _getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False
