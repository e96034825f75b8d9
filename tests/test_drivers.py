"""greenscope.patch_drivers(): PostgreSQL drivers cooperative under gevent and eventlet.

The measure of "cooperative": 20 greenlets each run ``select pg_sleep(0.5)`` on their own
connection. If the driver waits through the hub they overlap (about 0.5 s in all); if it waits
in C, every query stops the whole process and they take 20 x 0.5 = 10 s. Each scenario runs in
a fresh interpreter (monkeypatching is process-wide), in both import orders: the driver imported
before ``monkey.patch_all()`` (gunicorn ``--preload``, models imported first) and after it.
psycopg 3 runs both as its C implementation (``psycopg[binary]``) and as pure Python
(``PSYCOPG_IMPL=python``).
"""

from __future__ import annotations

import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import gunicorn_app, run_python

GREENLETS = 20
SLEEP = 0.5
COOPERATIVE_BOUND = 1.5  # seconds for 20 x pg_sleep(0.5): serial would be 10 s

# psycopg 3 "flavours": the driver name SQLAlchemy uses, and PSYCOPG_IMPL
DRIVERS = {
    "psycopg2": ("psycopg2", {}),
    "psycopg3-binary": ("psycopg", {"PSYCOPG_IMPL": "binary"}),
    "psycopg3-python": ("psycopg", {"PSYCOPG_IMPL": "python"}),
}

SCENARIO = """
import dataclasses, json, os, sys, time

driver, order, runtime, patch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "patch"
greenlets, sleep = int(sys.argv[5]), float(sys.argv[6])
if order == "driver-first":
    __import__(driver)
if runtime == "gevent":
    from gevent import monkey

    monkey.patch_all()
    import gevent

    def run_all(job, n):
        jobs = [gevent.spawn(job) for _ in range(n)]
        gevent.joinall(jobs, timeout=60)
        return [repr(g.exception) for g in jobs if g.exception or not g.dead]
else:
    import warnings

    warnings.simplefilter("ignore")  # EventletDeprecationWarning
    import eventlet

    if os.environ.get("EVENTLET_PSYCOPG") == "1":
        eventlet.monkey_patch()  # everything, psycopg2 included (eventlet's own wait callback)
    else:  # everything but psycopg2 (naming a module True would patch only that one)
        eventlet.monkey_patch(psycopg=False)

    def run_all(job, n):
        pool = eventlet.GreenPool(n)
        errors = []

        def guarded():
            try:
                job()
            except Exception as error:
                errors.append(repr(error))

        for _ in range(n):
            pool.spawn(guarded)
        pool.waitall()
        return errors

imported_by_app = [name for name in ("psycopg2", "psycopg") if name in sys.modules]
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import greenscope

first = second = None
if patch:
    first = {k: dataclasses.asdict(v) for k, v in greenscope.patch_drivers().items()}
    second = {k: dataclasses.asdict(v) for k, v in greenscope.patch_drivers().items()}
url = f"postgresql+{driver}://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
engine = sqlalchemy.create_engine(url, pool_size=greenlets, max_overflow=0)
Session = greenscope.scoped_session(sessionmaker(engine))


def job():
    Session.execute(text("select pg_sleep(:s)"), {"s": sleep})  # no remove(): greenscope closes


start = time.monotonic()
errors = run_all(job, greenlets)
elapsed = time.monotonic() - start
impl = None
if driver == "psycopg":
    import psycopg

    impl = psycopg.pq.__impl__
print(json.dumps({"elapsed": elapsed, "errors": errors, "first": first, "second": second,
                  "impl": impl, "imported_by_app": imported_by_app}))
"""


def _run(
    flavour: str,
    order: str,
    *,
    runtime: str = "gevent",
    patch: bool = True,
    greenlets: int = GREENLETS,
    env: Dict[str, str] | None = None,
) -> Dict[str, Any]:
    driver, flavour_env = DRIVERS[flavour]
    args = [driver, order, runtime, "patch" if patch else "no", str(greenlets), str(SLEEP)]
    result: Dict[str, Any] = run_python(
        SCENARIO, args=args, env={**flavour_env, **(env or {})}, timeout=120
    )
    return result


@pytest.mark.postgres
@pytest.mark.parametrize("order", ["driver-first", "patch-first"])
@pytest.mark.parametrize("flavour", list(DRIVERS))
def test_twenty_pg_sleeps_overlap_under_gevent_after_patch_drivers_whatever_the_import_order(
    pg_url: str, flavour: str, order: str
) -> None:
    result = _run(flavour, order)
    print(f"gevent {flavour} {order}: {result['elapsed']:.2f} s")  # figures, with -s
    driver = DRIVERS[flavour][0]
    status, again = result["first"][driver], result["second"][driver]

    assert result["errors"] == []
    assert result["elapsed"] < COOPERATIVE_BOUND, result
    assert status["runtime"] == "gevent" and status["cooperative"] is True, status
    assert status["imported_before"] is (order == "driver-first"), status
    assert again["action"] == "already" and again["cooperative"] is True, again  # idempotent
    if driver == "psycopg":
        assert result["impl"] == flavour.split("-")[1], result
        assert f"implementation {result['impl']}" in status["detail"], status
        if order == "driver-first":
            # the C wait function (binary) or the epoll connect selector (python) was replaced
            assert status["action"] == "patched", status
    else:
        assert status["action"] == "patched"
        assert "psycogreen.gevent.gevent_wait_callback" in status["detail"], status


@pytest.mark.postgres
def test_psycopg3_imported_before_patch_all_blocks_the_process_without_patch_drivers(
    pg_url: str,
) -> None:
    # the failure patch_drivers() exists for, kept short: 4 x 0.5 s run one after the other
    result = _run("psycopg3-binary", "driver-first", patch=False, greenlets=4)
    print(f"gevent psycopg3 driver-first, no patch_drivers, 4 x 0.5 s: {result['elapsed']:.2f} s")
    assert result["errors"] == []
    assert result["elapsed"] >= 1.9, result


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["psycopg2", "psycopg3-binary"])
def test_twenty_pg_sleeps_overlap_under_eventlet_after_patch_drivers(
    pg_url: str, flavour: str
) -> None:
    # monkey_patch(psycopg=False): eventlet's own psycopg2 patch is off, so psycogreen's is used
    result = _run(flavour, "driver-first", runtime="eventlet")
    print(f"eventlet {flavour} driver-first: {result['elapsed']:.2f} s")
    driver = DRIVERS[flavour][0]
    status = result["first"][driver]
    assert result["errors"] == []
    assert result["elapsed"] < COOPERATIVE_BOUND, result
    assert status["runtime"] == "eventlet" and status["cooperative"] is True, status
    assert status["action"] == "patched", status
    if driver == "psycopg2":
        assert "psycogreen.eventlet.eventlet_wait_callback" in status["detail"], status
    else:
        assert "wait_select" in status["detail"], status  # eventlet removes select.poll


@pytest.mark.postgres
def test_eventlets_own_psycopg2_patch_is_kept(pg_url: str) -> None:
    result = _run("psycopg2", "patch-first", runtime="eventlet", env={"EVENTLET_PSYCOPG": "1"})
    status = result["first"]["psycopg2"]
    assert status["action"] == "already", status
    assert "eventlet" in status["detail"], status
    assert result["elapsed"] < COOPERATIVE_BOUND, result


def test_import_greenscope_imports_no_runtime_and_no_driver() -> None:
    loaded = run_python(
        """
        import json, sys
        import greenscope
        names = ("gevent", "eventlet", "psycopg", "psycopg2", "psycogreen", "asyncpg")
        print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] in names)))
        """
    )
    assert loaded == []


def test_patch_drivers_without_a_green_runtime_does_nothing_and_imports_nothing() -> None:
    result = run_python(
        """
        import dataclasses, json, sys
        import greenscope
        statuses = {k: dataclasses.asdict(v) for k, v in greenscope.patch_drivers().items()}
        print(json.dumps([statuses, "psycopg2" in sys.modules, "psycopg" in sys.modules]))
        """
    )
    statuses, psycopg2_loaded, psycopg_loaded = result
    assert [s["action"] for s in statuses.values()] == ["skipped", "skipped"]
    assert {s["runtime"] for s in statuses.values()} == {None}
    assert not psycopg2_loaded and not psycopg_loaded


def test_patch_drivers_raises_when_psycopg_cannot_be_made_cooperative() -> None:
    result = run_python(
        """
        import json
        import psycopg
        from gevent import monkey

        monkey.patch_all(select=False)
        import greenscope
        from greenscope.drivers import DriverPatchError

        try:
            greenscope.patch_drivers()
        except DriverPatchError as error:
            print(json.dumps(str(error)))
        else:
            print(json.dumps(None))
        """
    )
    assert result and "cannot make psycopg cooperative under gevent" in result, result


# -- under gunicorn -k gevent --preload -c python:greenscope.gunicorn ---------------------------

APP = """
import json
import os

import {driver}  # imported in the master, before the worker's gevent patches (--preload)
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope.wsgi import ScopeMiddleware

URL = "postgresql+{driver}://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
engine = create_engine(URL, pool_size=25, max_overflow=0)
Session = greenscope.scoped_session(sessionmaker(engine))


def router(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        Session.execute(text("select pg_sleep(0.5)"))
    body = json.dumps({{"pid": os.getpid()}}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


app = ScopeMiddleware(router)
"""


def _concurrent_gets(server: Any, path: str, n: int) -> List[Any]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: server.get(path, timeout=30), range(n)))


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", list(DRIVERS))
def test_twenty_requests_doing_pg_sleep_overlap_under_gunicorn_gevent_preload(
    pg_url: str, tmp_path: Path, flavour: str
) -> None:
    driver, env = DRIVERS[flavour]
    (tmp_path / "driverapp.py").write_text(textwrap.dedent(APP.format(driver=driver)))
    args = ["-k", "gevent", "--preload", "-w", "1", "-c", "python:greenscope.gunicorn"]
    with gunicorn_app(tmp_path, "driverapp:app", args=args, env=env) as server:
        _concurrent_gets(server, "/", 5)  # warm: the worker is up
        start = time.monotonic()
        answers = _concurrent_gets(server, "/sleep", GREENLETS)
        elapsed = time.monotonic() - start
        log = server.log()

    print(f"gunicorn {flavour}: {elapsed:.2f} s")
    assert len({a["pid"] for a in answers}) == 1  # one worker served them all
    assert elapsed < COOPERATIVE_BOUND, (elapsed, log)
    # psycopg 3 imported in the master had its C wait replaced; imported by the hook, after
    # patching, it chose its cooperative wait by itself
    psycopg = "patched" if driver == "psycopg" else "already"
    assert f"drivers: psycopg2 patched, psycopg {psycopg}" in log, log


@pytest.mark.postgres
def test_psycopg3_preloaded_blocks_a_gevent_worker_without_greenscopes_configuration(
    pg_url: str, tmp_path: Path
) -> None:
    # the same app and server without -c python:greenscope.gunicorn: nothing calls
    # patch_drivers(), psycopg keeps its C wait, and requests run one after the other
    (tmp_path / "driverapp.py").write_text(textwrap.dedent(APP.format(driver="psycopg")))
    args = ["-k", "gevent", "--preload", "-w", "1"]
    env = {"PSYCOPG_IMPL": "binary"}
    with gunicorn_app(tmp_path, "driverapp:app", args=args, env=env) as server:
        _concurrent_gets(server, "/", 2)
        start = time.monotonic()
        _concurrent_gets(server, "/sleep", 4)
        elapsed = time.monotonic() - start
    print(f"gunicorn psycopg3-binary without greenscope's conf, 4 requests: {elapsed:.2f} s")
    assert elapsed >= 1.9, elapsed  # 4 x 0.5 s, serially
