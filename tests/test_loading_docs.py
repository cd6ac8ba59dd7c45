"""docs/loading.md: its samples run (tests/test_docs.py), and the message it shows is the real one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .test_docs import run_sample, runnable_samples

pytestmark = pytest.mark.anyio

PAGE = Path(__file__).resolve().parent.parent / "docs" / "loading.md"


def shown_message() -> str:
    text = PAGE.read_text()
    block = re.search(r"<!-- implicit-io-message -->\n```text\n(?P<message>.*?)\n```", text, re.S)
    assert block is not None, "docs/loading.md lost its <!-- implicit-io-message --> block"
    return block["message"]


def test_the_page_has_runnable_samples() -> None:
    assert len(runnable_samples(PAGE)) >= 8


async def test_the_message_shown_is_the_one_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    samples = runnable_samples(PAGE)
    namespace: dict[str, Any] = {"__name__": "docs_loading_message"}
    try:
        for sample in samples[:2]:  # the setup, then the sample that prints the error
            await run_sample(sample, namespace)
    finally:
        await namespace["db"].dispose()
    assert shown_message() == namespace["message"]
