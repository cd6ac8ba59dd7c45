"""A small notes app (JSON API + HTML pages) on Tornado with tasksession.

Run it with ``python -m examples.tornado_app`` (SQLite file ``notes.db``), or on
PostgreSQL: ``NOTES_DATABASE_URL=postgresql+asyncpg://user@host/db python -m examples.tornado_app``.
"""
