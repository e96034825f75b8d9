"""greenscope through a real PgBouncer in transaction pooling mode.

Under ``pool_mode = transaction`` a client holds one of PgBouncer's few server connections for
as long as its transaction is open. A Session that is never closed keeps its transaction open:
the server connection stays "active" (idle in transaction) and every other client waits for it,
then fails after ``query_wait_timeout``. The scenario: 100 jobs on a gevent pool of 50
greenlets, each running two statements in a scoped session and never calling ``remove()`` or
``commit()``; PgBouncer has 5 server connections (the ``pgbouncer`` fixture). With
greenscope every greenlet's session is closed when it ends: 0 errors, and PgBouncer's
``SHOW POOLS`` has 0 active server connections and 0 waiting clients afterwards. With the stock
``scoped_session`` (a gevent.local after patching) the same run fails.
"""

from __future__ import annotations

import subprocess
from typing import Any, Dict

import pytest
from conftest import PgBouncer, run_python

JOBS, GREENLETS = 100, 50

SCENARIO = """
import json, sys, time

from gevent import monkey

monkey.patch_all()
import gevent
import gevent.pool
import psycopg2
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.orm import sessionmaker

import greenscope

driver, kind, port, prepare = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
commit, poolclass = sys.argv[7] == "commit", sys.argv[8]
jobs, greenlets = int(sys.argv[5]), int(sys.argv[6])
greenscope.patch_drivers()
connect_args = {}
if driver == "psycopg" and prepare == "off":
    connect_args["prepare_threshold"] = None  # no server-side prepared statements
url = f"postgresql+{driver}://postgres@127.0.0.1:{port}/test"
if poolclass == "null":  # a connection to PgBouncer per checkout, closed at checkin
    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args
    )
else:
    engine = sqlalchemy.create_engine(
        url, pool_size=10, max_overflow=0, pool_timeout=3, connect_args=connect_args
    )
factory = sessionmaker(engine)
scoping = greenscope.scoped_session if kind == "greenscope" else stock_scoped_session
Session = scoping(factory)
errors = []


def job(i):
    try:
        Session.execute(text("select pg_sleep(0.02)"))
        Session.execute(text("select count(*) from pg_class where relnamespace > :n"), {"n": i})
        if commit:
            Session.commit()
    except Exception as error:  # collected, asserted by the parent
        errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
    # no remove() (and by default no commit()): the transaction is open when the greenlet ends


start = time.monotonic()
pool = gevent.pool.Pool(greenlets)
for i in range(jobs):
    pool.spawn(job, i)
pool.join(timeout=90)
elapsed = time.monotonic() - start
gevent.sleep(0.5)  # closes run in their own greenlets


def show_pools():
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="pgbouncer")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SHOW POOLS")
    names = [c[0] for c in cur.description]
    rows = [dict(zip(names, row)) for row in cur.fetchall()]
    conn.close()
    return next(r for r in rows if r["database"] == "test")


pools = show_pools()  # while this process still holds its client connections
kinds = sorted({e.split(":")[0] for e in errors})
print(json.dumps({
    "elapsed": round(elapsed, 2), "errors": len(errors), "error_kinds": kinds,
    "first_error": errors[0] if errors else None,
    "checked_out": engine.pool.checkedout() if poolclass != "null" else 0,
    "sv_active": pools["sv_active"], "cl_waiting": pools["cl_waiting"],
    "sv_idle": pools["sv_idle"], "sv_used": pools["sv_used"],
}))
"""


def run_through_pgbouncer(
    bouncer: PgBouncer,
    driver: str,
    kind: str,
    prepare: str = "off",
    commit: bool = False,
    pool: str = "queue",
) -> Dict[str, Any]:
    args = [driver, kind, str(bouncer.port), prepare, str(JOBS), str(GREENLETS)]
    args += ["commit" if commit else "no-commit", pool]
    if kind == "greenscope":
        result: Dict[str, Any] = run_python(SCENARIO, args=args, timeout=180)
        return result
    # Stock finishes in 6-7 s on CPython 3.10+; on 3.9 with gevent 26.7 it never does (measured:
    # the process spins in the hub's epoll_wait at ~90 % CPU after PgBouncer's query_wait_timeout
    # closed the clients left waiting). A hang is stock failing too: reported, not waited for.
    try:
        return run_python(SCENARIO, args=args, timeout=40)  # type: ignore[no-any-return]
    except subprocess.TimeoutExpired:
        return {"hung": True}


def stock_failed(result: Dict[str, Any]) -> bool:
    """Most jobs failed and server connections are held by sessions never closed, or it hung."""
    return bool(result.get("hung")) or (result["errors"] >= JOBS // 2 and result["sv_active"] > 0)


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_greenlets_that_forget_remove_leave_no_busy_pgbouncer_server_connection(
    pgbouncer: PgBouncer, driver: str
) -> None:
    result = run_through_pgbouncer(pgbouncer, driver, "greenscope")
    print(result)  # the figures, for the docs (pytest -s)
    assert result["errors"] == 0, result
    assert result["checked_out"] == 0, result
    assert result["sv_active"] == 0 and result["cl_waiting"] == 0, result
    assert pgbouncer.pool()["sv_active"] == 0


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_stock_scoped_session_that_forgets_remove_exhausts_pgbouncer(
    pgbouncer: PgBouncer, driver: str
) -> None:
    result = run_through_pgbouncer(pgbouncer, driver, "stock")
    print(result)  # the figures, for the docs (pytest -s)
    assert stock_failed(result), result  # server connections held by sessions never closed


@pytest.mark.postgres
def test_psycopg3_prepared_statements_fail_under_transaction_pooling_unless_disabled(
    pgbouncer: PgBouncer,
) -> None:
    # psycopg 3 prepares a statement run 5 times on one connection (prepare_threshold=5) and
    # forgets them on ROLLBACK; jobs that commit keep them, and under transaction pooling the
    # next transaction may run on a server connection that never prepared it
    default = run_through_pgbouncer(pgbouncer, "psycopg", "greenscope", "default", commit=True)
    off = run_through_pgbouncer(pgbouncer, "psycopg", "greenscope", "off", commit=True)
    print({"prepare_threshold=5": default, "prepare_threshold=None": off})
    assert default["errors"] > 0, default
    assert off["errors"] == 0 and off["sv_active"] == 0, off


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["greenscope", "stock"])
def test_nullpool_does_not_save_a_scoped_session_that_forgets_remove(
    pgbouncer: PgBouncer, kind: str
) -> None:
    # NullPool closes the client connection at checkin, but a session never closed never checks
    # its connection in: its transaction keeps a server connection all the same
    result = run_through_pgbouncer(pgbouncer, "psycopg2", kind, pool="null")
    print(result)
    if kind == "greenscope":
        assert result["errors"] == 0 and result["sv_active"] == 0, result
    else:
        assert stock_failed(result), result


ASYNCPG_SCENARIO = """
import asyncio, json, sys, uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from greenscope.asyncio import async_scoped_session, wait_closed

port, caches = int(sys.argv[1]), sys.argv[2]
kwargs = {}
if caches == "off":  # asyncpg's statement cache and SQLAlchemy's prepared-statement cache, and
    # names unique across client connections (asyncpg 0.29 numbers them per connection)
    kwargs["connect_args"] = {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
    }


async def main():
    engine = create_async_engine(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test",
        pool_size=10, max_overflow=0, pool_timeout=3, **kwargs,
    )
    Session = async_scoped_session(async_sessionmaker(engine))
    errors = []

    async def job(i):
        try:
            await Session.execute(text("select pg_sleep(0.02)"))
            await Session.execute(text("select count(*) from pg_class where relnamespace > :n"),
                                  {"n": i})
            await Session.commit()
        except Exception as error:
            errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")

    for start in range(0, 100, 50):
        await asyncio.gather(*(job(i) for i in range(start, start + 50)))
    await wait_closed()
    checked_out = engine.pool.checkedout()
    await engine.dispose()
    return {"errors": len(errors), "first_error": errors[0] if errors else None,
            "checked_out": checked_out}


print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.postgres
def test_asyncpg_statement_caches_fail_under_transaction_pooling_unless_disabled(
    pgbouncer: PgBouncer,
) -> None:
    default = run_python(ASYNCPG_SCENARIO, args=[str(pgbouncer.port), "default"], timeout=120)
    off = run_python(ASYNCPG_SCENARIO, args=[str(pgbouncer.port), "off"], timeout=120)
    print({"default": default, "caches off": off})
    assert default["errors"] > 0, default
    assert off == {"errors": 0, "first_error": None, "checked_out": 0}, off
