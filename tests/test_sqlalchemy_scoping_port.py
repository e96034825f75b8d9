"""SQLAlchemy's own scoped_session tests, ported to plain pytest and run on the greenscope subclass.

Source: ``test/orm/test_scoping.py`` in https://github.com/sqlalchemy/sqlalchemy (class
``ScopedSessionTest``: ``test_basic``, ``test_config_errors``, ``test_call_with_kwargs``,
``test_methods_etc``, ``test_get_bind_custom_session_subclass``, ``test_attributes``). SQLAlchemy's
fixtures (``MappedTest``, ``ComparableEntity``, ``testing.db``) are replaced by an in-memory SQLite
engine, an imperative mapping per test and explicit comparisons. Where the original hardcodes
the call signature SQLAlchemy proxies, the port compares against the stock class in the same run,
so it holds on every SQLAlchemy version. A few checks are added: the whole ``dir()`` of the stock
class is present, ``remove()``, ``configure()`` without a session does not warn.
"""

from __future__ import annotations

from typing import Any, Iterator, Tuple
from unittest import mock

import pytest
import sqlalchemy as sa
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Query, Session, registry, relationship, sessionmaker
from sqlalchemy.orm import scoped_session as stock_scoped_session

import greenscope

scoped_session = greenscope.scoped_session


@pytest.fixture
def db() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def tables(db: Engine) -> Tuple[Table, Table]:
    metadata = MetaData()
    table1 = Table(
        "table1",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("data", String(30)),
    )
    table2 = Table(
        "table2",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("someid", None, ForeignKey("table1.id")),
    )
    metadata.create_all(db)
    return table1, table2


def test_basic(db: Engine, tables: Tuple[Table, Table]) -> None:
    table1, table2 = tables
    Session = scoped_session(sessionmaker(db))

    class CustomQuery(Query[Any]):
        pass

    class SomeObject:
        query = Session.query_property()

    class SomeOtherObject:
        query = Session.query_property()
        custom_query = Session.query_property(query_cls=CustomQuery)

    mapper_registry = registry()
    mapper_registry.map_imperatively(
        SomeObject, table1, properties={"options": relationship(SomeOtherObject)}
    )
    mapper_registry.map_imperatively(SomeOtherObject, table2)
    try:
        s = SomeObject()
        s.id, s.data = 1, "hello"  # type: ignore[attr-defined]
        sso = SomeOtherObject()
        s.options.append(sso)  # type: ignore[attr-defined]
        Session.add(s)
        Session.commit()
        Session.refresh(sso)
        Session.remove()

        for loaded in (Session.query(SomeObject).one(), SomeObject.query.one()):
            assert (loaded.id, loaded.data) == (1, "hello")
            assert [o.someid for o in loaded.options] == [1]
        other = SomeOtherObject.query.filter(
            SomeOtherObject.someid == sso.someid  # type: ignore[attr-defined]
        ).one()
        assert other.someid == 1
        assert isinstance(SomeOtherObject.query, Query)
        assert not isinstance(SomeOtherObject.query, CustomQuery)
        assert isinstance(SomeOtherObject.custom_query, Query)
        assert isinstance(SomeOtherObject.custom_query, CustomQuery)
    finally:
        Session.remove()
        mapper_registry.dispose()


def test_config_errors(db: Engine) -> None:
    Session = scoped_session(sessionmaker())

    s = Session()  # noqa: F841
    with pytest.raises(sa.exc.InvalidRequestError, match="Scoped session is already present"):
        Session(bind=db)

    with pytest.warns(sa.exc.SAWarning, match="At least one scoped session is already present. "):
        Session.configure(bind=db)
    Session.remove()


def test_configure_without_a_session_does_not_warn(db: Engine) -> None:
    Session = scoped_session(sessionmaker())
    Session.configure(bind=db)  # filterwarnings = error: any warning fails
    assert Session().get_bind() is db
    Session.remove()


def test_call_with_kwargs() -> None:
    mock_scope_func = mock.Mock()
    SessionMaker = sa.orm.sessionmaker()
    Session = scoped_session(sa.orm.sessionmaker(), mock_scope_func)

    s0 = SessionMaker()
    assert s0.autoflush is True

    mock_scope_func.return_value = 0
    s1 = Session()
    assert s1.autoflush is True

    with pytest.raises(sa.exc.InvalidRequestError, match="Scoped session is already present"):
        Session(autoflush=False)

    mock_scope_func.return_value = 1
    s2 = Session(autoflush=False)
    assert s2.autoflush is False


def test_methods_etc() -> None:
    def exercise(make: Any) -> mock.Mock:
        mock_session = mock.Mock()
        mock_session.bind = "the bind"
        sess = make(lambda: mock_session)
        sess.add("add")
        sess.delete("delete")
        sess.get("Cls", 5)
        assert sess.bind == "the bind"
        return mock_session

    ours = exercise(scoped_session)
    stock = exercise(stock_scoped_session)
    assert ours.mock_calls == stock.mock_calls  # the same proxy, the same arguments
    assert ours.mock_calls[:2] == [mock.call.add("add", _warn=True), mock.call.delete("delete")]
    assert ours.mock_calls[2][0] == "get"
    assert ours.mock_calls[2][1] == ("Cls", 5)

    sess = scoped_session(lambda: mock.Mock())
    with mock.patch("sqlalchemy.orm.session.object_session") as mock_object_session:
        sess.object_session("foo")
    assert mock_object_session.mock_calls == [mock.call("foo")]


@pytest.mark.parametrize("style", ["style1", "style2", "style3", "style4"])
def test_get_bind_custom_session_subclass(db: Engine, style: str) -> None:
    """SQLAlchemy issue #6285."""

    class MySession(Session):
        if style in ("style1", "style4"):

            def get_bind(self, mapper: Any = None, **kwargs: Any) -> Any:
                return super().get_bind(mapper=mapper, **kwargs)

        else:  # style2 (the workaround for #6285) and style3

            def get_bind(self, mapper: Any = None, *args: Any, **kwargs: Any) -> Any:
                return super().get_bind(mapper, *args, **kwargs)

    s1 = MySession(db)
    assert s1.get_bind() is db

    ss = scoped_session(sessionmaker(db, class_=MySession))
    assert ss.get_bind() is db
    ss.remove()


def test_attributes(db: Engine) -> None:
    expected = [name for cls in Session.mro() for name in vars(cls) if not name.startswith("_")]
    ignore_list = {
        "connection_callable",
        "transaction",
        "in_transaction",
        "in_nested_transaction",
        "get_transaction",
        "get_nested_transaction",
        "prepare",
        "invalidate",
        "bind_mapper",
        "bind_table",
        "enable_relationship_loading",
        "dispatch",
    }
    SM = scoped_session(sa.orm.sessionmaker(db))
    missing = [name for name in expected if not hasattr(SM, name) and name not in ignore_list]
    assert missing == []


def test_every_attribute_of_the_stock_class_is_present(db: Engine) -> None:
    ours = scoped_session(sessionmaker(db))
    stock = stock_scoped_session(sessionmaker(db))
    assert set(dir(stock)) - set(dir(ours)) == set()
    for name in dir(stock_scoped_session):
        if name.startswith("_"):
            continue
        # every public method, property and proxy is SQLAlchemy's own, not a copy
        assert name not in vars(scoped_session), name


def test_proxied_methods_and_attributes_reach_the_current_session(db: Engine) -> None:
    Session = scoped_session(sessionmaker(db))
    current = Session()
    assert Session.bind is db
    assert Session.get_bind() is db
    assert Session.identity_map is current.identity_map
    assert Session.execute(sa.text("select 1")).scalar() == 1
    assert Session.scalar(sa.text("select 2")) == 2
    assert current.in_transaction()
    Session.rollback()
    assert not current.in_transaction()
    assert Session.is_active
    Session.autoflush = False
    assert current.autoflush is False
    assert Session.info is current.info
    assert Session.no_autoflush is not None
    assert Session.object_session is not None
    Session.remove()


def test_remove_closes_the_session_and_the_next_call_creates_a_new_one(db: Engine) -> None:
    closed = []

    class Tracking(Session):
        def close(self) -> None:
            closed.append(self)
            super().close()

    Scoped = scoped_session(sessionmaker(db, class_=Tracking))
    first = Scoped()
    Scoped.execute(sa.text("select 1"))
    Scoped.remove()
    assert closed == [first]
    assert not first.in_transaction()
    assert not Scoped.registry.has()
    assert Scoped() is not first
    Scoped.remove()
    Scoped.remove()  # removing when nothing is present is fine
    assert len(closed) == 2
