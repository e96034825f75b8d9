"""Under ``gevent.monkey.patch_all()``: greenscope is right whatever was built or imported first,
and a pool of 5 serves 400 handlers that never call ``remove()``.

Patching is process-wide and irreversible, so every scenario runs in its own interpreter
(``run_python``); the child prints what its greenlets saw as JSON and the assertions run here.
The stock failures are asserted too, so each test proves it can fail.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
from conftest import run_python

# What each scenario's greenlets do: call Session() several times with gevent.sleep between,
# keep every session referenced (so distinct ids mean distinct sessions) and report.
_HANDLERS = """
import json
import gevent

def run(scoped, n=500):
    def handler():
        first = scoped()
        stable = True
        for _ in range(3):
            gevent.sleep(0.001)
            stable = stable and scoped() is first
        return first, stable

    jobs = [gevent.spawn(handler) for _ in range(n)]
    gevent.sleep(0)  # every handler has its session now and is sleeping
    alive = len(scoped.registry) if hasattr(scoped.registry, "__len__") else None
    gevent.joinall(jobs, raise_error=True)
    sessions = [job.value[0] for job in jobs]
    return {
        "distinct": len({id(s) for s in sessions}),
        "stable": all(job.value[1] for job in jobs),
        "alive_while_running": alive,
        "sessions": sessions,
    }

def finish(scoped, report):
    gevent.sleep(0)  # the finished greenlets' links drop their entries
    gevent.sleep(0)  # the closer greenlet closes their sessions
    report["len_after"] = len(scoped.registry)
    report["closed_once"] = all(s.close_calls == 1 for s in report.pop("sessions"))
    report["ended_without_remove"] = scoped.registry.ended_without_remove
    return report
"""

_COUNTING_SESSION = """
from sqlalchemy.orm import Session

class CountingSession(Session):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.close_calls = 0

    def close(self):
        self.close_calls += 1
        super().close()
"""

_ORDERS = {
    # gunicorn --preload / an early import: everything is built before patching
    "built-before-patch": """
import greenscope
from sqlalchemy.orm import scoped_session as stock_scoped_session, sessionmaker
"""
    + _COUNTING_SESSION
    + """
Scoped = greenscope.scoped_session(sessionmaker(class_=CountingSession))
Stock = stock_scoped_session(sessionmaker())
from gevent import monkey
monkey.patch_all()
""",
    # greenscope imported before gevent patches, the registry created after
    "imported-before-built-after-patch": """
import greenscope
from sqlalchemy.orm import scoped_session as stock_scoped_session, sessionmaker
from gevent import monkey
monkey.patch_all()
"""
    + _COUNTING_SESSION
    + """
Scoped = greenscope.scoped_session(sessionmaker(class_=CountingSession))
Stock = stock_scoped_session(sessionmaker())
""",
    # gevent patches first, greenscope is imported and built afterwards
    "patched-before-import": """
from gevent import monkey
monkey.patch_all()
import greenscope
from sqlalchemy.orm import scoped_session as stock_scoped_session, sessionmaker
"""
    + _COUNTING_SESSION
    + """
Scoped = greenscope.scoped_session(sessionmaker(class_=CountingSession))
Stock = stock_scoped_session(sessionmaker())
""",
}


def _scenario(order: str) -> Dict[str, Any]:
    code = (
        _ORDERS[order]
        + _HANDLERS
        + """
from gevent import monkey
assert monkey.is_module_patched("threading")
report = {"greenscope": finish(Scoped, run(Scoped))}
stock = run(Stock)
stock.pop("sessions")
report["stock"] = stock
print(json.dumps(report))
"""
    )
    return run_python(code)  # type: ignore[no-any-return]


@pytest.mark.parametrize("order", list(_ORDERS))
def test_500_patched_gevent_greenlets_get_500_stable_sessions_whatever_the_order(
    order: str,
) -> None:
    report = _scenario(order)
    ours = report["greenscope"]
    assert ours["distinct"] == 500
    assert ours["stable"] is True
    assert ours["alive_while_running"] == 500
    # ... and each session ended with its greenlet: dropped and closed exactly once
    assert ours["len_after"] == 0
    assert ours["closed_once"] is True
    assert ours["ended_without_remove"] == 500

    stock = report["stock"]
    if order == "built-before-patch":
        # the failure greenscope ends: threading.local built before patching is per OS thread
        assert stock["distinct"] == 1
    else:
        assert stock["distinct"] == 500  # patched before the stock registry was built: fine


# -- a pool of 5, 400 handlers, no remove() (PostgreSQL through psycopg2 + psycogreen) ------

_POOL = """
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, sys
import gevent
import greenlet
from sqlalchemy import create_engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import scoped_session as stock_scoped_session, sessionmaker
import greenscope

url, kind, handlers, pool_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
engine = create_engine(url, pool_size=5, max_overflow=0, pool_timeout=pool_timeout)
if kind == "greenscope":
    Scoped = greenscope.scoped_session(sessionmaker(engine))
else:
    Scoped = stock_scoped_session(sessionmaker(engine), scopefunc=greenlet.getcurrent)

timeouts = []
results = []

def handler(n):
    try:
        results.append(Scoped.execute(text("select :n from pg_sleep(0.01)"), {"n": n}).scalar())
    except PoolTimeout:
        timeouts.append(n)
    # no Scoped.remove(): the handler "forgets" it

jobs = [gevent.spawn(handler, n) for n in range(handlers)]  # kept referenced until the end
gevent.joinall(jobs, raise_error=True)
# Let the hub run until the closer greenlet has closed the last sessions (their ROLLBACK is
# cooperative I/O); bounded, and the count of rounds is reported, not asserted.
rounds = 0
def busy():
    return engine.pool.checkedout() or (kind == "greenscope" and len(Scoped.registry))

while rounds < 500 and busy():
    gevent.sleep(0.01) if rounds else gevent.sleep(0)
    rounds += 1
    if kind == "stock" and rounds > 20:
        break  # stock never gives them back: nothing to wait for
report = {
    "hub_rounds": rounds,
    "timeouts": len(timeouts),
    "answered": sorted(results) == sorted(set(range(handlers)) - set(timeouts)),
    "checkedout": engine.pool.checkedout(),
    "len_registry": len(Scoped.registry.registry) if kind == "stock" else len(Scoped.registry),
    "greenlets_referenced": sum(1 for job in jobs if job.dead),
}
if kind == "greenscope":
    report["ended_without_remove"] = Scoped.registry.ended_without_remove
for session in list(getattr(Scoped.registry, "registry", {}).values()):
    session.close()  # the stock registry's leaked sessions: give their connections back
engine.dispose()
print(json.dumps(report))
"""


@pytest.mark.postgres
def test_400_handlers_without_remove_on_pool_of_5_never_time_out(pg_url: str) -> None:
    report = run_python(_POOL, args=[pg_url, "greenscope", "400", "3"])
    assert report["timeouts"] == 0
    assert report["answered"] is True
    assert report["checkedout"] == 0
    assert report["len_registry"] == 0
    assert report["greenlets_referenced"] == 400  # every Greenlet object still in `jobs`
    assert report["ended_without_remove"] == 400


@pytest.mark.postgres
def test_stock_getcurrent_scoped_session_without_remove_exhausts_pool_of_5(pg_url: str) -> None:
    """The failure the previous test rules out (Flask-SQLAlchemy 2.5's scopefunc)."""
    report = run_python(_POOL, args=[pg_url, "stock", "40", "1"])
    assert report["timeouts"] == 35  # 5 handlers keep the 5 connections; the other 35 wait in vain
    assert report["checkedout"] == 5
    assert report["len_registry"] == 40  # every dead greenlet still keyed, with its session


_SEQUENTIAL = """
import greenscope
from sqlalchemy.orm import scoped_session as stock_scoped_session, sessionmaker
Scoped = greenscope.scoped_session(sessionmaker())
Stock = stock_scoped_session(sessionmaker())  # threading.local, built before patching
from gevent import monkey
monkey.patch_all()
import json
import gevent

def inherited(scoped, n=10_000):
    count = 0

    def handler(token):
        nonlocal count
        session = scoped()
        owner = session.info.get("owner")
        if owner is not None and owner is not token:
            count += 1  # this session was first used by another greenlet
        session.info["owner"] = token

    for _ in range(n):
        gevent.spawn(handler, object()).join()  # no remove(): each greenlet just ends
    return count

report = {"greenscope": inherited(Scoped), "stock": inherited(Stock)}
gevent.sleep(0)
gevent.sleep(0)
report["len_after"] = len(Scoped.registry)
print(json.dumps(report))
"""


def test_10000_sequential_patched_greenlets_never_receive_another_greenlets_session() -> None:
    report = run_python(_SEQUENTIAL)
    assert report["greenscope"] == 0
    assert report["len_after"] == 0
    assert report["stock"] == 9_999  # built before patching: one session for all of them
