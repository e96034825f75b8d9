"""The asyncio adapter on every async PostgreSQL driver: asyncpg and psycopg 3's async mode.

Each driver runs in a fresh interpreter (``PSYCOPG_IMPL`` picks psycopg's C or pure-Python
implementation at import): tasks that forget ``remove()``, each with its own ``AsyncSession``,
on a pool of 5 (``max_overflow=0``, ``pool_timeout=5``): no timeouts, one session per task, and
nothing checked out or registered once :func:`greenscope.asyncio.wait_closed` returns. Then 20
tasks each run ``select pg_sleep(0.5)`` on a pool of 20: they overlap (the driver waits on the
event loop), 0.5 s in all where waiting in C would take 10 s.
"""

from __future__ import annotations

from typing import Dict

import pytest
from conftest import run_python

SCENARIO = """
import asyncio, json, os, sys, time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy import exc

from greenscope.asyncio import async_scoped_session, wait_closed

url = sys.argv[1] + "://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]


async def forgetful(tasks, batch):
    engine = create_async_engine(url, pool_size=5, max_overflow=0, pool_timeout=5)
    Session = async_scoped_session(async_sessionmaker(engine))
    sessions, timeouts = [], 0

    async def request():
        nonlocal timeouts
        try:
            await Session.execute(text("select pg_sleep(0.01)"))
        except exc.TimeoutError:
            timeouts += 1
            return
        sessions.append(Session())  # and no remove(); kept, so ids stay unique

    for start in range(0, tasks, batch):
        await asyncio.gather(*(request() for _ in range(batch)))
    await wait_closed()
    distinct = len({id(s) for s in sessions})
    seen = {"timeouts": timeouts, "sessions": len(sessions), "distinct": distinct,
            "checked_out": engine.pool.checkedout(), "registered": len(Session.registry)}
    await engine.dispose()
    return seen


async def overlapping(n):
    engine = create_async_engine(url, pool_size=n, max_overflow=0)
    Session = async_scoped_session(async_sessionmaker(engine))

    async def request():
        await Session.execute(text("select pg_sleep(0.5)"))

    start = time.monotonic()
    await asyncio.gather(*(request() for _ in range(n)))
    elapsed = time.monotonic() - start
    await wait_closed()
    checked_out = engine.pool.checkedout()
    await engine.dispose()
    return {"elapsed": elapsed, "checked_out": checked_out}


async def main():
    result = {"forgetful": await forgetful(100, 20), "overlapping": await overlapping(20)}
    if "psycopg" in sys.modules:
        import psycopg

        result["impl"] = psycopg.pq.__impl__
    return result


print(json.dumps(asyncio.run(main())))
"""

CASES: Dict[str, tuple[str, Dict[str, str]]] = {
    "asyncpg": ("postgresql+asyncpg", {}),
    "psycopg3-async-binary": ("postgresql+psycopg", {"PSYCOPG_IMPL": "binary"}),
    "psycopg3-async-python": ("postgresql+psycopg", {"PSYCOPG_IMPL": "python"}),
}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(CASES))
def test_tasks_without_remove_leave_nothing_checked_out_on_every_async_driver(
    pg_url: str, case: str
) -> None:
    scheme, env = CASES[case]
    result = run_python(SCENARIO, args=[scheme], env=env, timeout=120)

    assert result["forgetful"] == {
        "timeouts": 0,
        "sessions": 100,
        "distinct": 100,
        "checked_out": 0,
        "registered": 0,
    }
    assert result["overlapping"]["elapsed"] < 1.5, result
    assert result["overlapping"]["checked_out"] == 0
    if "PSYCOPG_IMPL" in env:
        assert result["impl"] == env["PSYCOPG_IMPL"]
