"""``greenscope.runtimes``: how the sessions of ended greenlets and tasks get closed.

On a loop, closes that need no I/O are batched in one closer task; a close that does I/O (a
session in a transaction, or any close that suspends) runs in a closer of its own, so closes
never wait behind one another's round trip, and each has its own deadline. Under gevent, one
closer greenlet drains a burst, and a fresh one takes over while it is blocked in a close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import gevent
import pytest
from greenlet import getcurrent
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import greenscope
from greenscope.asyncio import async_scoped_session, wait_closed
from greenscope.runtimes import aio
from greenscope.runtimes.gevent import GeventHome


class FakeAsyncSession:
    """What the closers see of an ``AsyncSession``: ``in_transaction()`` and ``close()``."""

    def __init__(
        self,
        name: str,
        closed: Dict[str, float],
        delay: Optional[float] = None,  # None: close() never suspends
        in_transaction: bool = False,
        hang: bool = False,
        fail: bool = False,
    ) -> None:
        self.name, self.closed, self.delay = name, closed, delay
        self.transaction, self.hang, self.fail = in_transaction, hang, fail
        self.closed_by: List[Optional[asyncio.Task[Any]]] = []

    def in_transaction(self) -> bool:
        return self.transaction

    async def close(self) -> None:
        self.closed_by.append(asyncio.current_task())
        if self.hang:
            await asyncio.Event().wait()
        if self.delay is not None:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError(f"close of {self.name} failed on purpose")
        self.closed[self.name] = time.perf_counter()


class RecordingAsyncSession(AsyncSession):
    async def close(self) -> None:
        self.info.setdefault("closed_by", []).append(asyncio.current_task())
        await super().close()


def test_a_burst_of_sessions_closed_without_io_shares_one_closer_task(tmp_path: Path) -> None:
    # Before: one close task and one 30 s deadline timer per ended task.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    Session = async_scoped_session(async_sessionmaker(engine, class_=RecordingAsyncSession))

    async def handler() -> AsyncSession:
        return Session()  # never connects: its close needs no I/O

    async def main() -> Dict[str, Any]:
        tasks = [asyncio.create_task(handler()) for _ in range(50)]
        sessions = await asyncio.gather(*tasks)
        await wait_closed()
        closers = {task for s in sessions for task in s.info.get("closed_by", [])}
        scheduled = list(asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]
        await engine.dispose()
        return {
            "closed_once": [len(s.info.get("closed_by", [])) for s in sessions] == [1] * 50,
            "closer_tasks": len(closers),
            "closed_by_an_ended_task": bool(closers & set(tasks)),
            "deadline_timers": len(scheduled),
            "registered": len(Session.registry),
        }

    assert asyncio.run(main()) == {
        "closed_once": True,
        "closer_tasks": 1,
        "closed_by_an_ended_task": False,
        "deadline_timers": 0,
        "registered": 0,
    }


@pytest.mark.parametrize("in_transaction", [False, True])
def test_closes_that_do_io_run_concurrently_each_in_a_closer_of_its_own(
    in_transaction: bool,
) -> None:
    # A queue closer whose close suspends hands every close still queued to closers of their
    # own; a session in a transaction gets one at once. Either way 10 closes of 0.2 s each take
    # about 0.2 s, not 2 s.
    closed: Dict[str, float] = {}
    values = [
        FakeAsyncSession(str(i), closed, delay=0.2, in_transaction=in_transaction)
        for i in range(10)
    ]

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for value in values:
            aio.close_on_loop(value, loop)
        await wait_closed()
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    assert sorted(closed) == sorted(v.name for v in values)
    assert elapsed < 1.0, elapsed
    closers = [v.closed_by[0] for v in values]
    assert len(set(closers)) == 10


def test_a_hung_close_is_abandoned_at_its_deadline_and_delays_no_other_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aio, "CLOSE_TIMEOUT", 0.5)
    closed: Dict[str, float] = {}
    hung = FakeAsyncSession("hung", closed, hang=True)  # first in the queue closer's burst
    quick = [FakeAsyncSession(f"quick{i}", closed) for i in range(5)]
    slow = [FakeAsyncSession(f"slow{i}", closed, delay=0.05) for i in range(3)]
    late: List[FakeAsyncSession] = []

    async def main() -> Dict[str, float]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for value in [hung, *quick, *slow]:
            aio.close_on_loop(value, loop)
        await asyncio.sleep(0.1)
        late.append(FakeAsyncSession("late", closed))  # queued while the hung one hangs
        aio.close_on_loop(late[0], loop)
        await asyncio.sleep(0.05)
        others_done = max(closed.values()) - start
        await wait_closed()
        return {"others_done": others_done, "all_done": time.perf_counter() - start}

    with caplog.at_level(logging.ERROR, logger="greenscope"):
        times = asyncio.run(main())
    assert sorted(closed) == sorted(v.name for v in [*quick, *slow, *late])
    assert times["others_done"] < 0.4, times  # well before the hung close's deadline
    assert 0.5 <= times["all_done"] < 2.0, times  # wait_closed() waited for the deadline
    assert [r.getMessage() for r in caplog.records] == [
        f"greenscope: closing {hung!r} took over 0.5 s; abandoned"
    ]


def test_close_errors_in_a_burst_are_logged_and_every_other_close_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: Dict[str, float] = {}
    failing = [
        FakeAsyncSession("fails-at-once", closed, fail=True),
        FakeAsyncSession("fails-after-io", closed, delay=0.01, fail=True),
    ]
    fine = [FakeAsyncSession(f"fine{i}", closed, delay=0.01 if i % 2 else None) for i in range(6)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for value in [fine[0], failing[0], fine[1], fine[2], failing[1], *fine[3:]]:
            aio.close_on_loop(value, loop)
        await wait_closed()

    with caplog.at_level(logging.ERROR, logger="greenscope"):
        asyncio.run(main())
    assert sorted(closed) == sorted(v.name for v in fine)
    errors = sorted(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert errors == [
        "close of fails-after-io failed on purpose",
        "close of fails-at-once failed on purpose",
    ]


def test_asyncio_run_waits_for_queued_and_suspended_closes_instead_of_cancelling_them() -> None:
    closed: Dict[str, float] = {}
    values = [
        FakeAsyncSession("queued", closed),
        FakeAsyncSession("suspends-in-queue", closed, delay=0.05),
        FakeAsyncSession("after-it", closed),
        FakeAsyncSession("in-transaction", closed, delay=0.05, in_transaction=True),
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for value in values:
            aio.close_on_loop(value, loop)
        # returns at once: asyncio.run cancels what is pending, then waits for the closers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert sorted(closed) == sorted(v.name for v in values)
    assert [str(w.message) for w in caught] == []
    assert aio._homes == {}


def test_greenlet_closes_that_block_do_not_wait_behind_one_another() -> None:
    # One closer greenlet drains a burst; while it is blocked in a close (its I/O), the next
    # ended greenlet's session goes to a fresh closer. Before: 10 closes of 0.2 s took 2 s.
    closed: List[float] = []

    class SlowCloseSession(Session):
        def close(self) -> None:
            gevent.sleep(0.2)  # a ROLLBACK over the network, as gevent sees it
            super().close()
            closed.append(time.perf_counter())

    Scoped = greenscope.scoped_session(sessionmaker(class_=SlowCloseSession))
    start = time.perf_counter()
    for _ in range(10):
        gevent.spawn(Scoped).join()  # ends one at a time, while earlier closes still block
    deadline = time.perf_counter() + 5
    while len(closed) < 10 and time.perf_counter() < deadline:
        gevent.sleep(0.01)
    assert len(closed) == 10
    assert max(closed) - start < 1.0, max(closed) - start
    assert len(Scoped.registry) == 0


def test_a_session_in_a_transaction_gets_a_closer_of_its_own_at_once() -> None:
    # Its close will do I/O (ROLLBACK, pool check-in): started in the same loop iteration as
    # before batching, not after a queued close that suspends first.
    closed: Dict[str, float] = {}
    plain = [FakeAsyncSession(f"plain{i}", closed) for i in range(2)]
    busy = [FakeAsyncSession(f"busy{i}", closed, in_transaction=True) for i in range(2)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for value in [plain[0], busy[0], plain[1], busy[1]]:
            aio.close_on_loop(value, loop)
        await wait_closed()

    asyncio.run(main())
    assert len(closed) == 4
    assert plain[0].closed_by == plain[1].closed_by
    assert len({v.closed_by[0] for v in [plain[0], *busy]}) == 3


# -- a close that can do no I/O runs in the end hook itself ---------------------------------


class Item(DeclarativeBase):
    pass


class Row(Item):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(primary_key=True)


def _spawned_closers(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    spawned: List[Any] = []
    real = GeventHome.spawn

    def spawn(self: GeventHome, fn: Any) -> Any:
        glet = real(self, fn)
        spawned.append(glet)
        return glet

    monkeypatch.setattr(GeventHome, "spawn", spawn)
    return spawned


def test_a_greenlets_session_that_never_queried_is_closed_in_its_end_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No transaction (no connection) and no objects: its close() is bookkeeping only, done in
    # the greenlet's link, without a closer greenlet (the churn case; before: one per burst).
    spawned = _spawned_closers(monkeypatch)
    Scoped = greenscope.scoped_session(
        sessionmaker(create_engine("sqlite://"), close_resets_only=False)
    )
    glets = [gevent.spawn(Scoped) for _ in range(20)]
    gevent.joinall(glets)
    gevent.sleep(0)
    for glet in glets:
        with pytest.raises(InvalidRequestError, match="permanently closed"):
            glet.value.execute(text("select 1"))
    assert spawned == []
    assert len(Scoped.registry) == 0
    assert Scoped.registry.ended_without_remove == 20


def test_a_close_that_may_do_io_or_run_listeners_never_runs_in_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A transaction (a ROLLBACK to send), pending objects (their events fire user code) and a
    # Session class with a close() of its own all go to a closer greenlet, as before.
    spawned = _spawned_closers(monkeypatch)
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Item.metadata.create_all(engine)
    where: Dict[str, List[bool]] = {"rollback": [], "pending": [], "own close": []}
    hub = gevent.get_hub()
    event.listen(engine, "rollback", lambda conn: where["rollback"].append(getcurrent() is hub))

    class OwnClose(Session):
        def close(self) -> None:
            where["own close"].append(getcurrent() is hub)
            super().close()

    factory = sessionmaker(engine)
    event.listen(
        factory, "pending_to_transient", lambda s, obj: where["pending"].append(getcurrent() is hub)
    )
    queried = greenscope.scoped_session(factory)
    pending = greenscope.scoped_session(factory)
    own = greenscope.scoped_session(sessionmaker(engine, class_=OwnClose))

    def handler(n: int) -> None:
        queried.execute(text("select 1"))
        pending.add(Row(id=n))
        own()

    gevent.joinall([gevent.spawn(handler, n) for n in range(5)])
    deadline = time.perf_counter() + 5
    while engine.pool.checkedout() and time.perf_counter() < deadline:  # type: ignore[attr-defined]
        gevent.sleep(0.01)
    assert where == {"rollback": [False] * 5, "pending": [False] * 5, "own close": [False] * 5}
    assert spawned  # the closer greenlet did it
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()


def test_a_tasks_session_that_never_queried_is_closed_without_a_closer_task(
    tmp_path: Path,
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'i.db'}")
    Scoped = async_scoped_session(async_sessionmaker(engine, close_resets_only=False))
    sync_factory = sessionmaker(create_engine("sqlite://"), close_resets_only=False)
    SyncScoped = greenscope.scoped_session(sync_factory)

    async def handler() -> Any:
        return Scoped(), SyncScoped()  # a sync Session too: no executor job for it

    async def main() -> Dict[str, Any]:
        pairs = await asyncio.gather(*(handler() for _ in range(20)))
        await asyncio.sleep(0)  # the done-callbacks
        homes = dict(aio._homes)
        await wait_closed()
        await engine.dispose()
        return {"pairs": pairs, "homes": homes}

    result = asyncio.run(main())
    assert result["homes"] == {}  # no closer task, no executor job was ever needed
    for async_session, sync_session in result["pairs"]:
        for session in (async_session.sync_session, sync_session):
            with pytest.raises(InvalidRequestError, match="permanently closed"):
                session.execute(text("select 1"))
    assert len(Scoped.registry) == 0 and len(SyncScoped.registry) == 0


class PendingSession(Session):
    """A plain Session subclass (SQLAlchemy's own close()): only its events are listened to."""


def test_a_tasks_session_with_pending_objects_is_closed_in_a_closer_task(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    seen: List[Optional[asyncio.Task[Any]]] = []
    event.listen(
        PendingSession, "pending_to_transient", lambda s, obj: seen.append(asyncio.current_task())
    )
    Scoped = async_scoped_session(async_sessionmaker(engine, sync_session_class=PendingSession))

    async def handler(n: int) -> None:
        Scoped.add(Row(id=n))

    async def main() -> None:
        await asyncio.gather(*(handler(n) for n in range(3)))
        await wait_closed()
        await engine.dispose()

    asyncio.run(main())
    assert len(seen) == 3
    assert all(isinstance(task, aio._CloseTask) for task in seen), seen
