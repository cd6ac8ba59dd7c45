"""Version-dependent fast paths."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["current_task", "current_task_of", "get_running_loop_or_none"]

#: The running event loop of this thread, or ``None`` (C-implemented, cheap).
get_running_loop_or_none = asyncio.events._get_running_loop

current_task: Callable[[], asyncio.Task[Any] | None]
#: The task running on a given loop. Skips asking for the running loop, which
#: on CPython costs a getpid() system call (the guard knows the loop already).
current_task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]

if sys.version_info >= (3, 12):
    # Implemented in C from 3.12 on.
    current_task = asyncio.current_task
    current_task_of = asyncio.current_task
else:
    from asyncio import events as _events
    from asyncio import tasks as _tasks

    _current_tasks: dict[Any, asyncio.Task[Any]] = _tasks._current_tasks  # type: ignore[attr-defined]
    current_task_of = _current_tasks.get
    _get_running_loop = _events.get_running_loop

    def current_task() -> asyncio.Task[Any] | None:
        """``asyncio.current_task()`` without its Python-level overhead on 3.11."""
        return _current_tasks.get(_get_running_loop())
