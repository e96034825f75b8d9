"""``greenscope.celery``: every task in its own scope, measured with a real ``celery worker``.

The worker runs tests/apps/celery_app.py as a subprocess against the Redis broker at
127.0.0.1:6379 (a database number of its own and a queue name per run, so runs never see each
other's messages) and PostgreSQL. Tasks never call ``remove()`` and leave a transaction open.
Each task reports its session's marker (a uuid in ``session.info``) and whether an earlier
task had used that session; after the run, ``pg_stat_activity`` (filtered by the run's
``application_name``) counts the backends left idle in transaction. The same runs with stock
``scoped_session`` show the failures of issue 13. Eager calls run in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
from conftest import PG_URL, ROOT, CountingSession, require_postgres, run_python

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13


def require_redis() -> str:
    """The broker URL; skip (locally) or fail (CI) when Redis is unreachable."""
    import redis

    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except Exception as error:
        problem = f"Redis at {REDIS_HOST}:{REDIS_PORT} is unreachable: {error}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {problem}", pytrace=False)
        pytest.skip(problem)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


_CLIENT = r"""
import json, sys, time
import psycopg2
from celery import Celery

broker, queue, appname, pg_url, steps = sys.argv[1:6]
client = Celery("gs-client", broker=broker, backend=broker)
client.conf.update(broker_connection_retry_on_startup=True, result_expires=600)


def idle(wait):  # backends of this run idle in transaction, polled until one shows or `wait` s
    deadline = time.monotonic() + wait
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    try:
        while True:
            with conn.cursor() as cur:
                cur.execute("select count(*) from pg_stat_activity where application_name = %s"
                            " and state = 'idle in transaction'", (appname,))
                count = cur.fetchone()[0]
            if count or time.monotonic() > deadline:
                return count
            time.sleep(0.1)
    finally:
        conn.close()


def settled(wait):  # the same count, polled until it is 0 or `wait` s
    deadline = time.monotonic() + wait
    while True:
        count = idle(0)
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def get(result, timeout):
    try:
        return result.get(timeout=max(0.1, timeout))
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error)[:160]}"}


out = []
for step in json.loads(steps):
    kind = step[0]
    if kind == "many":  # name, count, timeout: send them all, then collect
        _, name, count, timeout = step
        pending = [client.send_task(name, args=[n], queue=queue) for n in range(count)]
        deadline = time.monotonic() + timeout
        out.append([get(r, deadline - time.monotonic()) for r in pending])
    elif kind == "call":  # name, args, timeout
        _, name, args, timeout = step
        out.append(get(client.send_task(name, args=args, queue=queue), timeout))
    elif kind == "settled":
        out.append(settled(step[1]))
    elif kind == "revoke_when_busy":  # name, args: revoke(terminate) once its transaction is open
        _, name, args = step
        running = client.send_task(name, args=args, queue=queue)
        busy = idle(20)
        client.control.revoke(running.id, terminate=True)
        out.append(busy)
print(json.dumps(out))
"""


class Worker:
    """A running ``celery worker``; :meth:`client` runs a client process against its queue."""

    def __init__(self, broker: str, queue: str, appname: str) -> None:
        self.broker, self.queue, self.appname = broker, queue, appname
        self.log = ""

    def client(self, *steps: Any, timeout: float = 120) -> List[Any]:
        """Run the client steps (see ``_CLIENT``) in a fresh interpreter; return their outputs."""
        args = [self.broker, self.queue, self.appname, PG_URL, json.dumps(steps)]
        out: List[Any] = run_python(_CLIENT, args=args, timeout=timeout)
        return out


@contextlib.contextmanager
def celery_worker(
    pool: str, concurrency: Optional[int] = None, flavour: str = "greenscope"
) -> Iterator[Worker]:
    """Start ``celery worker -P pool`` on tests/apps/celery_app.py; stop it by its pid."""
    require_postgres()
    broker = require_redis()
    run = uuid.uuid4().hex[:10]
    worker = Worker(broker, f"gs-{run}", f"gs-celery-{run}")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        GREENSCOPE_PG_URL=PG_URL,
        GS_FLAVOUR=flavour,
        GS_CELERY_BROKER=broker,
        GS_CELERY_QUEUE=worker.queue,
        GS_APPLICATION_NAME=worker.appname,
    )
    if flavour == "stock":  # bounded waits for a connection: the stock runs exhaust the pool
        env["GS_POOL_TIMEOUT"] = "1"
    cmd = [sys.executable, "-m", "celery", "-A", "apps.celery_app", "worker", "-P", pool]
    if concurrency is not None:
        cmd += ["-c", str(concurrency)]
    cmd += ["-Q", worker.queue, "-n", f"{run}@localhost", "--loglevel=WARNING"]
    cmd += ["--without-heartbeat", "--without-mingle", "--without-gossip"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield worker
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
            log.seek(0)
            worker.log = log.read()


def _crosstalk(results: List[Dict[str, Any]]) -> Dict[str, int]:
    markers = [r["marker"] for r in results]
    return {
        "inherited": sum(1 for r in results if r["inherited_from"] is not None),
        "distinct_sessions": len(set(markers)),
    }


def _errors(results: List[Any]) -> List[str]:
    return [r["error"] for r in results if "error" in r]


POOLS = [
    pytest.param("prefork", 2, id="prefork-c2"),
    pytest.param("threads", 8, id="threads-c8"),
    pytest.param("solo", None, id="solo"),
    pytest.param("gevent", 50, id="gevent-c50"),
    pytest.param("eventlet", 50, id="eventlet-c50"),
]


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_200_tasks_without_remove_never_share_a_session_nor_leave_a_transaction_open(
    pool: str, concurrency: Optional[int]
) -> None:
    with celery_worker(pool, concurrency) as worker:
        results, idle, stats = worker.client(
            ["many", "gs.probe", 200, 60], ["settled", 5], ["call", "gs.stats", [], 30]
        )
    assert _errors(results) == [], worker.log
    assert len(results) == 200
    assert _crosstalk(results) == {"inherited": 0, "distinct_sessions": 200}
    assert idle == 0
    assert stats["registry_len"] == 0
    # cooperative under gevent and eventlet
    assert stats["psycopg2_wait_callback"] is (pool in ("gevent", "eventlet"))
    if pool == "prefork":  # both children worked, never on the connection the parent opened
        assert len({r["worker_pid"] for r in results}) == 2
        assert all(r["backend"] != r["import_backend"] for r in results)
    else:  # (prefork: stats ran in one child while the other may still be closing)
        assert stats["checkedout"] == 0


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_stock_scoped_session_in_the_same_worker_shares_sessions_or_times_out(
    pool: str, concurrency: Optional[int]
) -> None:
    with celery_worker(pool, concurrency, flavour="stock") as worker:
        results, idle = worker.client(["many", "gs.probe", 200, 30], ["settled", 0.5])
    errors = _errors(results)
    seen = _crosstalk([r for r in results if "error" not in r])
    print(f"stock -P {pool}: {seen}, {len(errors)} errors, {idle} idle in transaction")
    if pool in ("gevent", "eventlet"):  # each greenlet's session dropped unclosed: pool runs dry
        assert len(errors) > 0
    else:  # a thread's session goes to every later task on that thread, transaction and all
        assert seen["inherited"] > 0
        assert idle > 0


@pytest.mark.postgres
def test_session_closed_when_task_fails_retries_or_hits_its_soft_time_limit() -> None:
    # prefork -c 1: one child runs every task in turn, so its pool shows what each one left.
    with celery_worker("prefork", 1) as worker:
        failed, retried, limited, idle, stats = worker.client(
            ["call", "gs.fails", [], 30],
            ["call", "gs.retries", [], 30],
            ["call", "gs.soft_limit", [], 30],
            ["settled", 5],
            ["call", "gs.stats", [], 30],
        )
    assert failed["error"].startswith("ValueError")
    assert retried == 2
    assert limited["error"].startswith("SoftTimeLimitExceeded")
    assert idle == 0
    assert stats["checkedout"] == 0
    assert stats["registry_len"] == 0


@pytest.mark.postgres
def test_task_applying_another_eagerly_in_a_worker_gets_a_nested_scope() -> None:
    with celery_worker("solo") as worker:
        seen, idle = worker.client(["call", "gs.outer", [], 30], ["settled", 5])
    assert seen["inner"]["marker"] != seen["outer"]["marker"]
    assert seen["inner"]["inherited_from"] is None
    assert seen["same_session_after"] is True  # leaving the inner scope kept the outer's
    assert seen["outer_still_works"] is True
    assert idle == 0


@pytest.mark.postgres
@pytest.mark.slow
def test_revoke_terminate_under_gevent_closes_the_interrupted_tasks_session() -> None:
    with celery_worker("gevent", 10) as worker:
        busy, idle, stats = worker.client(
            ["revoke_when_busy", "gs.sleeps", [30]], ["settled", 10], ["call", "gs.stats", [], 30]
        )
    assert busy == 1  # the task was inside its sleep, its transaction open
    assert idle == 0
    assert stats["checkedout"] == 0
    assert stats["registry_len"] == 0


# -- eager calls, in this process ---------------------------------------------------------


@pytest.fixture
def eager_app() -> Iterator[Any]:
    from celery import Celery
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    import greenscope
    import greenscope.celery

    app = Celery("gs-eager", broker="memory://", task_always_eager=True)
    greenscope.celery.install(app)
    engine = create_engine("sqlite://")
    app.Session = greenscope.scoped_session(sessionmaker(engine, class_=CountingSession))
    yield app
    engine.dispose()


def test_eager_tasks_each_get_a_session_closed_when_they_end(eager_app: Any) -> None:
    Session = eager_app.Session

    @eager_app.task
    def job() -> int:
        session = Session()
        session.info["runs"] = session.info.get("runs", 0) + 1
        sessions.append(session)
        return int(session.info["runs"])

    sessions: List[Any] = []
    assert [job.delay().get(), job.apply().get(), job.apply_async().get()] == [1, 1, 1]
    assert len({id(s) for s in sessions}) == 3
    assert [s.close_calls for s in sessions] == [1, 1, 1]
    assert len(Session.registry) == 0


def test_eager_task_failing_closes_its_session(eager_app: Any) -> None:
    Session = eager_app.Session
    sessions: List[Any] = []

    @eager_app.task
    def fails() -> None:
        sessions.append(Session())
        raise ValueError("boom")

    with pytest.raises(ValueError):
        fails.apply().get()
    assert sessions[0].close_calls == 1
    assert len(Session.registry) == 0


def test_task_calling_another_eagerly_gets_a_nested_scope_that_leaves_the_outer_alone(
    eager_app: Any,
) -> None:
    Session = eager_app.Session

    @eager_app.task
    def inner() -> int:
        return id(Session())

    @eager_app.task
    def outer() -> Dict[str, Any]:
        session = Session()
        inner_id = inner.apply().result
        return {
            "distinct": inner_id != id(session),
            "same_after": Session() is session,
            "outer_open": session.close_calls == 0,
            "session": session,
        }

    seen = outer.apply().get()
    assert seen["distinct"] and seen["same_after"] and seen["outer_open"]
    assert seen["session"].close_calls == 1  # closed when the outer task ended
    assert len(Session.registry) == 0


def test_install_twice_is_harmless_and_other_apps_are_left_alone(eager_app: Any) -> None:
    from celery import Celery, signals

    import greenscope
    import greenscope.celery

    greenscope.celery.install(eager_app)
    assert eager_app.greenscope_installed is True
    uids = [key for key, _ in signals.task_prerun.receivers if "greenscope" in str(key)]
    assert len(uids) == 1
    Session = eager_app.Session
    other = Celery("gs-other", broker="memory://", task_always_eager=True)

    @other.task
    def not_installed() -> bool:
        return greenscope.current_scope() is before

    before = greenscope.current_scope()
    assert not_installed.apply().get() is True  # no scope of greenscope's around it
    assert len(Session.registry) == 0


def test_receivers_connected_after_install_run_inside_prerun_and_after_postrun(
    eager_app: Any,
) -> None:
    from celery import signals

    import greenscope

    seen: Dict[str, Any] = {}

    @eager_app.task
    def job() -> None:
        seen["body"] = greenscope.current_scope()

    def prerun(**_: Any) -> None:
        seen["prerun"] = greenscope.current_scope()

    def postrun(**_: Any) -> None:
        seen["postrun"] = greenscope.current_scope()

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    try:
        outside = greenscope.current_scope()
        job.apply().get()
    finally:
        signals.task_prerun.disconnect(prerun)
        signals.task_postrun.disconnect(postrun)
    assert seen["prerun"] is seen["body"] is not outside  # inside the task's scope
    assert seen["postrun"] is outside  # the task's scope already closed
