"""``greenscope.asyncio.async_scoped_session``: one AsyncSession per task, closed when it ends.

Coroutines run with ``asyncio.run()`` inside each test (no pytest-asyncio). The embedded cases
use aiosqlite on a file (a ``:memory:`` database's StaticPool races on concurrent first
connects, with or without greenscope); the load cases use PostgreSQL through asyncpg.
Everything a task saw is collected and asserted after ``asyncio.run`` returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

import greenlet
import pytest
from conftest import PG_URL, ROOT, async_pg_url, collect, require_postgres
from sqlalchemy import ForeignKey, String, create_engine, exc, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.asyncio import async_scoped_session as stock_async_scoped_session
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import greenscope
from greenscope import WeakScopeRegistry
from greenscope.asyncio import async_scoped_session, wait_closed
from greenscope.registry import _Entry

_T = TypeVar("_T")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    addresses: Mapped[List[Address]] = relationship(back_populates="user")


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(50))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user: Mapped[User] = relationship(back_populates="addresses")


class RecordingAsyncSession(AsyncSession):
    """A real AsyncSession that records which task ran each ``close()``."""

    async def close(self) -> None:
        self.info.setdefault("closed_by", []).append(asyncio.current_task())
        await super().close()


class FailingCloseAsyncSession(AsyncSession):
    """An AsyncSession whose ``close()`` fails after really closing."""

    async def close(self) -> None:
        await super().close()
        raise RuntimeError("close failed on purpose")


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"


def run(engine_url: str, scenario: Callable[[AsyncEngine], Awaitable[_T]], **kw: Any) -> _T:
    """Run ``scenario(engine)`` as a task of a fresh loop; when it has ended (and its sessions
    are closed), the engine is disposed on that loop."""

    async def main() -> _T:
        engine = create_async_engine(engine_url, **kw)
        try:
            return await asyncio.create_task(scenario(engine))
        finally:
            await wait_closed()
            await engine.dispose()

    return asyncio.run(main())


def greenscope_callbacks(task: asyncio.Future[Any]) -> int:
    """How many done-callbacks greenscope's registries put on ``task``."""
    callbacks = task._callbacks or []  # type: ignore[attr-defined]
    return sum(
        1 for callback, _ctx in callbacks if isinstance(getattr(callback, "__self__", None), _Entry)
    )


# -- the drop-in ----------------------------------------------------------------------------


def test_is_a_subclass_of_the_stock_class_with_the_same_attributes(tmp_path: Path) -> None:
    factory = async_sessionmaker(create_async_engine(sqlite_url(tmp_path)))
    ours = async_scoped_session(factory)
    stock = stock_async_scoped_session(factory, scopefunc=asyncio.current_task)
    assert isinstance(ours, stock_async_scoped_session)
    assert set(dir(ours)) == set(dir(stock))
    assert set(dir(async_scoped_session)) - set(dir(stock_async_scoped_session)) == set()
    assert isinstance(ours.registry, WeakScopeRegistry)
    assert ours.registry.scopefunc is greenscope.current_scope
    assert ours.session_factory is factory
    asyncio.run(factory.kw["bind"].dispose())


def test_default_scope_gives_one_session_per_task_with_no_scopefunc(tmp_path: Path) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine))
        first = Session()
        seen = {
            "same": Session() is first and Session.registry() is first,
            "has": Session.registry.has(),
            "scope_is_task": greenscope.current_scope() is asyncio.current_task(),
            "bind": first.bind is engine,
        }
        await Session.remove()
        seen["has_after_remove"] = Session.registry.has()
        seen["len"] = len(Session.registry)
        return seen

    assert run(sqlite_url(tmp_path), scenario) == {
        "same": True,
        "has": True,
        "scope_is_task": True,
        "bind": True,
        "has_after_remove": False,
        "len": 0,
    }


async def _exercise(Session: Any, engine: AsyncEngine) -> List[Any]:
    """A representative tour of the proxied coroutines and attributes; returns what it saw."""
    seen: List[Any] = []
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    user = User(name="u1", addresses=[Address(email="a@x")])
    Session.add(user)
    Session.add_all([User(name="u2"), User(name="u3")])
    seen.append(("in", user in Session, len(list(Session)), len(Session.new)))
    await Session.flush()
    uid = user.id
    seen.append(("flushed", uid, Session.is_active, Session.is_modified(user)))
    await Session.commit()
    seen.append(("get", (await Session.get(User, uid)) is user))
    seen.append(("get_one", (await Session.get_one(User, uid)).name))
    seen.append(("scalar", await Session.scalar(select(User.name).where(User.id == uid))))
    seen.append(("scalars", list(await Session.scalars(select(User.name).order_by(User.id)))))
    result = await Session.execute(text("select count(*) from users"))
    seen.append(("execute", result.scalar()))
    stream = await Session.stream(select(User.name).order_by(User.id))
    seen.append(("stream", [row[0] async for row in stream]))
    names = await Session.stream_scalars(select(User.name).order_by(User.id))
    seen.append(("stream_scalars", [name async for name in names]))
    user.name = "changed"
    seen.append(("dirty", user in Session.dirty))
    await Session.refresh(user)
    seen.append(("refresh", user.name))
    merged = await Session.merge(User(id=uid, name="merged"))
    seen.append(("merge", merged is user, user.name))
    await Session.rollback()
    Session.expire_all()
    seen.append(("rollback", (await Session.get(User, uid)).name))
    seen.append(("run_sync", await Session().run_sync(lambda s: s.query(User).count())))
    seen.append(("connection", (await (await Session.connection()).scalar(text("select 7")))))
    async with Session.begin_nested():
        Session.add(User(name="nested"))
    for address in await Session.scalars(select(Address)):
        await Session.delete(address)
    await Session.flush()
    await Session.delete(user)
    seen.append(("deleted", user in Session.deleted))
    await Session.flush()
    await Session.commit()
    seen.append(("after delete", await Session.scalar(select(User.id).where(User.id == uid))))
    with Session.no_autoflush:
        seen.append(("no_autoflush", Session.autoflush))
    Session.info["k"] = "v"
    Session.expunge_all()
    seen.append(("info", Session.info["k"], len(Session.identity_map)))
    seen.append(("bind", Session.bind is engine, Session.get_bind() is engine.sync_engine))
    owner = Session.object_session(user)
    seen.append(("object_session", owner is None or owner is Session().sync_session))
    seen.append(("identity_key", Session.identity_key(User, 1)))
    await Session.close()
    await Session.remove()
    return seen


def test_proxied_coroutines_and_attributes_behave_like_the_stock_class(tmp_path: Path) -> None:
    def tour(make: Callable[[async_sessionmaker[AsyncSession]], Any]) -> List[Any]:
        async def scenario(engine: AsyncEngine) -> List[Any]:
            factory = async_sessionmaker(engine, expire_on_commit=False)
            return await _exercise(make(factory), engine)

        return run(sqlite_url(tmp_path), scenario)

    stock = tour(lambda f: stock_async_scoped_session(f, scopefunc=asyncio.current_task))
    ours = tour(async_scoped_session)
    assert ours == stock
    assert ("scalars", ["u1", "u2", "u3"]) in ours  # the tour did run queries


def test_remove_awaits_close_and_the_next_call_creates_a_new_session(tmp_path: Path) -> None:
    async def scenario(engine: AsyncEngine) -> Tuple[Any, ...]:
        Session = async_scoped_session(async_sessionmaker(engine, class_=RecordingAsyncSession))
        first = Session()
        await Session.execute(text("select 1"))
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        await Session.remove()
        closed_by = first.info.get("closed_by")
        return (
            checked_out,
            closed_by == [asyncio.current_task()],
            engine.pool.checkedout(),  # type: ignore[attr-defined]
            len(Session.registry),
            Session() is not first,
            Session.registry.ended_without_remove,
        )

    assert run(sqlite_url(tmp_path), scenario) == (1, True, 0, 0, True, 0)


def test_kwargs_create_the_session_and_are_refused_while_one_exists(tmp_path: Path) -> None:
    async def scenario(engine: AsyncEngine) -> Tuple[Any, ...]:
        Session = async_scoped_session(async_sessionmaker(engine))
        made = Session(info={"made": "with kwargs"})
        with pytest.raises(exc.InvalidRequestError, match="already present"):
            Session(info={"again": True})
        return made.info, Session() is made, len(Session.registry)

    assert run(sqlite_url(tmp_path), scenario) == ({"made": "with kwargs"}, True, 1)


# -- the task end hook ----------------------------------------------------------------------


def test_one_done_callback_per_task_and_registry_however_often_the_session_is_used(
    tmp_path: Path,
) -> None:
    async def scenario(engine: AsyncEngine) -> Tuple[int, int, int]:
        One = async_scoped_session(async_sessionmaker(engine))
        Two = async_scoped_session(async_sessionmaker(engine))
        task = asyncio.current_task()
        assert task is not None
        before = greenscope_callbacks(task)
        for _ in range(100):
            One()
            One.info["n"] = 1
            await One.execute(text("select 1"))
        after_one = greenscope_callbacks(task)
        for _ in range(100):
            Two()
        return before, after_one, greenscope_callbacks(task)

    assert run(sqlite_url(tmp_path), scenario) == (0, 1, 2)


def test_remove_takes_the_done_callback_off_so_a_long_lived_task_keeps_none(
    tmp_path: Path,
) -> None:
    # Regression: every remove()/reuse cycle used to leave one callback on the task, so a
    # worker task serving jobs with remove() after each grew one callback per job.
    async def scenario(engine: AsyncEngine) -> Tuple[int, int]:
        Session = async_scoped_session(async_sessionmaker(engine))
        task = asyncio.current_task()
        assert task is not None
        for _ in range(50):
            await Session.execute(text("select 1"))
            await Session.remove()
        after_cycles = greenscope_callbacks(task)
        Session()
        return after_cycles, greenscope_callbacks(task)

    assert run(sqlite_url(tmp_path), scenario) == (0, 1)


def test_session_closed_on_the_loop_when_task_ends_while_still_referenced(
    tmp_path: Path,
) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine, class_=RecordingAsyncSession))

        held: List[int] = []

        async def handler() -> AsyncSession:
            await Session.execute(text("select 1"))  # holds a connection; no remove()
            held.append(engine.pool.checkedout())  # type: ignore[attr-defined]
            return Session()

        task = asyncio.create_task(handler())
        session = await task
        await asyncio.sleep(0)  # the task's done-callbacks have run
        registered_at_task_end = len(Session.registry)  # dropped at once by the done-callback
        await wait_closed()
        closed_by = session.info.get("closed_by", [])
        return {
            "len": len(Session.registry),
            "registered_at_task_end": registered_at_task_end,
            "held_in_task": held,
            "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
            "closed_once": len(closed_by) == 1,
            "closed_in_another_task_on_this_loop": closed_by[0] is not task
            and closed_by[0].get_loop() is asyncio.get_running_loop(),
            "ended_without_remove": Session.registry.ended_without_remove,
            "task_still_referenced": task.done(),
        }

    assert run(sqlite_url(tmp_path), scenario) == {
        "len": 0,
        "registered_at_task_end": 0,
        "held_in_task": [1],
        "checked_out": 0,
        "closed_once": True,
        "closed_in_another_task_on_this_loop": True,
        "ended_without_remove": 1,
        "task_still_referenced": True,
    }


def test_finished_tasks_and_their_sessions_are_not_kept_alive(tmp_path: Path) -> None:
    # SQLAlchemy issue 8340: the stock registry keeps every Task and AsyncSession it saw.
    async def scenario(engine: AsyncEngine) -> List[bool]:
        Session = async_scoped_session(async_sessionmaker(engine))
        refs: List[weakref.ref[Any]] = []

        async def handler() -> None:
            await Session.execute(text("select 1"))
            refs.append(weakref.ref(asyncio.current_task()))
            refs.append(weakref.ref(Session()))

        await asyncio.gather(*(asyncio.create_task(handler()) for _ in range(5)))
        await wait_closed()
        collect()
        return [ref() is None for ref in refs]

    assert run(sqlite_url(tmp_path), scenario) == [True] * 10


def test_error_while_closing_an_ended_tasks_session_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(engine: AsyncEngine) -> Tuple[int, int, str]:
        Session = async_scoped_session(async_sessionmaker(engine, class_=FailingCloseAsyncSession))

        async def handler() -> None:
            await Session.execute(text("select 1"))

        await asyncio.gather(*(asyncio.create_task(handler()) for _ in range(3)))
        await wait_closed()
        await asyncio.sleep(0)
        return len(Session.registry), engine.pool.checkedout(), "still running"  # type: ignore[attr-defined]

    with caplog.at_level(logging.ERROR, logger="greenscope"):
        assert run(sqlite_url(tmp_path), scenario) == (0, 0, "still running")
    failures = [r for r in caplog.records if "error closing" in r.getMessage()]
    assert len(failures) == 3
    assert all("close failed on purpose" in str(r.exc_info[1]) for r in failures if r.exc_info)


# -- children, run_sync, sync sessions, threads ---------------------------------------------


def test_child_tasks_never_share_their_parents_session(tmp_path: Path) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine))
        parent = Session()  # cached in the parent's context, which children copy
        await Session.execute(text("select 1"))
        kept: List[AsyncSession] = []

        async def child() -> AsyncSession:
            await Session.execute(text("select 1"))
            kept.append(Session())
            return Session()

        created = [await asyncio.create_task(child()) for _ in range(3)]
        gathered = await asyncio.gather(child(), child(), child())
        grouped: List[AsyncSession] = []
        if hasattr(asyncio, "TaskGroup"):
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                tasks = [group.create_task(child()) for _ in range(3)]
            grouped = [t.result() for t in tasks]
        children = created + list(gathered) + grouped
        return {
            "parent_kept": Session() is parent,
            "parent_shared": any(s is parent for s in children),
            "children": len(children),
            "distinct": len({id(s) for s in kept}),
            "kept": len(kept),
        }

    seen = run(sqlite_url(tmp_path), scenario)
    expected_children = 9 if hasattr(asyncio, "TaskGroup") else 6
    assert seen == {
        "parent_kept": True,
        "parent_shared": False,
        "children": expected_children,
        "distinct": expected_children,
        "kept": expected_children,
    }


def test_run_sync_sees_the_calling_task_as_scope_and_its_sync_session(tmp_path: Path) -> None:
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    SyncSession = greenscope.scoped_session(sessionmaker(sync_engine))

    async def scenario(engine: AsyncEngine) -> List[Dict[str, Any]]:
        Session = async_scoped_session(async_sessionmaker(engine))

        async def request() -> Dict[str, Any]:
            task = asyncio.current_task()
            sync_in_task = SyncSession()

            def inside(sync_session: Session) -> Dict[str, Any]:
                return {
                    "greenlet_is_sqlalchemys": greenlet.getcurrent().parent is not None,
                    "scope_is_task": greenscope.current_scope() is task,
                    "sync_session_is_the_tasks": SyncSession() is sync_in_task,
                    "sync_query": SyncSession.execute(text("select 3")).scalar(),
                    "async_session_is_the_tasks": sync_session is Session().sync_session,
                }

            seen = await Session().run_sync(inside)
            seen["sync"] = sync_in_task
            return seen

        return list(await asyncio.gather(*(request() for _ in range(3))))

    try:
        seen = run(sqlite_url(tmp_path), scenario)
    finally:
        sync_engine.dispose()
    sync_sessions = [s.pop("sync") for s in seen]
    assert len({id(s) for s in sync_sessions}) == 3
    expected = {
        "greenlet_is_sqlalchemys": True,
        "scope_is_task": True,
        "sync_session_is_the_tasks": True,
        "sync_query": 3,
        "async_session_is_the_tasks": True,
    }
    assert seen == [expected] * 3
    assert len(SyncSession.registry) == 0  # the tasks ended: their sync sessions too


def test_sync_scoped_session_in_asyncio_code_is_per_task_not_per_loop_greenlet(
    tmp_path: Path,
) -> None:
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    SyncSession = greenscope.scoped_session(sessionmaker(sync_engine))
    main_before = SyncSession()  # the main greenlet's session, cached in the main context

    async def request() -> Tuple[Session, Session]:
        first = SyncSession()
        await asyncio.sleep(0)
        SyncSession.execute(text("select 1"))
        return first, SyncSession()

    async def main() -> Dict[str, Any]:
        in_main_task = SyncSession()
        pairs = await asyncio.gather(*(request() for _ in range(5)))
        sessions = [first for first, _ in pairs] + [in_main_task]
        return {
            "stable_within_task": all(a is b for a, b in pairs),
            "distinct": len({id(s) for s in sessions}),
            "inherited_main_greenlets": any(s is main_before for s in sessions),
            "live_during": len(SyncSession.registry),
        }

    try:
        seen = asyncio.run(main())
        assert seen == {
            "stable_within_task": True,
            "distinct": 6,
            "inherited_main_greenlets": False,
            "live_during": 2,  # the main greenlet's and the main task's; the others ended
        }
        assert SyncSession() is main_before  # the main greenlet kept its own
        assert len(SyncSession.registry) == 1
        SyncSession.remove()
    finally:
        sync_engine.dispose()


def test_to_thread_does_not_get_the_tasks_session(tmp_path: Path) -> None:
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    SyncSession = greenscope.scoped_session(sessionmaker(sync_engine))

    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine))
        in_task, async_in_task = SyncSession(), Session()

        def in_thread() -> Dict[str, Any]:
            try:
                Session()
                async_error = ""
            except RuntimeError as error:
                async_error = str(error)
            mine = SyncSession()
            seen = {
                "scope_is_threads_greenlet": greenscope.current_scope() is greenlet.getcurrent(),
                "sync_is_tasks": mine is in_task,
                "async_error": "outside a running asyncio task" in async_error,
            }
            SyncSession.remove()
            return seen

        seen = await asyncio.to_thread(in_thread)
        seen["task_kept_both"] = SyncSession() is in_task and Session() is async_in_task
        SyncSession.remove()
        return seen

    try:
        seen = run(sqlite_url(tmp_path), scenario)
    finally:
        sync_engine.dispose()
    assert seen == {
        "scope_is_threads_greenlet": True,
        "sync_is_tasks": False,
        "async_error": True,
        "task_kept_both": True,
    }


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("factory_kind", ["sessionmaker", "Session class"])
def test_sync_factory_raises_type_error_naming_greenscope_scoped_session(
    tmp_path: Path, factory_kind: str
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    factory: Any = sessionmaker(engine) if factory_kind == "sessionmaker" else Session
    with pytest.raises(TypeError, match=r"use greenscope\.scoped_session"):
        async_scoped_session(factory)
    engine.dispose()


def test_async_factories_of_every_stock_form_are_accepted(tmp_path: Path) -> None:
    engine = create_async_engine(sqlite_url(tmp_path))
    factories: List[Any] = [
        async_sessionmaker(engine),
        sessionmaker(engine, class_=AsyncSession),  # the form SQLAlchemy's own tests use
        lambda: AsyncSession(engine),
    ]

    async def main() -> List[bool]:
        made = []
        for factory in factories:
            Session = async_scoped_session(factory)
            made.append(isinstance(Session(), AsyncSession))
            await Session.remove()
        await engine.dispose()
        return made

    assert asyncio.run(main()) == [True, True, True]


def test_no_running_loop_and_no_scope_raises_runtime_error_and_stores_nothing(
    tmp_path: Path,
) -> None:
    engine = create_async_engine(sqlite_url(tmp_path))
    Session = async_scoped_session(async_sessionmaker(engine))
    attempts: List[Callable[[], Any]] = [
        Session,
        Session.registry,
        Session.registry.has,
        lambda: Session(info={"k": 1}),
        lambda: Session.add(User(name="x")),
        lambda: Session.info,
        lambda: Session.registry.set(AsyncSession(engine)),
    ]
    for attempt in attempts:
        with pytest.raises(RuntimeError, match="outside a running asyncio task"):
            attempt()
        assert len(Session.registry) == 0
    remove = Session.remove()
    with pytest.raises(RuntimeError, match=r"greenscope\.scope\(\)"):
        remove.send(None)
    remove.close()
    assert len(Session.registry) == 0
    with greenscope.scope():  # an explicit scope is a place for one, even without a loop
        assert Session() is Session()
    assert len(Session.registry) == 0


def test_explicit_scopefunc_keeps_stock_semantics_outside_a_loop(tmp_path: Path) -> None:
    engine = create_async_engine(sqlite_url(tmp_path))
    Session = async_scoped_session(async_sessionmaker(engine), scopefunc=lambda: "fixed")
    assert Session() is Session()  # the user chose the scope: no RuntimeError
    Session.registry.clear()
    assert len(Session.registry) == 0


# -- loop shutdown --------------------------------------------------------------------------


def test_asyncio_run_closes_sessions_of_tasks_still_registered_at_shutdown(
    tmp_path: Path,
) -> None:
    # Regression: asyncio.run() used to cancel the close task before it started, leaving
    # "coroutine 'AsyncSession.close' was never awaited" and the connection checked out.
    engine = create_async_engine(sqlite_url(tmp_path))
    Session = async_scoped_session(async_sessionmaker(engine, class_=RecordingAsyncSession))
    sessions: List[AsyncSession] = []

    async def background() -> None:
        await Session.execute(text("select 1"))
        sessions.append(Session())
        await asyncio.sleep(3600)  # cancelled by asyncio.run at shutdown

    async def main() -> None:
        await Session.execute(text("select 1"))
        sessions.append(Session())
        lingering = [asyncio.create_task(background()) for _ in range(3)]
        while len(sessions) < 1 + len(lingering):
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert [len(s.info.get("closed_by", [])) for s in sessions] == [1, 1, 1, 1]
    assert len(Session.registry) == 0
    assert Session.registry.ended_without_remove == 4

    async def dispose() -> None:
        await engine.dispose()

    asyncio.run(dispose())


class HangingCloseAsyncSession(AsyncSession):
    """An AsyncSession whose ``close()`` never finishes, as against a server that went silent."""

    async def close(self) -> None:
        await asyncio.Event().wait()


def test_a_close_that_hangs_at_shutdown_is_abandoned_after_the_deadline_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from greenscope.runtimes import aio

    monkeypatch.setattr(aio, "CLOSE_TIMEOUT", 0.2)
    engine = create_async_engine(sqlite_url(tmp_path))
    Session = async_scoped_session(async_sessionmaker(engine, class_=HangingCloseAsyncSession))

    async def main() -> None:
        Session()  # no connection: only the close itself hangs

    with caplog.at_level(logging.ERROR, logger="greenscope"):
        asyncio.run(main())  # returns: asyncio.run waited for the close, then it expired
    assert len(Session.registry) == 0
    assert [r.getMessage().split(";")[1] for r in caplog.records] == [" abandoned"]


_EXIT_SCRIPT = """
import asyncio, json, sys
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from greenscope.asyncio import async_scoped_session

class SlowNetworkAsyncSession(AsyncSession):
    async def close(self):
        await asyncio.sleep(0.05)  # a close takes a few loop iterations, as over a real network
        await super().close()

url = sys.argv[1]
engine = create_async_engine(url, pool_size=5, max_overflow=0, pool_timeout=10)
Session = async_scoped_session(async_sessionmaker(engine, class_=SlowNetworkAsyncSession))
started = []

async def request():
    await Session.execute(text("select 1"))

async def lingering():
    await Session.execute(text("select 1"))
    started.append(1)
    await asyncio.sleep(3600)  # still pending when asyncio.run() shuts the loop down

async def main():
    await asyncio.gather(*(request() for _ in range(10)))
    for _ in range(3):
        asyncio.create_task(lingering())
    while len(started) < 3:
        await asyncio.sleep(0.01)
    await Session.execute(text("select 1"))  # the main task's own, never removed either

asyncio.run(main())
print(json.dumps({"registered": len(Session.registry),
                  "checked_out": engine.pool.checkedout(),
                  "ended_without_remove": Session.registry.ended_without_remove}))
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_loop_closed_with_sessions_registered_exits_cleanly_without_warnings(
    tmp_path: Path, database: str
) -> None:
    if database == "postgresql":
        require_postgres()
        url = async_pg_url()
    else:
        url = sqlite_url(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GREENSCOPE_PG_URL=PG_URL)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_EXIT_SCRIPT), url],
        capture_output=True,
        text=True,
        timeout=60,  # "nothing hangs"
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    for marker in ("Traceback", "Task was destroyed", "never awaited", "Exception ignored"):
        assert marker not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "registered": 0,
        "checked_out": 0,
        "ended_without_remove": 14,
    }


# -- must show: load without remove(), against the stock class ------------------------------


async def _requests(
    Session: Any,
    engine: AsyncEngine,
    *,
    tasks: int,
    batch: int,
    children: bool,
) -> Dict[str, Any]:
    """``tasks`` request tasks in batches of ``batch`` concurrent; each queries and never
    calls ``remove()``; with ``children``, each also runs a child task that queries first."""
    sessions: List[Tuple[AsyncSession, Optional[AsyncSession]]] = []
    timeouts = 0

    async def child() -> AsyncSession:
        await Session.execute(text("select 1"))
        return Session()

    async def request() -> None:
        nonlocal timeouts
        mine = Session()  # no connection yet: the child must not wait behind its parent
        try:
            kid = await asyncio.create_task(child()) if children else None
            await Session.execute(text("select 1"))
        except exc.TimeoutError:
            timeouts += 1
            return
        sessions.append((mine, kid))

    for start in range(0, tasks, batch):
        await asyncio.gather(*(request() for _ in range(min(batch, tasks - start))))
    flat = [s for pair in sessions for s in pair if s is not None]
    return {
        "timeouts": timeouts,
        "sessions": len(flat),
        "distinct": len({id(s) for s in flat}),
        "child_shares_parent": any(parent is kid for parent, kid in sessions),
    }


@pytest.mark.postgres
def test_200_tasks_without_remove_on_postgres_pool_of_5_leave_nothing_behind(
    pg_async_url: str,
) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine))
        seen = await _requests(Session, engine, tasks=200, batch=10, children=True)
        for _ in range(3):
            await asyncio.sleep(0)
        await wait_closed()
        seen["checked_out"] = engine.pool.checkedout()  # type: ignore[attr-defined]
        seen["registered"] = len(Session.registry)
        seen["ended_without_remove"] = Session.registry.ended_without_remove
        return seen

    seen = run(pg_async_url, scenario, pool_size=5, max_overflow=0, pool_timeout=5)
    assert seen == {
        "timeouts": 0,
        "sessions": 400,
        "distinct": 400,
        "child_shares_parent": False,
        "checked_out": 0,
        "registered": 0,
        "ended_without_remove": 400,
    }


def test_200_tasks_without_remove_on_aiosqlite_pool_of_5_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        Session = async_scoped_session(async_sessionmaker(engine))
        seen = await _requests(Session, engine, tasks=200, batch=10, children=True)
        await wait_closed()
        seen["checked_out"] = engine.pool.checkedout()  # type: ignore[attr-defined]
        seen["registered"] = len(Session.registry)
        return seen

    seen = run(sqlite_url(tmp_path), scenario, pool_size=5, max_overflow=0, pool_timeout=5)
    assert seen == {
        "timeouts": 0,
        "sessions": 400,
        "distinct": 400,
        "child_shares_parent": False,
        "checked_out": 0,
        "registered": 0,
    }


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["greenscope", "stock current_task"])
def test_40_tasks_without_remove_stock_current_task_leaks_and_greenscope_does_not(
    pg_async_url: str, kind: str
) -> None:
    async def scenario(engine: AsyncEngine) -> Dict[str, Any]:
        factory = async_sessionmaker(engine)
        if kind == "greenscope":
            Session: Any = async_scoped_session(factory)
        else:
            Session = stock_async_scoped_session(factory, scopefunc=asyncio.current_task)
        seen = await _requests(Session, engine, tasks=40, batch=10, children=False)
        await wait_closed()
        seen["checked_out"] = engine.pool.checkedout()  # type: ignore[attr-defined]
        if kind == "greenscope":
            seen["kept_alive"] = len(Session.registry)
        else:
            kept = Session.registry.registry
            seen["kept_alive"] = len(kept)
            seen["kept_tasks_done"] = all(task.done() for task in kept)
            for session in list(kept.values()):  # give the connections back before dispose
                await session.close()
        return seen

    seen = run(pg_async_url, scenario, pool_size=5, max_overflow=0, pool_timeout=1)
    if kind == "greenscope":
        assert seen["timeouts"] == 0
        assert seen["checked_out"] == 0
        assert seen["kept_alive"] == 0
    else:  # SQLAlchemy issue 8340: every finished Task and its AsyncSession stay alive
        assert seen["timeouts"] >= 30
        assert seen["checked_out"] == 5
        assert seen["kept_alive"] == 40
        assert seen["kept_tasks_done"] is True
