"""``os.fork()`` with live sessions: the child starts with empty registries and a connection of
its own; the parent's sessions (and their open transactions) still work after the child exits.

The fork happens in a fresh interpreter (``run_python``), so pytest's own process is never
forked. The child reports through a pipe; the parent process prints both sides as JSON and the
assertions run here.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
from conftest import run_python

_FORK = """
import gc, json, os, sys, time
import greenlet
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
import greenscope

url, child_exit = sys.argv[1], sys.argv[2]
engine = create_engine(url, pool_size=2, max_overflow=0, pool_timeout=5)
Scoped = greenscope.scoped_session(sessionmaker(engine))
by_name = greenscope.WeakScopeRegistry(dict, lambda: "job")  # a strongly kept (string) key
by_name()["n"] = 1

# the main greenlet's session, mid-transaction: a temp table lives on its connection only
parent_session = Scoped()
parent_session.execute(text("create temp table fork_check (x int)"))
parent_session.execute(text("insert into fork_check values (1)"))
parent_backend = parent_session.execute(text("select pg_backend_pid()")).scalar()

# a suspended raw greenlet with a live session too
def holder():
    Scoped.execute(text("select 1"))
    greenlet.getcurrent().parent.switch()
    return Scoped.execute(text("select pg_backend_pid()")).scalar()

held = greenlet.greenlet(holder)
held.switch()
before = {"len": len(Scoped.registry), "checkedout": engine.pool.checkedout()}

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:  # the child
    os.close(read_end)
    try:
        child = {
            "len": len(Scoped.registry),
            "has": Scoped.registry.has(),
            "by_name_len": len(by_name),
        }
        engine.dispose(close=False)  # SQLAlchemy's advice: a new pool, the parent's untouched
        session = Scoped()
        child["new_session"] = session is not parent_session
        child["backend"] = Scoped.execute(text("select pg_backend_pid()")).scalar()
        child["len_in_use"] = len(Scoped.registry)
        Scoped.remove()
        child["len_after_remove"] = len(Scoped.registry)
        engine.dispose()
    except BaseException as error:
        child = {"error": repr(error)}
    os.write(write_end, json.dumps(child).encode())
    os.close(write_end)
    if child_exit == "os._exit":
        os._exit(0)
    gc.collect()
    sys.exit(0)  # a normal exit: atexit, finalizers, module teardown

os.close(write_end)
chunks = []
while True:
    chunk = os.read(read_end, 65536)
    if not chunk:
        break
    chunks.append(chunk)
_, status = os.waitpid(pid, 0)
child = json.loads(b"".join(chunks))
child["exit_status"] = status

# the parent, after the child exited: same session, same connection, same transaction
parent = {
    "same_session": Scoped() is parent_session,
    "backend": Scoped.execute(text("select pg_backend_pid()")).scalar(),
    "temp_rows": Scoped.execute(text("select count(*) from fork_check")).scalar(),
    "by_name": by_name().get("n"),
}
try:
    held.switch()
except Exception as error:
    parent["held_error"] = repr(error)
parent["held_backend_ok"] = held.dead
del held
gc.collect()  # the dead raw greenlet's session goes to this thread's closer thread
Scoped.remove()
deadline = time.monotonic() + 5
while engine.pool.checkedout() and time.monotonic() < deadline:
    time.sleep(0.01)
parent["checkedout_after_remove"] = engine.pool.checkedout()
engine.dispose()
print(json.dumps({"before": before, "parent_backend": parent_backend,
                  "child": child, "parent": parent}))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("child_exit", ["os._exit", "sys.exit"])
def test_forked_child_starts_empty_and_parent_sessions_still_work(
    pg_url: str, child_exit: str
) -> None:
    report: Dict[str, Any] = run_python(_FORK, args=[pg_url, child_exit])
    assert report["before"] == {"len": 2, "checkedout": 2}

    child = report["child"]
    assert "error" not in child, child
    assert child["exit_status"] == 0
    assert child["len"] == 0  # empty registries in the child
    assert child["has"] is False
    assert child["by_name_len"] == 0
    assert child["new_session"] is True
    assert child["backend"] != report["parent_backend"]  # a connection of its own
    assert child["len_in_use"] == 1
    assert child["len_after_remove"] == 0

    parent = report["parent"]
    assert parent["same_session"] is True
    assert parent["backend"] == report["parent_backend"]  # still the pre-fork connection
    assert parent["temp_rows"] == 1  # and its transaction: the child never rolled it back
    assert parent["by_name"] == 1
    assert "held_error" not in parent, parent
    assert parent["held_backend_ok"] is True
    assert parent["checkedout_after_remove"] == 0


_FORK_GEVENT = """
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, os, sys
import gevent
from gevent.event import Event
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
import greenscope

url = sys.argv[1]
engine = create_engine(url, pool_size=3, max_overflow=0, pool_timeout=5)
Scoped = greenscope.scoped_session(sessionmaker(engine))
go = Event()

def holder(n):
    session = Scoped()
    session.info["owner"] = ("parent", n)
    first = Scoped.execute(text("select pg_backend_pid()")).scalar()
    go.wait()  # parked here at the fork
    again = Scoped()
    return {
        "same_session": again is session,
        "tag": list(again.info.get("owner", ())),
        "same_backend": Scoped.execute(text("select pg_backend_pid()")).scalar() == first,
    }

holders = [gevent.spawn(holder, n) for n in range(3)]
gevent.sleep(0.2)
assert len(Scoped.registry) == 3, len(Scoped.registry)

read_end, write_end = os.pipe()
pid = os.fork()  # gevent's fork under patch_all
if pid == 0:
    try:
        engine.dispose(close=False)
        child = {"len": len(Scoped.registry)}
        go.set()  # the copies of the parked greenlets resume in the child
        child["holders"] = [h.get(timeout=10) for h in holders]
        gevent.sleep(0)  # their links
        child["len_after"] = len(Scoped.registry)
    except BaseException as error:
        child = {"error": repr(error)}
    os.write(write_end, json.dumps(child).encode() + b"\\n")
    os._exit(0)

# One newline-terminated message, not "read until EOF": gevent >= 25.8.1 defers os.close() of a
# pipe to the hub, so the parent's write end would stay open during a blocking read.
data = b""
while not data.endswith(b"\\n"):
    chunk = os.read(read_end, 65536)
    if not chunk:
        break
    data += chunk
os.waitpid(pid, 0)
go.set()
parent = [h.get(timeout=10) for h in holders]
gevent.sleep(0)
gevent.sleep(0)
print(json.dumps({"child": json.loads(data), "parent": parent,
                  "len_after": len(Scoped.registry)}))
engine.dispose()
"""


@pytest.mark.postgres
def test_greenlets_parked_at_fork_get_new_sessions_in_the_child_and_keep_theirs_in_parent(
    pg_url: str,
) -> None:
    """gunicorn --preload style: patched process, greenlets holding sessions at fork time.

    In the child their copies resume without the parent's sessions (the hot-path cache is
    invalidated too); in the parent they continue on their own sessions and connections.
    """
    report = run_python(_FORK_GEVENT, args=[pg_url])
    child = report["child"]
    assert "error" not in child, child
    assert child["len"] == 0
    for seen in child["holders"]:
        assert seen["same_session"] is False
        assert seen["tag"] == []  # a fresh session, not the parent's tagged one
        assert seen["same_backend"] is False
    assert child["len_after"] == 0

    for n, seen in enumerate(report["parent"]):
        assert seen == {"same_session": True, "tag": ["parent", n], "same_backend": True}
    assert report["len_after"] == 0
