"""Databases for benchmarks: PostgreSQL (throwaway cluster or TASKSESSION_BENCH_DATABASE_URL)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV_URL = "TASKSESSION_BENCH_DATABASE_URL"


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """Yield a PostgreSQL URL; a cluster started here is stopped afterwards."""
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    from tests.postgres_server import start_cluster

    server = start_cluster()
    try:
        yield server.url
    finally:
        server.stop()
