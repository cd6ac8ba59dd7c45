"""The docs are part of the product: the errors page covers every error, and samples run.

A code sample marked runnable, in any page under ``docs/``::

    ```{code-block} python
    :class: runnable

    async with db.scope() as session:
        ...
    ```

is executed: a page's runnable samples run in order, in one namespace (like a
reader pasting them into ``python -m asyncio``: top-level ``await`` allowed),
with a temporary directory as the working directory (SQLite files land there).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import tasksession
from tasksession import SessionManager, TaskSessionError

DOCS = Path(__file__).resolve().parent.parent / "docs"
ERRORS_PAGE = DOCS / "errors.md"

sys.path.insert(0, str(DOCS / "_tools"))
import anyio_inventory  # noqa: E402

pytestmark = pytest.mark.anyio


# -- the errors page -----------------------------------------------------------------


def error_classes() -> list[type[TaskSessionError]]:
    """Every error class of tasksession and its integrations (the base included)."""
    import tasksession.tornado
    import tasksession.workers  # noqa: F401 - imported for the errors it may define

    found, pending = [], [TaskSessionError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("tasksession"):
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def coded_error_classes() -> list[type[TaskSessionError]]:
    """The error classes that define their own code (subclasses may share their parent's)."""
    return [cls for cls in error_classes() if "error_code" in vars(cls)]


def public_module_of(cls: type) -> ModuleType:
    """The public module that should export ``cls``: the package root, or a leaf module."""
    module = sys.modules[cls.__module__]
    return tasksession if module.__name__.split(".")[-1].startswith("_") else module


@pytest.mark.parametrize("error_class", coded_error_classes(), ids=lambda cls: cls.__name__)
def test_error_class_with_a_code_is_exported(error_class: type[TaskSessionError]) -> None:
    assert error_class.__name__ in public_module_of(error_class).__all__


def errors_page_section(code: str) -> tuple[str, str]:
    """The heading and body of the errors page's section for ``code``."""
    page = ERRORS_PAGE.read_text()
    # a MyST target `(ts-code)=` immediately followed by the section's heading
    section = re.search(rf"^\({re.escape(code)}\)=\n## (?P<heading>.+)$", page, re.MULTILINE)
    assert section is not None, f"docs/errors.md has no `({code})=` target before a heading"
    return section["heading"], page[section.end() :].split("\n## ", 1)[0]


@pytest.mark.parametrize("error_class", coded_error_classes(), ids=lambda cls: cls.__name__)
def test_errors_page_has_a_section_for_the_error(error_class: type[TaskSessionError]) -> None:
    heading, body = errors_page_section(error_class.error_code)
    assert f"`{error_class.error_code}`: {error_class.__name__}" == heading
    for part in ("**What**", "**Why**", "**Fix**"):
        assert part in body, f"the {error_class.error_code} section lacks {part}"


@pytest.mark.parametrize(
    "error_class",
    [cls for cls in error_classes() if cls not in coded_error_classes()],
    ids=lambda cls: cls.__name__,
)
def test_errors_page_names_the_subclass_in_its_parents_section(
    error_class: type[TaskSessionError],
) -> None:
    _, body = errors_page_section(error_class.error_code)
    assert error_class.__name__ in body


def test_error_codes_are_unique() -> None:
    codes = [cls.error_code for cls in coded_error_classes()]
    assert sorted(set(codes)) == sorted(codes)


def test_error_message_links_its_section_on_the_errors_page() -> None:
    message = str(tasksession.NoScopeError("db"))
    assert message.endswith("/errors.html#ts-noscope)")


# -- runnable samples -----------------------------------------------------------------

_FENCE = re.compile(r"^(?P<fence>`{3,})\{code-block\}\s+python\s*$")


@dataclass(frozen=True)
class Sample:
    page: Path
    line: int  # 1-based line of the first code line
    source: str


def runnable_samples(page: Path) -> list[Sample]:
    """The ``{code-block} python`` samples with ``:class: runnable``, in page order."""
    samples = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        options = []
        while index < len(lines) and lines[index].startswith(":"):
            options.append(lines[index])
            index += 1
        start = index
        while index < len(lines) and lines[index].strip() != opening["fence"]:
            index += 1
        assert index < len(lines), f"{page.name}:{start}: unclosed code block"
        classes = [o.split(":", 2)[2].split() for o in options if o.startswith(":class:")]
        if any("runnable" in names for names in classes):
            samples.append(Sample(page, start + 1, "\n".join(lines[start:index]) + "\n"))
        index += 1
    return samples


PAGES_WITH_SAMPLES = sorted(page for page in DOCS.glob("*.md") if runnable_samples(page))


def test_the_concepts_page_has_runnable_samples() -> None:
    assert DOCS / "concepts.md" in PAGES_WITH_SAMPLES


async def run_sample(sample: Sample, namespace: dict[str, Any]) -> None:
    # Blank lines keep the reported line numbers equal to the page's.
    source = "\n" * (sample.line - 1) + sample.source
    code = compile(
        source, str(sample.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    result = eval(code, namespace)
    if code.co_flags & inspect.CO_COROUTINE:
        await result


@contextlib.contextmanager
def isolated_logging() -> Iterator[None]:
    """Undo what samples do to logging (``getLogger("tasksession").setLevel(...)``).

    A reader's REPL may keep such settings; the test run must not, or later
    tests that read logs see nothing.
    """
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    saved = [
        (logger, logger.level, logger.propagate, logger.disabled, list(logger.handlers))
        for logger in loggers
        if isinstance(logger, logging.Logger)
    ]
    try:
        yield
    finally:
        for logger, level, propagate, disabled, handlers in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled
            logger.handlers[:] = handlers


@pytest.mark.parametrize("page", PAGES_WITH_SAMPLES, ids=lambda page: page.name)
async def test_runnable_samples_of_the_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    with isolated_logging():
        try:
            for sample in runnable_samples(page):
                await run_sample(sample, namespace)
        finally:
            for value in namespace.values():
                if isinstance(value, SessionManager):
                    await value.dispose()


# -- offline cross-references -----------------------------------------------------------


def inventory_names(content: bytes) -> set[str]:
    header, _, compressed = content.partition(b"compressed using zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2\n")
    return {line.split(" ", 1)[0] for line in zlib.decompress(compressed).decode().splitlines()}


def test_anyio_inventory_lists_what_the_docs_link_to() -> None:
    names = inventory_names(anyio_inventory.render("test"))
    assert {
        "anyio.CancelScope",
        "anyio.abc.TaskGroup.start_soon",
        "anyio.to_thread.run_sync",
        "anyio.fail_after",
    } <= names


def test_anyio_inventory_leaves_out_what_anyios_api_page_lacks() -> None:
    names = inventory_names(anyio_inventory.render("test"))
    assert set() == names & anyio_inventory.NOT_ON_THE_API_PAGE


# -- the README's two commands ----------------------------------------------------------

README = DOCS.parent / "README.md"


def readme_command(marker: str) -> str:
    """The command in the first code fence after ``<!-- marker -->`` (as ``.ci/run`` reads it)."""
    after = README.read_text().split(f"<!-- {marker} -->\n", 1)[1]
    fence = re.match(r"```\w*\n(?P<command>[^\n]+)\n```", after)
    assert fence is not None, f"README.md: no code fence right after <!-- {marker} -->"
    return fence["command"]


def test_readme_quickstart_command_runs_the_quickstart_in_a_fresh_venv() -> None:
    command = readme_command("quickstart-command")
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert command.endswith(" examples/quickstart.py")


def test_readme_test_command_installs_the_dev_extra_and_runs_pytest() -> None:
    command = readme_command("test-command")
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && ")
    assert command.endswith(".venv/bin/python -m pytest")


def test_ci_runs_the_readme_test_command_requiring_postgres() -> None:
    ci = (DOCS.parent / ".ci" / "run").read_text()
    assert 'test_command=$(readme_command "test-command")' in ci
    assert "export TASKSESSION_REQUIRE_POSTGRES=1" in ci


def test_docs_index_shows_the_readme_quickstart_command() -> None:
    assert readme_command("quickstart-command") in (DOCS / "index.md").read_text()
