"""ImplicitIOError: every attribute load that would need I/O outside an await.

Each trigger is shown on PostgreSQL (asyncpg) and SQLite (aiosqlite) alike: the
error class, the attribute it names, a fix it gives, and that no query was sent.

The library (an author and two books) is created once per database; every test runs
isolated by tasksession's own pytest plugin (``tasksession_db``, savepoint mode), so
whatever a test changes is rolled back before the next.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, ClassVar

import pytest
from sqlalchemy import DateTime, ForeignKey, String, Text, event, exc, func, select
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    defer,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.orm.exc import DetachedInstanceError

from tasksession import ImplicitIOError, SessionManager
from tasksession.testing import isolated

pytestmark = pytest.mark.anyio


class LoadingBase(AsyncAttrs, DeclarativeBase):
    pass


class Author(LoadingBase):
    __tablename__ = "loading_authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    bio: Mapped[str] = mapped_column(Text, deferred=True, default="")
    updated_at: Mapped[datetime | None] = mapped_column(DateTime, onupdate=func.now())
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(LoadingBase):
    __tablename__ = "loading_books"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("loading_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")
    strict_author: Mapped[Author] = relationship(lazy="raise", viewonly=True)


class Stamped(LoadingBase):
    __tablename__ = "loading_stamped"
    __mapper_args__: ClassVar[dict[str, Any]] = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime, onupdate=func.now())


@pytest.fixture(scope="module")
async def tasksession_manager(module_database_url: str) -> AsyncIterator[SessionManager]:
    """A manager whose database holds one author (id 1) who wrote two books (ids 1, 2)."""
    url = module_database_url
    db = SessionManager(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(LoadingBase.metadata.drop_all)
        await conn.run_sync(LoadingBase.metadata.create_all)
    async with db.scope() as session:
        session.add(
            Author(
                id=1,
                name="Ursula",
                bio="wrote books",
                books=[Book(id=1, title="Earthsea"), Book(id=2, title="Lathe")],
            )
        )
        session.add(Stamped(id=1, name="first"))
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def library(tasksession_db: SessionManager) -> SessionManager:
    """The manager on the library, isolated for the test."""
    return tasksession_db


@pytest.fixture
async def expiring(library: SessionManager) -> AsyncIterator[SessionManager]:
    """A second manager on the library with ``expire_on_commit=True``, isolated too."""
    db = SessionManager(library.engine.url, expire_on_commit=True)
    try:
        async with isolated(db):
            yield db
    finally:
        await db.dispose()


@pytest.fixture
def statements(library: SessionManager) -> Iterator[list[str]]:
    """The SQL statements sent to the database while the test runs."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    engine = library.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine, "before_cursor_execute", record)


def assert_names(error: ImplicitIOError, class_name: str, attribute: str, fix: str) -> None:
    assert (class_name, attribute) == (error.class_name, error.attribute)
    assert f"{class_name}.{attribute}" in str(error)
    assert fix in str(error)
    assert any(fix in line for line in error.fixes)


# -- the triggers -------------------------------------------------------------------------


async def test_lazy_relationship_raises_implicit_io_error_naming_it(
    library: SessionManager,
) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.books
    assert_names(caught.value, "Author", "books", "selectinload(Author.books)")
    assert "await author.awaitable_attrs.books" in str(caught.value)
    assert 'await session.refresh(author, ["books"])' in str(caught.value)
    assert "<Author id=1>" == caught.value.instance


async def test_lazy_many_to_one_not_in_identity_map_raises(library: SessionManager) -> None:
    async with library.scope() as session:
        book = await session.get(Book, 1)
        assert book is not None
        with pytest.raises(ImplicitIOError) as caught:
            _ = book.author
    assert_names(caught.value, "Book", "author", "joinedload(Book.author)")


async def test_many_to_one_in_identity_map_needs_no_query(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        book = await session.get(Book, 1)
        assert book is not None
        assert author is book.author


async def test_deferred_column_raises_implicit_io_error_naming_it(
    library: SessionManager,
) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.bio
    assert_names(caught.value, "Author", "bio", "undefer(Author.bio)")


async def test_column_deferred_by_query_option_raises(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.scalar(select(Author).options(defer(Author.name)))
        assert author is not None
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.name
    assert_names(caught.value, "Author", "name", "undefer(Author.name)")


async def test_attribute_expired_by_commit_raises(expiring: SessionManager) -> None:
    async with expiring.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        author.name = "Le Guin"
        await session.commit()
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.name
    assert_names(caught.value, "Author", "name", 'await session.refresh(author, ["name"])')
    assert "expire_on_commit=False" in str(caught.value)


async def test_attribute_expired_by_rollback_raises(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        await session.rollback()
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.name
    assert_names(caught.value, "Author", "name", "await author.awaitable_attrs.name")


async def test_attribute_expired_by_expire_raises(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        session.expire(author, ["name"])
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.name
    assert_names(caught.value, "Author", "name", 'await session.refresh(author, ["name"])')


async def test_unloaded_collection_on_new_object_raises(library: SessionManager) -> None:
    async with library.scope() as session:
        author = Author(id=2, name="Octavia")
        session.add(author)
        await session.flush()
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.books
    assert_names(caught.value, "Author", "books", "Author(..., books=[])")


async def test_server_generated_value_after_update_flush_raises(
    library: SessionManager,
) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        author.name = "Le Guin"
        await session.flush()
        with pytest.raises(ImplicitIOError) as caught:
            _ = author.updated_at
    assert_names(caught.value, "Author", "updated_at", '"eager_defaults": True')


# -- properties of the error ----------------------------------------------------------------


async def test_error_is_raised_before_any_query_is_sent(
    library: SessionManager, statements: list[str]
) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        sent = len(statements)
        with pytest.raises(ImplicitIOError):
            _ = author.books
        assert sent == len(statements)


async def test_error_is_a_missing_greenlet_on_every_driver(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        with pytest.raises(exc.MissingGreenlet) as caught:
            _ = author.books
    assert ImplicitIOError is type(caught.value)


async def test_session_works_normally_after_the_error(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        with pytest.raises(ImplicitIOError):
            _ = author.books
        assert "execute" not in session.sync_session.__dict__
        assert ["Earthsea", "Lathe"] == sorted(b.title for b in await author.awaitable_attrs.books)


async def test_no_warning_escapes_from_any_trigger(
    library: SessionManager, expiring: SessionManager
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with library.scope() as session:
            book = await session.get(Book, 2)
            assert book is not None
            with pytest.raises(ImplicitIOError):
                _ = book.author  # many-to-one, target not loaded
            author = await session.get(Author, 1)
            assert author is not None
            new = Author(id=3, name="N. K.")
            session.add(new)
            await session.flush()
            author.name = "changed"
            await session.flush()
            for read in (lambda: author.books, lambda: author.bio, lambda: author.updated_at):
                with pytest.raises(ImplicitIOError):
                    read()
            with pytest.raises(ImplicitIOError):
                _ = new.books
            await session.rollback()
            with pytest.raises(ImplicitIOError):
                _ = author.name
        async with expiring.scope() as session:
            other = await session.get(Author, 1)
            await session.commit()
            with pytest.raises(ImplicitIOError):
                _ = other.name  # type: ignore[union-attr]
        with pytest.raises(ImplicitIOError):
            _ = author.books  # detached now
        gc.collect()
    assert [] == [f"{w.category.__name__}: {w.message}" for w in caught]


# -- the fixes the message gives work ---------------------------------------------------------


async def test_selectinload_loads_the_collection_with_the_query(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.scalar(select(Author).options(selectinload(Author.books)))
        assert author is not None
    assert ["Earthsea", "Lathe"] == sorted(book.title for book in author.books)


async def test_joinedload_loads_the_many_to_one_with_the_query(library: SessionManager) -> None:
    async with library.scope() as session:
        book = await session.scalar(
            select(Book).where(Book.id == 1).options(joinedload(Book.author))
        )
        assert book is not None
    assert "Ursula" == book.author.name


async def test_refresh_loads_the_named_attribute(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        await session.refresh(author, ["books", "bio"])
    assert ("wrote books", 2) == (author.bio, len(author.books))


async def test_eager_defaults_fetches_server_generated_value(library: SessionManager) -> None:
    async with library.scope() as session:
        stamped = await session.get(Stamped, 1)
        assert stamped is not None
        stamped.name = "second"
        await session.flush()
        assert isinstance(stamped.updated_at, datetime)


async def test_lazy_loads_inside_run_sync_still_work(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        titles = await session.run_sync(lambda _: sorted(b.title for b in author.books))
    assert ["Earthsea", "Lathe"] == titles


async def test_lazy_raise_relationship_keeps_sqlalchemys_error(library: SessionManager) -> None:
    async with library.scope() as session:
        book = await session.get(Book, 1)
        assert book is not None
        with pytest.raises(exc.InvalidRequestError, match="lazy='raise'") as caught:
            _ = book.strict_author
    assert not isinstance(caught.value, ImplicitIOError)


# -- detached objects ---------------------------------------------------------------------------


async def test_unloaded_relationship_on_detached_object_raises_named_error(
    library: SessionManager,
) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
    assert author is not None
    with pytest.raises(ImplicitIOError) as caught:
        _ = author.books
    assert_names(caught.value, "Author", "books", "selectinload(Author.books)")
    assert "detached" in str(caught.value)
    assert isinstance(caught.value.__cause__, DetachedInstanceError)


async def test_detached_error_is_still_a_detached_instance_error(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
    with pytest.raises(DetachedInstanceError):
        _ = author.bio  # type: ignore[union-attr]


async def test_expired_column_on_detached_object_names_it(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.get(Author, 1)
        assert author is not None
        author.name = "Le Guin"
        await session.flush()  # expires updated_at (onupdate)
    with pytest.raises(ImplicitIOError) as caught:
        _ = author.updated_at
    assert_names(caught.value, "Author", "updated_at", '"eager_defaults": True')
    assert "session.merge(author)" in str(caught.value)


async def test_detached_object_keeps_its_loaded_state(library: SessionManager) -> None:
    async with library.scope() as session:
        author = await session.scalar(select(Author).options(selectinload(Author.books)))
    assert author is not None
    assert ("Ursula", 2) == (author.name, len(author.books))


# -- sessions that are not tasksession's ---------------------------------------------------------


async def test_plain_async_session_is_left_alone(pg_db: SessionManager) -> None:
    # PostgreSQL only: on aiosqlite SQLAlchemy's own failure leaks a RuntimeWarning.
    async with pg_db.engine.begin() as conn:
        await conn.run_sync(LoadingBase.metadata.drop_all)
        await conn.run_sync(LoadingBase.metadata.create_all)
        await conn.execute(Author.__table__.insert().values(id=1, name="Ursula", bio=""))
    async with AsyncSession(pg_db.engine) as session:
        author = await session.get(Author, 1)
        assert author is not None
        with pytest.raises(exc.MissingGreenlet) as caught:
            _ = author.books
    assert not isinstance(caught.value, ImplicitIOError)
