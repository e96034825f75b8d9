"""``greenscope.fork``: engines made safe across ``os.fork()`` without any call in the child.

Every scenario runs in a fresh interpreter (``run_python``), so pytest's own process never
forks. The parent holds a session in an open transaction (a temporary table lives on its
connection only, so a rollback by anyone shows) and an idle pooled connection; children query
through the same engine. Each scenario is also run without greenscope's handling, to show that
the stock configuration fails it.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
from conftest import run_python

pytestmark = pytest.mark.postgres

_MULTIPROCESSING = r"""
import json, multiprocessing, os, sys, threading, time
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker, scoped_session
import greenscope

url, flavour = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url, pool_size=2, max_overflow=0, pool_timeout=5)
factory = sessionmaker(engine)
Session = greenscope.scoped_session(factory) if flavour == "greenscope" else scoped_session(factory)
PID = sa.text("select pg_backend_pid()")

idle = engine.connect()
idle_backend = idle.execute(PID).scalar()
session = Session()
session.execute(sa.text("create temp table fork_check (x int)"))
session.execute(sa.text("insert into fork_check values (1)"))
parent_backend = session.execute(PID).scalar()
idle.close()  # back to the pool: idle there at fork time


def child(queue, n):
    try:
        seen = {"session": Session.execute(PID).scalar()}
        Session.commit()
        with engine.connect() as conn:
            seen["connect"] = conn.execute(PID).scalar()
        Session.remove()
    except Exception as error:
        seen = {"error": repr(error)[:200]}
    queue.put((n, seen))


ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
children = [ctx.Process(target=child, args=(queue, n)) for n in range(4)]
for process in children:
    process.start()
results = {}
deadline = time.monotonic() + 8  # bounded: children sharing the parent's socket may hang
for _ in children:
    try:
        n, seen = queue.get(timeout=max(0.1, deadline - time.monotonic()))
        results[n] = seen
    except Exception:
        break
for process in children:
    process.join(max(0.1, deadline - time.monotonic()))
    if process.is_alive():
        process.kill()
        process.join(10)
parent = {"exitcodes": [p.exitcode for p in children]}


def check():
    try:
        parent["same_session"] = Session() is session
        parent["backend"] = Session.execute(PID).scalar()
        parent["temp_rows"] = Session.execute(sa.text("select count(*) from fork_check")).scalar()
        Session.commit()
        parent["committed"] = True
        with engine.connect() as conn:
            parent["idle_works"] = conn.execute(sa.text("select 1")).scalar() == 1
    except Exception as error:
        parent["error"] = repr(error)[:200]


def report():
    print(json.dumps({"idle_backend": idle_backend, "parent_backend": parent_backend,
                      "children": results, "parent": parent}), flush=True)
    os._exit(0)  # a hung connection must not hang the interpreter's exit


def watchdog():  # the check runs in the main thread (its scoped session); this bounds it
    if not done.wait(10):
        parent["error"] = "the parent's query got no answer"
        report()


done = threading.Event()
threading.Thread(target=watchdog, daemon=True).start()
check()
done.set()
report()
"""


def _multiprocessing(pg_url: str, flavour: str) -> Dict[str, Any]:
    report: Dict[str, Any] = run_python(_MULTIPROCESSING, args=[pg_url, flavour], timeout=120)
    return report


def test_multiprocessing_fork_children_get_their_own_connections_and_parent_keeps_its_own(
    pg_url: str,
) -> None:
    report = _multiprocessing(pg_url, "greenscope")
    children = report["children"].values()
    assert [c for c in children if "error" in c] == []
    backends = {c["session"] for c in children}
    assert len(backends) == 4  # one connection per child
    parents = {report["parent_backend"], report["idle_backend"]}
    assert not backends & parents
    assert not {c["connect"] for c in children} & parents
    parent = report["parent"]
    assert parent == {
        "exitcodes": [0, 0, 0, 0],
        "same_session": True,
        "backend": report["parent_backend"],
        "temp_rows": 1,  # the transaction open at fork time is still open ...
        "committed": True,  # ... and commits
        "idle_works": True,
    }


def test_stock_scoped_session_hands_forked_children_the_parents_connections(pg_url: str) -> None:
    report = _multiprocessing(pg_url, "stock")
    children = list(report["children"].values())
    parents = {report["parent_backend"], report["idle_backend"]}
    used_parents = [c for c in children if "error" in c or c["session"] in parents]
    # the children ran on (or broke on) the parent's connections
    assert used_parents or len(children) < 4, report


_PLAIN_FORK = r"""
import atexit, gc, json, os, sys
import sqlalchemy as sa
from sqlalchemy.orm import Session as PlainSession, sessionmaker, scoped_session
import greenscope

url, flavour = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url, pool_size=4, max_overflow=0, pool_timeout=5)
factory = sessionmaker(engine)
Session = greenscope.scoped_session(factory) if flavour == "greenscope" else scoped_session(factory)
PID = sa.text("select pg_backend_pid()")

idle = engine.connect()
idle_backend = idle.execute(PID).scalar()
session = Session()
session.execute(sa.text("create temp table fork_check (x int)"))
session.execute(sa.text("insert into fork_check values (1)"))
parent_backend = session.execute(PID).scalar()
idle.close()  # back to the pool: idle there at fork time

pid = os.fork()
if pid == 0:
    # A child that cleans up the usual way and exits normally: its own scoped session
    # removed, the engine disposed at exit, module teardown and finalizers run.
    atexit.register(engine.dispose)
    Session.execute(PID).scalar()
    Session.remove()
    gc.collect()
    sys.exit(0)

_, status = os.waitpid(pid, 0)
parent = {"child_status": status}
try:
    parent["same_session"] = Session() is session
    parent["temp_rows"] = Session.execute(sa.text("select count(*) from fork_check")).scalar()
    Session.commit()
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    with engine.connect() as conn:  # both pooled connections, the idle one included
        parent["backends"] = sorted({conn.execute(PID).scalar(), parent_backend})
    parent["ok"] = True
except Exception as error:
    parent["error"] = repr(error)[:200]
print(json.dumps(parent))
"""


@pytest.mark.parametrize("flavour", ["greenscope", "stock"])
def test_child_exiting_normally_after_cleanup_leaves_parent_connections_working(
    pg_url: str, flavour: str
) -> None:
    parent = run_python(_PLAIN_FORK, args=[pg_url, flavour], timeout=60)
    if flavour == "greenscope":
        assert parent["child_status"] == 0
        assert parent.get("error") is None, parent
        assert parent["same_session"] is True
        assert parent["temp_rows"] == 1
        assert parent["ok"] is True
    else:  # the child's remove() rolled back and closed the parent's session on its socket
        assert "error" in parent or parent["temp_rows"] != 1, parent


_FORK_SAFE = r"""
import gc, json, logging, os, sys
import sqlalchemy as sa
from sqlalchemy.orm import Session
import greenscope

logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
logging.getLogger("sqlalchemy.pool").propagate = False
url, flavour = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url, pool_size=4, max_overflow=0, pool_timeout=5)
if flavour == "fork_safe":
    assert greenscope.fork_safe(engine) is engine
PID = sa.text("select pg_backend_pid()")

idle = engine.connect()
idle_backend = idle.execute(PID).scalar()
kept = engine.connect()  # a Connection in an open transaction, no registry anywhere
kept.execute(sa.text("create temp table fork_kept (x int)"))
kept.execute(sa.text("insert into fork_kept values (1)"))
kept_backend = kept.execute(PID).scalar()
session = Session(engine)  # a plain Session in an open transaction
session.execute(sa.text("create temp table fork_session (x int)"))
session.execute(sa.text("insert into fork_session values (1)"))
idle.close()  # back to the pool: idle there at fork time

read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    child = {}
    try:
        with engine.connect() as conn:
            child["backend"] = conn.execute(PID).scalar()
        child["kept_close"] = "ok"
        try:
            kept.close()  # the user closes what it inherited: a ROLLBACK on the parent's socket?
        except Exception as error:
            child["kept_close"] = str(getattr(error, "orig", error)).strip()
        del session  # an inherited Session dropped: SQLAlchemy's finalizer resets its connection
        gc.collect()
        engine.dispose()
    except Exception as error:
        child["error"] = repr(error)[:200]
    os.write(write_end, json.dumps(child).encode())
    os.close(write_end)
    sys.exit(0)

os.close(write_end)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(read_end, 65536))
parent = {"child_status": status}
try:
    parent["kept_rows"] = kept.execute(sa.text("select count(*) from fork_kept")).scalar()
    kept.commit()
    parent["session_rows"] = session.execute(sa.text("select count(*) from fork_session")).scalar()
    session.commit()
    with engine.connect() as conn:
        parent["idle_ok"] = conn.execute(sa.text("select 1")).scalar() == 1
except Exception as error:
    parent["error"] = repr(error)[:200]
print(json.dumps({"parents": [idle_backend, kept_backend], "child": child, "parent": parent}))
"""


@pytest.mark.parametrize("flavour", ["fork_safe", "stock"])
def test_fork_safe_engine_without_registry_keeps_parent_transactions_when_child_closes_them(
    pg_url: str, flavour: str
) -> None:
    report = run_python(_FORK_SAFE, args=[pg_url, flavour], timeout=60)
    child, parent = report["child"], report["parent"]
    assert "error" not in child, child
    if flavour == "fork_safe":
        assert child["backend"] not in report["parents"]  # a connection of its own
        # it talked to /dev/null, not to the server
        assert child["kept_close"] != "ok", child
        assert parent == {
            "child_status": 0,
            "kept_rows": 1,
            "session_rows": 1,
            "idle_ok": True,
        }
    else:  # the child used the idle connection, and its close/finalizer ended the transactions
        assert child["backend"] in report["parents"]
        assert "error" in parent or parent.get("kept_rows") != 1, parent


def test_flask_sqlalchemy_engines_of_a_greenscope_db_are_renewed_in_a_forked_child() -> None:
    out = run_python(
        """
        import json, os
        from flask import Flask
        import greenscope.flask

        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
        app.config["SQLALCHEMY_BINDS"] = {"other": "sqlite://"}
        db = greenscope.flask.SQLAlchemy(app)
        with app.app_context():
            pools = {key: id(engine.pool) for key, engine in db.engines.items()}
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            with app.app_context():
                renewed = [id(e.pool) != pools[k] for k, e in db.engines.items()]
            os.write(write, json.dumps(renewed).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 1000).decode())
        """
    )
    assert out == [True, True]


def test_fork_handling_never_switches_greenlets_under_gevent(pg_url: str) -> None:
    # A greenlet trace armed just before os.fork() (gevent's, under patch_all) records any switch
    # until the child's first line: the at-fork handlers (registries, pool renewal, the dup2 of
    # inherited sockets) run with runnable greenlets around and must not let one of them in.
    out = run_python(
        """
        from gevent import monkey
        monkey.patch_all()
        import json, os, sys
        import gevent, greenlet
        import sqlalchemy as sa
        from sqlalchemy.orm import sessionmaker
        import greenscope

        url = sys.argv[1]
        engine = sa.create_engine(url, pool_size=3)
        Session = greenscope.scoped_session(sessionmaker(engine))
        other = greenscope.fork_safe(sa.create_engine(url))
        with engine.connect() as c, other.connect() as d:
            c.execute(sa.text("select 1"))
            d.execute(sa.text("select 1"))
        pools = [id(engine.pool), id(other.pool)]
        runnable = [gevent.spawn(gevent.sleep, 0) for _ in range(5)]
        events, armed = [], [False]

        def trace(event, args):
            if armed[0]:
                events.append(event)

        greenlet.settrace(trace)
        armed[0] = True
        pid = os.fork()
        armed[0] = False
        if pid == 0:
            renewed = [id(engine.pool) != pools[0], id(other.pool) != pools[1]]
            print(json.dumps({"switches": events, "renewed": renewed}), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """,
        args=[pg_url],
    )
    assert out == {"switches": [], "renewed": [True, True]}


_FDS = r"""
import asyncio, json, os, sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
import greenscope

sync_url, async_url = sys.argv[1], sys.argv[2]
engine = greenscope.fork_safe(sa.create_engine(sync_url, pool_size=2))
aengine = create_async_engine(async_url, pool_size=2)
assert greenscope.fork_safe(aengine) is aengine
idle = engine.connect()
idle.execute(sa.text("select 1"))
busy = engine.connect()  # checked out at the fork
busy.execute(sa.text("select 1"))
idle.close()


async def use_async():
    idle = await aengine.connect()
    await idle.execute(sa.text("select 1"))
    held = await aengine.connect()  # checked out at the fork
    await held.execute(sa.text("select 1"))
    await idle.close()  # back to the pool: idle there at the fork
    return held


def socket_fd(dbapi_connection):
    return dbapi_connection.driver_connection._transport.get_extra_info("socket").fileno()


loop = asyncio.new_event_loop()
held = loop.run_until_complete(use_async())
fds = {
    "idle": engine.pool._pool.queue[0].dbapi_connection.fileno(),
    "busy": busy.connection.dbapi_connection.fileno(),
    "asyncpg_idle": socket_fd(aengine.sync_engine.pool._pool._queue._queue[0].dbapi_connection),
    "asyncpg_busy": socket_fd(held.sync_connection.connection.dbapi_connection),
}


def targets():
    out = {}
    for name, fd in fds.items():
        try:
            out[name] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as error:
            out[name] = repr(error)
    return out


read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, json.dumps(targets()).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"child": json.loads(os.read(read, 10000)), "parent": targets()}))
"""


def test_inherited_sockets_point_at_dev_null_in_the_child_only(pg_url: str) -> None:
    from conftest import async_pg_url

    out = run_python(_FDS, args=[pg_url, async_pg_url()])
    assert set(out["child"].values()) == {"/dev/null"}, out  # psycopg2 and asyncpg, both states
    assert all(target.startswith("socket:") for target in out["parent"].values()), out


def test_fork_safe_rejects_what_is_not_an_engine() -> None:
    import greenscope

    with pytest.raises(TypeError, match="needs an Engine or AsyncEngine"):
        greenscope.fork_safe("postgresql://")
