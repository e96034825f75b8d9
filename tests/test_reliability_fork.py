"""Fork with live sessions, as gunicorn ``--preload`` does it, on real PostgreSQL.

At ``os.fork()`` the parent has sessions in open transactions on checked-out connections (three
gevent greenlets and the main greenlet, each with an uncommitted write). The child does what a
gunicorn worker does with a pre-fork engine - ``engine.dispose(close=False)`` - and must start
with empty registries, work on connections of its own (a different ``pg_backend_pid()``), and
exit (both ways: a normal interpreter exit and ``os._exit``) without touching the parent's
connections. The parent's sessions then go on: same backend, and their pending writes commit.
The child reports through a pipe; the parent asserts nothing itself, the test does.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import run_python

pytestmark = pytest.mark.postgres

FORK = r"""
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import gc, json, os, sys
import gevent, gevent.event
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
import greenscope

url = "postgresql+psycopg2://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
table, exit_how = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url, pool_size=6, max_overflow=0, pool_timeout=30)
Session = greenscope.scoped_session(sessionmaker(engine))
INSERT = sa.text(f"insert into {table} (owner, n) values (:owner, 1)")
PID = sa.text("select pg_backend_pid()")

go_on = gevent.event.Event()
parent_pids = {}


def holder(owner):
    Session.execute(INSERT, {"owner": owner})  # an open transaction at fork time
    parent_pids[owner] = Session.execute(PID).scalar()
    go_on.wait()
    same_backend = Session.execute(PID).scalar() == parent_pids[owner]
    Session.commit()
    return same_backend


holders = [gevent.spawn(holder, f"parent-{i}") for i in range(3)]
Session.execute(INSERT, {"owner": "parent-main"})
parent_pids["parent-main"] = Session.execute(PID).scalar()
while len(parent_pids) < 4:
    gevent.sleep(0.01)
before = {"registry_len": len(Session.registry), "checkedout": engine.pool.checkedout()}

read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    os.close(read_end)
    report = {"registry_len_at_start": len(Session.registry)}
    engine.dispose(close=False)  # what greenscope.gunicorn does in a worker

    def child_request(i):
        Session.execute(INSERT, {"owner": f"child-{i}"})
        pid = Session.execute(PID).scalar()
        Session.commit()
        return pid

    jobs = [gevent.spawn(child_request, i) for i in range(3)]
    gevent.joinall(jobs, timeout=30)
    report["child_pids"] = [job.value for job in jobs]
    report["main_session_is_new"] = "parent-main" not in [
        row.owner for row in Session.execute(sa.text(f"select owner from {table}"))
    ]  # the parent's uncommitted row is invisible: a new session, a new connection
    Session.remove()
    gevent.sleep(0.05)
    gc.collect()
    report["registry_len_at_end"] = len(Session.registry)
    report["checkedout_at_end"] = engine.pool.checkedout()
    os.write(write_end, json.dumps(report).encode())
    os.close(write_end)
    if exit_how == "os._exit":
        os._exit(0)
    sys.exit(0)  # a normal interpreter exit, like a gunicorn worker's

os.close(write_end)
_, status = os.waitpid(child, 0)
child_report = json.loads(os.read(read_end, 65536))
os.close(read_end)

go_on.set()
holders_ok = [glet.get(timeout=30) for glet in holders]
main_same_backend = Session.execute(PID).scalar() == parent_pids["parent-main"]
Session.commit()
Session.remove()
gevent.sleep(0.05)
print(json.dumps({
    "before": before,
    "child": child_report,
    "child_status": status,
    "parent_pids": sorted(parent_pids.values()),
    "holders_same_backend": holders_ok,
    "main_same_backend": main_same_backend,
    "checkedout": engine.pool.checkedout(),
    "registry_len": len(Session.registry),
}))
engine.dispose()
"""


@pytest.mark.parametrize("exit_how", ["sys.exit", "os._exit"])
def test_forked_child_starts_clean_and_works_while_parent_sessions_keep_working(
    pg_url: str, pg_table: str, exit_how: str
) -> None:
    result = run_python(FORK, args=[pg_table, exit_how])
    child = result["child"]

    assert result["before"] == {"registry_len": 4, "checkedout": 4}
    assert result["child_status"] == 0
    assert child["registry_len_at_start"] == 0  # the child inherits no session
    assert len(child["child_pids"]) == 3 and all(child["child_pids"])
    assert not set(child["child_pids"]) & set(result["parent_pids"])  # new connections
    assert child["main_session_is_new"] is True
    assert child["registry_len_at_end"] == 0
    assert child["checkedout_at_end"] == 0

    # The parent's sessions survived the child: same backends, pending writes committed.
    assert result["holders_same_backend"] == [True, True, True]
    assert result["main_same_backend"] is True
    assert result["checkedout"] == 0
    assert result["registry_len"] == 0

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            owners = sorted(conn.exec_driver_sql(f"select owner from {pg_table}").scalars())
    finally:
        engine.dispose()
    assert owners == sorted(
        ["parent-main", "parent-0", "parent-1", "parent-2", "child-0", "child-1", "child-2"]
    )
