"""Database URLs: an asyncio driver is required, and the error names the one to use."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url

from ._errors import UnsupportedDriverError

__all__ = ["check_async_url"]

# backend -> the asyncio driver to suggest for a synchronous URL
_ASYNC_DRIVER = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
    "mssql": "aioodbc",
    "oracle": "oracledb_async",
}


def check_async_url(url: str | URL) -> URL:
    """Parse ``url`` and refuse synchronous drivers, before any connection is attempted.

    :raises UnsupportedDriverError: the URL names no driver (``postgresql://``), or a
        driver that is not asyncio-capable (``postgresql+psycopg2://``).
    """
    parsed = make_url(url)
    if "+" not in parsed.drivername:
        # No driver named: SQLAlchemy's default for the backend is a synchronous
        # driver (or, for postgresql:// on 2.1, depends on what is installed).
        is_async = False
    else:
        try:
            is_async = bool(getattr(parsed.get_dialect(_is_async=True), "is_async", False))
        except ImportError:
            # The driver is not installed; create_async_engine will say so.
            is_async = True
    if not is_async:
        backend = parsed.get_backend_name()
        driver = parsed.get_driver_name() or backend
        async_driver = _ASYNC_DRIVER.get(backend)
        suggestion = None
        if async_driver is not None:
            suggestion = parsed.set(drivername=f"{backend}+{async_driver}").render_as_string(
                hide_password=True
            )
        raise UnsupportedDriverError(
            parsed.render_as_string(hide_password=True), driver, suggestion
        )
    return parsed
