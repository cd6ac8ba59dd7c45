"""Pins the SQLAlchemy internals that _loading.py and _streams.py rely on.

If one of these fails after a SQLAlchemy upgrade, the protection needs a new
interception point; the rest of the suite says which behaviour broke.
"""

from __future__ import annotations

import inspect as pyinspect

import pytest
from sqlalchemy import exc
from sqlalchemy.engine import CursorResult, IteratorResult, Result
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import configure_mappers, mapperlib
from sqlalchemy.orm.attributes import QueryableAttribute

from tasksession import _loading, _streams
from tasksession._loading import is_missing_greenlet, is_protected

from .models import Base, Parent
from .test_loading import Author


def test_attribute_impls_have_fire_loader_callables_with_the_known_signature() -> None:
    configure_mappers()
    impl_class = type(Parent.children.impl)
    original = _loading._ORIGINAL.get(impl_class, impl_class)
    parameters = list(pyinspect.signature(original._fire_loader_callables).parameters)
    assert ["self", "state", "key", "passive"] == parameters


def test_every_registry_is_listed_by_all_registries() -> None:
    assert Base.registry in mapperlib._all_registries()


def test_mappers_used_with_tasksession_are_protected() -> None:
    # Importing tasksession builds no session class yet; a manager's first scope does.
    _loading.install()
    configure_mappers()
    assert is_protected(Parent.__mapper__)
    assert is_protected(Author.__mapper__)


def test_impls_keep_their_slots_layout_when_protected() -> None:
    _loading.install()
    configure_mappers()
    impl = Parent.children.impl
    assert isinstance(Parent.children, QueryableAttribute)
    assert type(impl).__slots__ == ()
    assert not hasattr(impl, "__dict__")


def test_results_have_a_dict_for_the_fetch_method_shadows() -> None:
    assert "__dict__" in Result.__slots__
    for cls in (CursorResult, IteratorResult):
        for method in _streams._FETCH_METHODS:
            assert callable(getattr(cls, method))


def test_stream_scalars_goes_through_stream() -> None:
    assert "self.stream(" in pyinspect.getsource(AsyncSession.stream_scalars)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(exc.MissingGreenlet("x"), True, id="bare"),
        pytest.param(
            exc.StatementError("x", "SELECT 1", {}, exc.MissingGreenlet("x")),
            True,
            id="aiosqlite-wrapped",
        ),
        pytest.param(
            exc.StatementError("greenlet_spawn has not been called", "SELECT 1", {}, ValueError()),
            False,
            id="text-only",
        ),
        pytest.param(
            exc.InvalidRequestError("greenlet_spawn has not been called"), False, id="other"
        ),
    ],
)
def test_missing_greenlet_is_recognised_by_class_only(
    error: exc.SQLAlchemyError, expected: bool
) -> None:
    assert expected == is_missing_greenlet(error)


def test_missing_greenlet_is_recognised_as_a_cause() -> None:
    outer = exc.InvalidRequestError("outer")
    outer.__cause__ = exc.MissingGreenlet("inner")
    assert is_missing_greenlet(outer)
