"""``greenscope.scope()``: the with, async with and decorator forms, nesting, ownership, errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Iterator, List

import gevent
import gevent.event
import pytest
from conftest import run_python, session_class_whose_first_close_hangs
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import greenscope
from greenscope.asyncio import async_scoped_session
from greenscope.scoping import ScopeKey

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A file SQLite engine (QueuePool), so ``pool.checkedout()`` tells what a session holds."""
    eng = create_engine(f"sqlite:///{tmp_path / 'explicit.db'}")
    with eng.begin() as conn:
        conn.exec_driver_sql("create table t (id integer primary key, owner text)")
    yield eng
    eng.dispose()


@pytest.fixture
def aengine(tmp_path: Path) -> Iterator[AsyncEngine]:
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'explicit_async.db'}")
    yield eng
    asyncio.run(eng.dispose())


def checked_out(engine: Engine) -> int:
    return engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


def use(session: Session) -> Session:
    """Run a query so the session holds a connection (and a transaction)."""
    session.execute(text("select 1"))
    return session


# -- with ------------------------------------------------------------------------------


def test_with_scope_gives_a_fresh_session_closed_and_removed_at_exit(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    outside = use(Session_())
    with greenscope.scope():
        inside = use(Session_())
        assert inside is not outside
        assert Session_() is inside
        assert checked_out(engine) == 2
    assert not inside.in_transaction()  # closed: its transaction and connection are gone
    assert checked_out(engine) == 1  # only the outside session's connection
    assert Session_() is outside
    assert len(Session_.registry) == 1
    Session_.remove()
    assert checked_out(engine) == 0


def test_with_scope_closes_sessions_when_the_block_raises_and_the_error_propagates(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    error = ValueError("boom")
    with pytest.raises(ValueError) as raised, greenscope.scope():
        session = use(Session_())
        raise error
    assert raised.value is error
    assert not session.in_transaction()
    assert checked_out(engine) == 0
    assert len(Session_.registry) == 0


def test_scope_closes_sessions_of_every_registry_used_inside(engine: Engine) -> None:
    one = greenscope.scoped_session(sessionmaker(engine))
    two = greenscope.scoped_session(sessionmaker(engine))
    with greenscope.scope():
        a, b = use(one()), use(two())
        assert checked_out(engine) == 2
    assert checked_out(engine) == 0
    assert not a.in_transaction() and not b.in_transaction()
    assert len(one.registry) == len(two.registry) == 0


def test_current_scope_inside_is_the_key_returned_by_enter() -> None:
    with greenscope.scope() as key:
        assert isinstance(key, ScopeKey)
        assert greenscope.current_scope() is key
        with greenscope.scope() as inner:
            assert inner is not key
            assert greenscope.current_scope() is inner
        assert greenscope.current_scope() is key
    assert greenscope.current_scope() is not key


def test_reentering_the_same_scope_object_while_open_raises() -> None:
    block = greenscope.scope()
    with block, pytest.raises(RuntimeError, match="already open"), block:
        pass  # pragma: no cover - never reached


def test_exiting_a_scope_that_is_not_open_raises() -> None:
    with pytest.raises(RuntimeError, match="not open"):
        greenscope.scope().__exit__(None, None, None)


# -- nesting -----------------------------------------------------------------------------


def test_nested_three_deep_inner_exit_never_touches_outer_sessions(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    with greenscope.scope():
        outer = Session_()
        outer.execute(text("insert into t (owner) values ('outer')"))  # uncommitted
        with greenscope.scope():
            middle = use(Session_())
            with greenscope.scope():
                inner = use(Session_())
                assert len({id(outer), id(middle), id(inner)}) == 3
            assert not inner.in_transaction()
            assert Session_() is middle
            assert middle.in_transaction()
            middle.execute(text("select count(*) from t"))  # still usable
        assert not middle.in_transaction()
        assert Session_() is outer
        assert outer.in_transaction()  # its transaction is intact: the insert is still pending
        assert outer.execute(text("select count(*) from t")).scalar() == 1
        assert checked_out(engine) == 1
    assert checked_out(engine) == 0
    with engine.connect() as conn:  # never committed, rolled back at the outer exit
        assert conn.exec_driver_sql("select count(*) from t").scalar() == 0


def test_inner_scope_does_not_see_the_outer_session_through_the_fast_path(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    greenlet_session = Session_()
    Session_()  # warm the fast-path cache in this context
    with greenscope.scope():
        assert Session_() is not greenlet_session
    assert Session_() is greenlet_session
    Session_.remove()


# -- the decorator -------------------------------------------------------------------------


def test_decorator_runs_each_call_of_a_function_in_a_fresh_scope(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    keys: List[object] = []

    @greenscope.scope()
    def job(n: int) -> Session:
        keys.append(greenscope.current_scope())
        session = use(Session_())
        assert checked_out(engine) == 1
        return session

    assert job.__name__ == "job"
    sessions = [job(n) for n in range(5)]
    assert len({id(s) for s in sessions}) == 5
    assert len({id(k) for k in keys}) == 5
    assert all(isinstance(k, ScopeKey) for k in keys)
    assert all(not s.in_transaction() for s in sessions)
    assert checked_out(engine) == 0
    assert len(Session_.registry) == 0


def test_decorator_closes_the_session_when_the_function_raises(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    seen: List[Session] = []

    @greenscope.scope()
    def job() -> None:
        seen.append(use(Session_()))
        raise KeyError("job failed")

    with pytest.raises(KeyError, match="job failed"):
        job()
    assert not seen[0].in_transaction()
    assert checked_out(engine) == 0


def test_decorator_on_a_coroutine_function_awaits_async_session_close(
    aengine: AsyncEngine,
) -> None:
    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine))
    seen: List[Any] = []

    @greenscope.scope()
    async def job() -> int:
        session = AsyncSession_()
        await session.execute(text("select 1"))
        seen.append((session, greenscope.current_scope()))
        return aengine.sync_engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]

    async def main() -> List[int]:
        held = []
        for _ in range(3):
            assert await job() == 1
            held.append(aengine.sync_engine.pool.checkedout())  # right after the scope exit
        return held

    assert asyncio.iscoroutinefunction(job)
    assert asyncio.run(main()) == [0, 0, 0]
    assert len({id(s) for s, _ in seen}) == 3
    assert len({id(k) for _, k in seen}) == 3
    assert len(AsyncSession_.registry) == 0


# -- async with ------------------------------------------------------------------------------


def test_async_with_awaits_async_session_close_before_returning(aengine: AsyncEngine) -> None:
    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine))
    pool = aengine.sync_engine.pool

    async def main() -> List[Any]:
        async with greenscope.scope() as key:
            assert greenscope.current_scope() is key
            session = AsyncSession_()
            await session.execute(text("select 1"))
            during = pool.checkedout()  # type: ignore[attr-defined]
        after = pool.checkedout()  # type: ignore[attr-defined]  # no await since exit
        return [during, after, session.in_transaction(), len(AsyncSession_.registry)]

    assert asyncio.run(main()) == [1, 0, False, 0]


def test_async_with_closes_sessions_when_the_block_raises(aengine: AsyncEngine) -> None:
    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine))
    pool = aengine.sync_engine.pool
    error = LookupError("async boom")

    async def main() -> int:
        with pytest.raises(LookupError) as raised:
            async with greenscope.scope():
                await AsyncSession_().execute(text("select 1"))
                raise error
        assert raised.value is error
        return pool.checkedout()  # type: ignore[attr-defined,no-any-return]

    assert asyncio.run(main()) == 0
    assert len(AsyncSession_.registry) == 0


def test_async_with_postgres_returns_the_asyncpg_connection_at_exit(pg_async_url: str) -> None:
    async def main() -> List[Any]:
        aeng = create_async_engine(pg_async_url, pool_size=2)
        AsyncSession_ = async_scoped_session(async_sessionmaker(aeng))
        try:
            async with greenscope.scope():
                outer = AsyncSession_()
                await outer.execute(text("select 1"))
                async with greenscope.scope():
                    inner = AsyncSession_()
                    await inner.execute(text("select 1"))
                    both = aeng.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
                one = aeng.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
                still = AsyncSession_() is outer and outer.in_transaction()
            none = aeng.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            return [both, one, still, none]
        finally:
            await aeng.dispose()

    assert asyncio.run(main()) == [2, 1, True, 0]


def test_async_with_closes_sync_sessions_created_inside_too(
    engine: Engine, aengine: AsyncEngine
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))

    async def main() -> List[Any]:
        async with greenscope.scope():
            session = use(Session_())
            during = checked_out(engine)
        return [during, checked_out(engine), session.in_transaction()]

    assert asyncio.run(main()) == [1, 0, False]


def test_async_with_cancelled_while_closing_still_closes_every_session_then_re_raises(
    aengine: AsyncEngine,
) -> None:
    """Regression: a cancel during the first close used to leave every session unclosed."""
    from sqlalchemy.ext.asyncio import AsyncSession

    in_close: List[asyncio.Event] = []  # made in main(): on 3.9 an Event binds a loop at once

    class SlowClose(AsyncSession):
        async def close(self) -> None:
            in_close[0].set()
            await asyncio.sleep(0.05)  # a slow ROLLBACK: the cancel lands here
            await super().close()

    one = async_scoped_session(async_sessionmaker(aengine, class_=SlowClose))
    two = async_scoped_session(async_sessionmaker(aengine, class_=SlowClose))
    pool = aengine.sync_engine.pool

    async def main() -> List[Any]:
        async def request() -> None:
            async with greenscope.scope():
                await one().execute(text("select 1"))
                await two().execute(text("select 1"))

        in_close.append(asyncio.Event())
        task = asyncio.create_task(request())
        await in_close[0].wait()  # the scope exit is now inside the first close
        held = pool.checkedout()  # type: ignore[attr-defined]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [held, pool.checkedout(), len(one.registry), len(two.registry)]  # type: ignore[attr-defined]

    assert asyncio.run(main()) == [2, 0, 0, 0]


def test_greenlet_killed_while_closing_at_scope_exit_still_gets_every_session_closed(
    engine: Engine,
) -> None:
    """Regression: a kill (or gevent.Timeout) during the first close leaked every session."""
    in_close, never = gevent.event.Event(), gevent.event.Event()

    BlocksOnce = session_class_whose_first_close_hangs(in_close, never)  # the kill lands there

    one = greenscope.scoped_session(sessionmaker(engine, class_=BlocksOnce))
    two = greenscope.scoped_session(sessionmaker(engine, class_=BlocksOnce))

    def request() -> None:
        with greenscope.scope():
            use(one())
            use(two())

    job = gevent.spawn(request)
    in_close.wait()
    held = checked_out(engine)
    job.kill()  # GreenletExit raised inside the first close
    for _ in range(100):  # the closer greenlet finishes the job
        if checked_out(engine) == 0:
            break
        gevent.sleep(0)
    assert [held, checked_out(engine), len(one.registry), len(two.registry)] == [2, 0, 0, 0]


def test_sync_with_inside_a_task_closes_an_async_session_on_the_running_loop(
    aengine: AsyncEngine,
) -> None:
    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine))
    pool = aengine.sync_engine.pool

    async def main() -> List[Any]:
        with greenscope.scope():
            session = AsyncSession_()
            await session.execute(text("select 1"))
        removed = len(AsyncSession_.registry)
        for _ in range(20):  # the close was started at exit and finishes as a task on this loop
            if pool.checkedout() == 0:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        return [removed, pool.checkedout(), session.in_transaction()]  # type: ignore[attr-defined]

    assert asyncio.run(main()) == [0, 0, False]


# -- ownership: children never join a scope by accident ------------------------------------------


def test_gevent_children_spawned_inside_a_scope_get_their_own_sessions(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    with greenscope.scope() as key:
        mine = Session_()
        seen: List[Any] = []

        def child() -> None:
            seen.append((Session_(), greenscope.current_scope()))

        gevent.joinall([gevent.spawn(child) for _ in range(3)], raise_error=True)
        gevent.sleep(0)  # let the hub run the finished children's links
        assert Session_() is mine
    assert len(seen) == 3
    assert all(session is not mine for session, _ in seen)
    assert len({id(session) for session, _ in seen}) == 3
    assert all(scope_key is not key for _, scope_key in seen)
    assert len(Session_.registry) == 0


def test_asyncio_child_tasks_created_inside_a_scope_get_their_own_sessions(
    engine: Engine, aengine: AsyncEngine
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine))

    async def main() -> List[Any]:
        async with greenscope.scope() as key:
            mine_sync, mine_async = Session_(), AsyncSession_()

            async def child() -> Any:
                return (Session_(), AsyncSession_(), greenscope.current_scope())

            children = await asyncio.gather(*(asyncio.create_task(child()) for _ in range(3)))
            assert Session_() is mine_sync and AsyncSession_() is mine_async
        await asyncio.sleep(0)  # the children's done-callbacks close their AsyncSessions
        return [key, mine_sync, mine_async, children]

    key, mine_sync, mine_async, children = asyncio.run(main())
    assert all(s is not mine_sync and a is not mine_async for s, a, _ in children)
    assert len({id(s) for s, _, _ in children}) == 3
    assert len({id(a) for _, a, _ in children}) == 3
    assert all(k is not key and not isinstance(k, ScopeKey) for _, _, k in children)


# -- registries created inside a scope -------------------------------------------------------


def test_registry_created_inside_a_scope_does_not_leak_its_session_after_exit(
    engine: Engine,
) -> None:
    with greenscope.scope():
        Session_ = greenscope.scoped_session(sessionmaker(engine))
        inside = use(Session_())
        assert Session_() is inside  # served from the fast-path cache
    after = Session_()
    assert after is not inside
    assert not inside.in_transaction()
    assert checked_out(engine) == 0
    Session_.remove()


def test_registry_created_inside_a_nested_scope_does_not_leak_into_the_outer_scope(
    engine: Engine,
) -> None:
    with greenscope.scope():
        with greenscope.scope():
            Session_ = greenscope.scoped_session(sessionmaker(engine))
            inner = use(Session_())
        outer = Session_()
        assert outer is not inner
    assert checked_out(engine) == 0


# -- errors while closing -------------------------------------------------------------------


class _CloseFails(Session):
    def close(self) -> None:
        super().close()
        raise OSError("close failed")


def test_close_error_at_scope_exit_is_logged_and_raised_when_the_block_succeeded(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine, class_=_CloseFails))
    caplog.set_level(logging.ERROR, logger="greenscope")
    with pytest.raises(OSError, match="close failed"), greenscope.scope():
        use(Session_())
    assert any("error closing" in r.getMessage() for r in caplog.records)
    assert checked_out(engine) == 0
    assert len(Session_.registry) == 0


def test_close_error_at_scope_exit_is_logged_not_raised_when_the_block_raised(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine, class_=_CloseFails))
    plain = greenscope.scoped_session(sessionmaker(engine))
    caplog.set_level(logging.ERROR, logger="greenscope")
    with pytest.raises(ValueError, match="block failed"), greenscope.scope():
        use(Session_())
        use(plain())
        raise ValueError("block failed")
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [OSError]
    assert checked_out(engine) == 0  # the other session was still closed


def test_async_close_error_at_async_exit_is_logged_and_raised_when_the_block_succeeded(
    aengine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    class CloseFails(AsyncSession):
        async def close(self) -> None:
            await super().close()
            raise OSError("async close failed")

    AsyncSession_ = async_scoped_session(async_sessionmaker(aengine, class_=CloseFails))
    caplog.set_level(logging.ERROR, logger="greenscope")

    async def main() -> int:
        with pytest.raises(OSError, match="async close failed"):
            async with greenscope.scope():
                await AsyncSession_().execute(text("select 1"))
        return aengine.sync_engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]

    assert asyncio.run(main()) == 0
    assert any("error closing" in r.getMessage() for r in caplog.records)


# -- the job loop: PostgreSQL, psycopg2 + psycogreen, gevent patched -----------------------------

_JOB_LOOP = """
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, os
import gevent, psycopg2.extensions
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
import greenscope

url = "postgresql+psycopg2://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
engine = create_engine(url, pool_size=5, max_overflow=0, pool_timeout=10)
Session = greenscope.scoped_session(sessionmaker(engine))
sessions, checked, open_after, keys = [], [], [], []

def worker():
    for n in range(100):
        with greenscope.scope() as key:
            session = Session()
            assert Session() is session
            session.execute(text("select pg_sleep(0)")).all()
            sessions.append(session)
            keys.append(key)
        checked.append(engine.pool.checkedout())
        open_after.append(session.in_transaction())

# a second greenlet keeps the hub busy, so the jobs really interleave with other work
ticker = gevent.spawn(lambda: [gevent.sleep(0) for _ in range(500)])
job = gevent.spawn(worker)
job.get()
ticker.get()
print(json.dumps({
    "jobs": len(sessions),
    "distinct_sessions": len({id(s) for s in sessions}),
    "distinct_keys": len({id(k) for k in keys}),
    "max_checked_out_after_a_job": max(checked),
    "open_after": sum(open_after),
    "registry_len": len(Session.registry),
    "wait_callback": psycopg2.extensions.get_wait_callback() is not None,
    "checked_out_end": engine.pool.checkedout(),
}))
"""


def test_worker_greenlet_running_100_jobs_gets_a_fresh_session_per_job_closed_at_exit(
    pg_url: str,
) -> None:
    result = run_python(_JOB_LOOP)
    assert result == {
        "jobs": 100,
        "distinct_sessions": 100,
        "distinct_keys": 100,
        "max_checked_out_after_a_job": 0,
        "open_after": 0,
        "registry_len": 0,
        "wait_callback": True,
        "checked_out_end": 0,
    }


# -- the decorator on generators and coroutine-returning functions (issue 11, item 7) -------


def test_decorated_generator_function_runs_its_whole_iteration_in_one_fresh_scope(
    engine: Engine,
) -> None:
    """0.1 closed the scope before the body ran: the body silently used the caller's session."""
    Session = greenscope.scoped_session(sessionmaker(engine))
    outer = Session()

    @greenscope.scope()
    def rows() -> Iterator[Any]:
        key = greenscope.current_scope()
        for _ in range(3):
            yield type(key) is ScopeKey, Session(), key

    seen = []
    for in_scope, session, key in rows():
        seen.append((in_scope, session, key))
        # between steps the caller is back in its own scope
        assert Session() is outer
        assert greenscope.current_scope() is not key
    assert all(in_scope for in_scope, _, _ in seen)
    assert len({id(s) for _, s, _ in seen}) == 1 and seen[0][1] is not outer
    assert len({id(k) for _, _, k in seen}) == 1
    assert len(Session.registry) == 1  # only the caller's: the generator's scope was closed
    Session.remove()


def test_decorated_generator_closed_early_still_closes_its_scope(engine: Engine) -> None:
    Session = greenscope.scoped_session(sessionmaker(engine))

    @greenscope.scope()
    def rows() -> Iterator[Session]:
        while True:
            yield use(Session())

    iterator = rows()
    next(iterator)
    assert checked_out(engine) == 1
    iterator.close()  # type: ignore[attr-defined]
    assert checked_out(engine) == 0
    assert len(Session.registry) == 0


def test_decorated_plain_function_returning_a_coroutine_scopes_the_awaited_coroutine(
    aengine: AsyncEngine,
) -> None:
    AsyncSession = async_scoped_session(async_sessionmaker(aengine))

    async def body() -> Any:
        session = AsyncSession()
        await session.execute(text("select 1"))
        return greenscope.current_scope(), session

    @greenscope.scope()
    def job() -> Any:  # not a coroutine function: returns one
        return body()

    async def main() -> Any:
        outside = AsyncSession()
        key, session = await job()
        return type(key) is ScopeKey, session is outside, len(AsyncSession.registry)

    assert asyncio.run(main()) == (True, False, 1)  # only the task's own is left


def test_decorating_an_async_generator_function_is_a_clear_type_error() -> None:
    async def rows() -> Any:
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        greenscope.scope()(rows)
