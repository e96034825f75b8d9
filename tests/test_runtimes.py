"""Where runtimes meet: an asyncio loop inside a gevent greenlet, gevent hubs in several threads,
many threads on one registry, threads that end without ``remove()``, sync sessions in tasks,
eventlet. Each test pins a failure measured on greenscope 0.1 (issue 11); every one asserts in
the parent after joining, and anything that monkeypatches runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any, Dict, List

import gevent
import greenlet
import pytest
from conftest import CountingSession, run_python
from greenlet._greenlet import get_pending_cleanup_count, get_total_main_greenlets
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import greenscope
from greenscope.registry import WeakScopeRegistry


@pytest.fixture
def file_engine(tmp_path: Any) -> Any:
    engine = create_engine(
        f"sqlite:///{tmp_path / 'runtimes.db'}", pool_size=4, max_overflow=0, pool_timeout=2
    )
    try:
        yield engine
    finally:
        engine.dispose()


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    """Poll ``condition`` (bounded): a wait for asynchronous cleanup, not a timed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


def wait_for_thread_greenlet_cleanup(main_greenlets_before: int) -> None:
    """greenlet frees a dead thread's main greenlet lazily, from another thread."""
    for _ in range(200):
        gc.collect()
        if get_pending_cleanup_count() == 0 and get_total_main_greenlets() <= main_greenlets_before:
            return
        time.sleep(0.01)


# -- 1. an asyncio loop running inside a gevent greenlet (rule 4b) -------------------------


def test_greenlets_the_hub_runs_while_a_task_waits_never_see_the_tasks_session() -> None:
    """``gevent.spawn(asyncio.run, main())`` in a patched process: while the task is suspended in
    a gevent-cooperative call, the hub runs other greenlets on the same thread. 0.1 gave each of
    them the task's session (the running loop was taken to mean "runs for the task") and a
    greenlet's uncommitted row was committed by the task."""
    out = run_python(
        """
        from gevent import monkey
        monkey.patch_all()
        import asyncio, json, time
        import gevent, greenlet
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        from sqlalchemy.util import greenlet_spawn
        import greenscope

        engine = create_engine("sqlite://")
        Session = greenscope.scoped_session(sessionmaker(engine))
        seen = {}

        def bystander(n):
            s = Session()
            with greenscope.scope() as key:
                inner_ok = greenscope.current_scope() is key and Session() is not s
            seen[n] = [id(s), greenscope.current_scope() is gevent.getcurrent(), inner_ok]

        def in_run_sync():
            return id(Session()), greenscope.current_scope() is asyncio.current_task()

        async def main():
            mine = Session()
            task = asyncio.current_task()
            jobs = [gevent.spawn(bystander, n) for n in range(5)]
            time.sleep(0.05)  # patched: a gevent-cooperative call; the hub runs the bystanders
            via_run_sync = await greenlet_spawn(in_run_sync)
            with greenscope.scope() as key:
                scoped_inside = greenscope.current_scope() is key
                time.sleep(0.01)
                still_scoped = greenscope.current_scope() is key
            gevent.joinall(jobs)
            own = greenscope.current_scope() is task
            return id(mine), own, via_run_sync, scoped_inside, still_scoped

        task_session, task_scope_ok, run_sync, scoped_inside, still_scoped = (
            gevent.spawn(asyncio.run, main()).get()
        )
        print(json.dumps({"task": task_session, "task_scope_ok": task_scope_ok,
                          "run_sync": run_sync, "scoped": [scoped_inside, still_scoped],
                          "bystanders": seen}))
        """
    )
    assert out["task_scope_ok"]
    assert out["run_sync"] == [out["task"], True]  # SQLAlchemy's greenlet_spawn is the task's
    assert out["scoped"] == [True, True]
    assert len(out["bystanders"]) == 5
    for session_id, own_scope, inner_ok in out["bystanders"].values():
        assert session_id != out["task"]
        assert own_scope and inner_ok
    assert len({v[0] for v in out["bystanders"].values()}) == 5


def test_bystander_greenlets_uncommitted_row_is_never_committed_by_the_task(tmp_path: Any) -> None:
    db = tmp_path / "bystander.db"
    out = run_python(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import asyncio, json, time
        import gevent
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        import greenscope

        engine = create_engine("sqlite:///{db}")
        with engine.begin() as conn:
            conn.execute(text("create table t (who text)"))
        Session = greenscope.scoped_session(sessionmaker(engine))

        def bystander():
            Session.execute(text("insert into t values ('bystander')"))
            time.sleep(0.1)  # the task commits meanwhile: it must not commit this row
            Session.rollback()
            Session.remove()

        async def main():
            Session.execute(text("select 1"))
            job = gevent.spawn(bystander)
            time.sleep(0.05)
            Session.commit()
            job.join()

        gevent.spawn(asyncio.run, main()).get()
        with engine.connect() as conn:
            print(json.dumps(conn.execute(text("select count(*) from t")).scalar()))
        """
    )
    assert out == 0


# -- 2. gevent hubs in several threads (rule 4c) -------------------------------------------


@pytest.mark.parametrize("destroy_hub", [False, True], ids=["thread-returns", "hub-destroyed"])
def test_each_close_runs_on_the_thread_whose_hub_owns_the_session_and_a_dead_hub_stops_none(
    file_engine: Engine, destroy_hub: bool
) -> None:
    """0.1 kept one closer greenlet for the whole process: with hubs in two threads closes ran
    on the wrong thread, and once the thread whose hub held the closer ended, no session was
    closed again anywhere (9 of 12 later requests timed out)."""
    closed_on: List[Any] = []

    class WhereClosed(Session):
        def close(self) -> None:
            closed_on.append((self.info["thread"], threading.get_ident()))
            super().close()

    registry = WeakScopeRegistry(sessionmaker(file_engine, class_=WhereClosed))

    def use() -> None:
        session = registry()
        session.info["thread"] = threading.get_ident()
        session.execute(text("select 1"))  # checks out a connection, never removed

    def hub_thread(jobs: int) -> None:
        gevent.joinall([gevent.spawn(use) for _ in range(jobs)])
        # the thread ends at once: closes its hub queued but never ran (and links it never ran)
        # must not be lost, and must not stall closes in any other thread
        if destroy_hub:
            gevent.get_hub().destroy(destroy_loop=True)

    for round_ in range(3):  # a hub that ended must not stop closes in the next threads
        threads = [threading.Thread(target=hub_thread, args=(4,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wait_until(lambda n=8 * (round_ + 1): len(closed_on) == n)  # type: ignore[misc]
    assert all(used == closing for used, closing in closed_on)
    assert file_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len(registry) == 0


# -- 3. many threads on one registry -------------------------------------------------------


def test_eight_threads_with_short_lived_greenlets_and_threads_raise_nothing(
    file_engine: Engine,
) -> None:
    """0.1 raised ``IndexError`` into callers (a check-then-pop race on parked values): over 100
    per run in this shape."""
    scoped = greenscope.scoped_session(sessionmaker(file_engine))
    errors: List[str] = []
    stop = time.monotonic() + 3.0

    def short_greenlet() -> None:
        scoped.is_active  # noqa: B018 - creates the greenlet's session, never removed

    def short_thread() -> None:
        scoped()

    def worker(n: int) -> None:
        try:
            for i in range(400):
                if time.monotonic() > stop:
                    break
                scoped()
                scoped.is_active  # noqa: B018
                greenlet.greenlet(short_greenlet).switch()
                if i % 50 == n % 50:
                    thread = threading.Thread(target=short_thread)
                    thread.start()
                    thread.join()
                if i % 25 == 0:
                    gc.collect()
        except Exception as error:  # collected, asserted in the parent
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    scoped.remove()


# -- 4. a thread that ends without remove() ------------------------------------------------


def test_thread_session_closed_when_the_thread_ends_with_no_later_registry_use(
    file_engine: Engine,
) -> None:
    """0.1 parked it until the registry was used again (maybe never): its connection stayed
    checked out and idle in transaction. Stock releases it with the thread-local."""
    registry = WeakScopeRegistry(sessionmaker(file_engine, class_=CountingSession))
    seen: List[CountingSession] = []
    closed_in: List[Any] = []

    def work() -> None:
        session = registry()
        session.execute(text("select 1"))
        seen.append(session)
        closed_in.append(threading.get_ident())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # no registry use after the threads: the close must not depend on one
    assert wait_until(lambda: all(s.close_calls == 1 for s in seen))
    assert [s.close_calls for s in seen] == [1] * 4
    assert file_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert wait_until(lambda: len(registry) == 0)
    assert registry.ended_without_remove == 4


def test_thread_session_is_closed_by_the_ending_thread_itself_before_join_returns(
    file_engine: Engine,
) -> None:
    closed_by: List[Any] = []

    class Recorded(Session):
        def close(self) -> None:
            closed_by.append(threading.get_ident())
            super().close()

    registry = WeakScopeRegistry(sessionmaker(file_engine, class_=Recorded))
    idents: List[Any] = []

    def work() -> None:
        idents.append(threading.get_ident())
        registry().execute(text("select 1"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert closed_by == idents
    assert file_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_thread_ending_without_remove_leaves_no_backend_idle_in_transaction(pg_url: str) -> None:
    import uuid

    name = f"gs-thread-{uuid.uuid4().hex[:8]}"
    engine = create_engine(pg_url, connect_args={"application_name": name})
    probe = create_engine(pg_url, poolclass=__import__("sqlalchemy").pool.NullPool)
    scoped = greenscope.scoped_session(sessionmaker(engine))

    def work() -> None:
        scoped.execute(text("select 1"))  # begins a transaction, never removed

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def idle_in_transaction() -> int:
        with probe.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "select count(*) from pg_stat_activity where application_name = :n "
                        "and state = 'idle in transaction'"
                    ),
                    {"n": name},
                ).scalar()
            )

    try:
        assert wait_until(lambda: idle_in_transaction() == 0)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
        probe.dispose()


# -- 5. a sync Session used inside an asyncio task -----------------------------------------


def test_sync_session_of_a_task_is_closed_off_the_event_loop_and_promptly(
    file_engine: Engine,
) -> None:
    """0.1 closed it in the task's done-callback: a blocking ROLLBACK on the loop (rule 3)."""
    closed: List[Dict[str, Any]] = []

    class Recorded(Session):
        def close(self) -> None:
            closed.append({"thread": threading.get_ident(), "loop_running": _loop_running()})
            super().close()

    scoped = greenscope.scoped_session(sessionmaker(file_engine, class_=Recorded))

    async def job() -> None:
        scoped.execute(text("select 1"))  # never removed

    async def main() -> Any:
        loop_thread = threading.get_ident()
        await asyncio.gather(*(asyncio.create_task(job()) for _ in range(3)))
        for _ in range(200):  # the closes are under way: wait for them, bounded
            if len(closed) == 3:
                break
            await asyncio.sleep(0.01)
        return loop_thread, len(closed)

    loop_thread, closed_while_running = asyncio.run(main())
    assert closed_while_running == 3  # promptly: while the loop still runs
    assert all(c["thread"] != loop_thread for c in closed)
    assert file_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len(scoped.registry) == 0


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- 9. logging happens where closing happens ----------------------------------------------


def test_trace_warnings_are_logged_by_the_closer_not_in_hub_or_gc_callbacks() -> None:
    """With ``GREENSCOPE_TRACE=1`` 0.1 logged "closed without remove()" from hub and weakref
    callbacks: a handler that does I/O failed there (``BlockingSwitchOutError``) and the
    records were lost."""
    out = run_python(
        """
        from gevent import monkey
        monkey.patch_all()
        import gc, json, logging, sys
        import gevent, greenlet
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker
        import greenscope

        class CooperativeHandler(logging.Handler):
            def __init__(self):
                super().__init__()
                self.records = []
            def emit(self, record):
                gevent.sleep(0)  # I/O-like: switches, which the hub forbids
                self.records.append(record.getMessage())
            def handleError(self, record):
                sys.stderr.write("LOGGING ERROR\\n")

        handler = CooperativeHandler()
        logging.getLogger("greenscope").addHandler(handler)
        Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
        gevent.joinall([gevent.spawn(Session) for _ in range(5)])  # rawlink, in the hub
        for _ in range(3):  # raw greenlets: weakref callback in the GC
            greenlet.greenlet(Session).switch()
        gc.collect()
        gevent.sleep(0.2)
        print(json.dumps(sum("without remove()" in m for m in handler.records)))
        """,
        env={"GREENSCOPE_TRACE": "1"},
    )
    assert out == 8


# -- 10. eventlet --------------------------------------------------------------------------


def test_eventlet_greenpool_jobs_that_forget_remove_never_exhaust_the_pool(tmp_path: Any) -> None:
    """Finished eventlet greenthreads stay referenced until the cyclic GC runs: 0.1 (like stock)
    gave 190 of 200 pool timeouts with a pool of 10."""
    pytest.importorskip("eventlet")
    db = tmp_path / "eventlet.db"
    out = run_python(
        f"""
        import warnings
        warnings.simplefilter("ignore")
        import eventlet
        eventlet.monkey_patch()
        import gc, json
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        import greenscope

        gc.disable()  # finished greenthreads then stay until a collection that never comes
        engine = create_engine("sqlite:///{db}", pool_size=10, max_overflow=0, pool_timeout=1)
        Session = greenscope.scoped_session(sessionmaker(engine))
        errors = []

        def job(n):
            try:
                Session.execute(text("select 1"))
                eventlet.sleep(0.001)
            except Exception as error:
                errors.append(type(error).__name__)

        pool = eventlet.GreenPool(50)
        for n in range(200):
            pool.spawn(job, n)
        pool.waitall()
        eventlet.sleep(0.1)
        print(json.dumps({{"errors": len(errors), "live": len(Session.registry),
                          "checked_out": engine.pool.checkedout()}}))
        """
    )
    assert out == {"errors": 0, "live": 0, "checked_out": 0}


def test_eventlet_wsgi_server_requests_each_get_a_scope_and_release_their_connection(
    tmp_path: Any,
) -> None:
    pytest.importorskip("eventlet")
    db = tmp_path / "eventlet_wsgi.db"
    out = run_python(
        f"""
        import warnings
        warnings.simplefilter("ignore")
        import eventlet
        eventlet.monkey_patch()
        import json
        import eventlet.wsgi
        from eventlet.green import urllib
        from eventlet.green.http.client import HTTPConnection
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        import greenscope
        from greenscope.wsgi import ScopeMiddleware

        engine = create_engine("sqlite:///{db}", pool_size=2, max_overflow=0, pool_timeout=1)
        Session = greenscope.scoped_session(sessionmaker(engine))

        def app(environ, start_response):
            value = Session.execute(text("select 1")).scalar()  # never removed
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(id(Session())).encode()]

        sock = eventlet.listen(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = eventlet.spawn(eventlet.wsgi.server, sock, ScopeMiddleware(app), log_output=False)

        def client(n):
            conn = HTTPConnection("127.0.0.1", port, timeout=10)  # keep-alive: one connection
            bodies = []
            for _ in range(10):
                conn.request("GET", "/")
                response = conn.getresponse()
                bodies.append((response.status, response.read().decode()))
            conn.close()
            return bodies

        pool = eventlet.GreenPool()
        results = list(pool.imap(client, range(6)))
        statuses = [s for r in results for s, _ in r]
        distinct_per_client = [len(set(b for _, b in r)) for r in results]
        eventlet.sleep(0.1)
        server.kill()
        print(json.dumps({{"ok": statuses.count(200), "n": len(statuses),
                          "checked_out": engine.pool.checkedout(),
                          "live": len(Session.registry)}}))
        """
    )
    assert out == {"ok": 60, "n": 60, "checked_out": 0, "live": 0}


def test_raw_greenlet_that_dies_without_gevent_is_closed_by_a_closer_thread(tmp_path: Any) -> None:
    """A raw greenlet (no gevent, no eventlet in the process) is released by the GC; its
    session is closed by its thread's closer thread, not "on the registry's next use"."""
    db = tmp_path / "raw.db"
    out = run_python(
        f"""
        import gc, json, sys, threading, time
        import greenlet
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import Session, sessionmaker
        from greenscope import WeakScopeRegistry

        closed_in = []

        class Recorded(Session):
            def close(self):
                closed_in.append(threading.get_ident())
                super().close()

        engine = create_engine("sqlite:///{db}")
        registry = WeakScopeRegistry(sessionmaker(engine, class_=Recorded))

        def work():
            registry().execute(text("select 1"))

        for _ in range(3):
            greenlet.greenlet(work).switch()
        gc.collect()
        deadline = time.monotonic() + 5
        while len(closed_in) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(json.dumps({{"closed": len(closed_in), "here": closed_in.count(threading.get_ident()),
                          "gevent": "gevent" in sys.modules, "live": len(registry),
                          "checked_out": engine.pool.checkedout()}}))
        """
    )
    assert out == {"closed": 3, "here": 0, "gevent": False, "live": 0, "checked_out": 0}
