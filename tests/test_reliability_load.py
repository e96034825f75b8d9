"""Load on real PostgreSQL: 5,000 concurrent gevent greenlets on a pool of 20.

Each greenlet writes one row carrying its own owner token in its own greenscope session and
commits, and never calls ``remove()``. Afterwards every committed row is present exactly once,
every greenlet had a session of its own, nothing is checked out and the registry is empty. The
wall time and rows/s are printed (``pytest -s``) and recorded in ``docs/reliability.md``; they are
reported, never asserted (no timed assertions).

Reproduce: ``.venv/bin/python -m pytest tests/test_reliability_load.py -s``
(``GREENSCOPE_LOAD_GREENLETS`` changes the count).
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from conftest import run_python

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

GREENLETS = int(os.environ.get("GREENSCOPE_LOAD_GREENLETS", "5000"))

LOAD = r"""
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, os, sys, time
import gevent
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
import greenscope

url = "postgresql+psycopg2://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
table, count, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
engine = sa.create_engine(url, pool_size=20, max_overflow=0, pool_timeout=300)
Session = greenscope.scoped_session(sessionmaker(engine))
INSERT = sa.text(f"insert into {table} (owner, n) values (:owner, :n)")
sessions = [None] * count  # kept referenced: distinct live objects have distinct ids
stable = [False] * count


def work(i):
    session = Session()
    sessions[i] = session
    Session.execute(INSERT, {"owner": f"{run}-{i}", "n": i})
    Session.commit()
    stable[i] = Session() is session
    # no remove(): greenscope closes the session when the greenlet finishes


with engine.connect() as conn:  # connect once before timing, like a warm worker
    conn.exec_driver_sql("select 1")
start = time.perf_counter()
greenlets = [gevent.spawn(work, i) for i in range(count)]
gevent.joinall(greenlets, timeout=240)
elapsed = time.perf_counter() - start
for _ in range(500):  # the closer greenlet may still be returning the last connections
    if engine.pool.checkedout() == 0 and len(Session.registry) == 0:
        break
    gevent.sleep(0.01)
failures = [repr(g.exception) for g in greenlets if not g.successful()]
print(json.dumps({
    "finished": sum(1 for g in greenlets if g.dead),
    "failures": failures[:5],
    "failure_count": len(failures),
    "distinct_sessions": len({id(s) for s in sessions if s is not None}),
    "stable": sum(stable),
    "checkedout": engine.pool.checkedout(),
    "registry_len": len(Session.registry),
    "ended_without_remove": Session.registry.ended_without_remove,
    "seconds": elapsed,
    "rows_per_second": count / elapsed,
}))
engine.dispose()
"""


def test_5000_concurrent_greenlets_commit_every_row_exactly_once_and_leave_nothing_behind(
    pg_url: str, pg_table: str
) -> None:
    run = "load"
    result = run_python(LOAD, args=[pg_table, str(GREENLETS), run], timeout=280)

    assert result["finished"] == GREENLETS
    assert result["failure_count"] == 0, result["failures"]
    assert result["distinct_sessions"] == GREENLETS  # each greenlet its own session
    assert result["stable"] == GREENLETS  # ... the same one for its whole life
    assert result["checkedout"] == 0
    assert result["registry_len"] == 0
    assert result["ended_without_remove"] == GREENLETS

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            total, owners = conn.exec_driver_sql(
                f"select count(*), count(distinct owner) from {pg_table}"
            ).one()
            worst = conn.exec_driver_sql(
                f"select coalesce(max(c), 0) from "
                f"(select count(*) as c from {pg_table} group by owner) as per_owner"
            ).scalar()
            expected = {f"{run}-{i}" for i in range(GREENLETS)}
            owners_seen = set(conn.exec_driver_sql(f"select owner from {pg_table}").scalars())
    finally:
        engine.dispose()
    assert owners_seen == expected  # every committed row is there ...
    assert total == owners == GREENLETS
    assert worst == 1  # ... exactly once

    print(
        f"\nload: {GREENLETS} greenlets, pool 20: {result['seconds']:.2f} s, "
        f"{result['rows_per_second']:.0f} rows/s"
    )
