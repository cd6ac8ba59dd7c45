"""A five-minute tour of tasksession, on the embedded SQLite default.

Run it from the repository root::

    python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python examples/quickstart.py

It creates a throwaway SQLite database in a temporary directory (set
``TASKSESSION_DATABASE_URL`` to use another database, e.g.
``postgresql+asyncpg://user@localhost/db``; it creates and drops one table,
``quickstart_users``), and shows, step by step:

1. a scope commits when its block ends cleanly;
2. a scope rolls back when its block raises, and the exception goes on;
3. ``db.session`` finds the current scope's session from any function the task calls;
4. a savepoint scope undoes only its own block;
5. outside any scope, ``db.session`` raises ``NoScopeError``, which says how to fix it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import textwrap

from sqlalchemy import String, exc, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasksession import NoScopeError, SessionManager


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "quickstart_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


# Created unbound, at import time, like an application's module-level object;
# configure() binds it at start-up (see main()).
db = SessionManager()


async def user_names() -> list[str]:
    """Read the committed state, in a scope of its own."""
    async with db.scope(independent=True) as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


async def register(name: str) -> None:
    """Deep inside the application: no session parameter, ``db.session`` finds it."""
    db.session.add(User(name=name))


async def tour() -> None:
    print("1. A scope commits when its block ends cleanly.")
    async with db.scope() as session:
        session.add(User(name="ada"))
    print(f"   committed users: {await user_names()}")

    print("2. A scope rolls back when its block raises; the exception goes on.")
    try:
        async with db.scope() as session:
            session.add(User(name="bob"))
            await session.flush()  # bob is in the transaction now...
            raise ValueError("payment declined")  # ...and this undoes him
    except ValueError as error:
        print(f"   ValueError({str(error)!r}) left the scope, which rolled back")
    print(f"   committed users: {await user_names()}")

    print("3. db.session is the current scope's session, in any function the task calls.")
    async with db.scope() as session:
        await register("grace")
        print(f"   db.session is session: {db.session is session}")
    print(f"   committed users: {await user_names()}")

    print("4. A savepoint scope undoes only its own block.")
    async with db.scope() as session:
        session.add(User(name="linus"))
        try:
            async with db.scope(savepoint=True):
                await register("ada")  # a duplicate name: the UNIQUE constraint fails
                await session.flush()
        except exc.IntegrityError:
            print("   IntegrityError in the savepoint: only the savepoint rolled back")
    print(f"   committed users: {await user_names()}")

    print("5. Outside any scope, db.session raises NoScopeError, which says what to do:")
    try:
        db.session  # noqa: B018 - the attribute access is the point
    except NoScopeError as error:
        print(textwrap.indent(str(error), "   "))


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tasksession-quickstart-") as tmp:
        url = os.environ.get("TASKSESSION_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp}/app.db"
        db.configure(url)
        print(f"Database: {db.engine.url.render_as_string(hide_password=True)}\n")
        try:
            async with db.engine.begin() as connection:
                await connection.run_sync(Base.metadata.drop_all)
                await connection.run_sync(Base.metadata.create_all)
            await tour()
            async with db.engine.begin() as connection:
                await connection.run_sync(Base.metadata.drop_all)
        finally:
            await db.dispose()
    print("\nDone: every scope was committed or rolled back, and closed.")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
