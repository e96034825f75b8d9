"""Faults on real PostgreSQL: greenlets killed or timed out mid-transaction, asyncio tasks
cancelled mid-query, backends terminated by the server, and every misuse of the API.

What the tests pin (DESIGN section 4, "a query interrupted by ``gevent.Timeout`` or ``kill()``
leaves its connection unusable"):

- the interrupted greenlet's or task's writes are never committed, by anyone;
- its connection is invalidated (interrupted inside a query: SQLAlchemy treats the
  ``GreenletExit``/``Timeout``/``CancelledError`` raised inside the driver as an exit exception and
  invalidates it; psycopg2's wait-callback panic has already closed the socket) or rolled back
  (interrupted between queries: greenscope closes the session of the finished greenlet), and
  never handed to another greenlet or task in a broken state - every later checkout is an open
  connection outside any transaction;
- every other greenlet or task finishes normally and nothing stays checked out.

Everything that monkeypatches runs in a subprocess (``run_python``); what each greenlet saw comes
back as JSON and is asserted here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Iterator

import pytest
import sqlalchemy as sa
from conftest import run_python
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope.asyncio import async_scoped_session

pytestmark = pytest.mark.postgres

# -- gevent: kill() and gevent.Timeout mid-transaction ------------------------------------------

GEVENT_FAULTS = r"""
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, os, sys, time
import gevent
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker
import greenscope

url = "postgresql+psycopg2://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
table = sys.argv[1]
engine = sa.create_engine(url, pool_size=5, max_overflow=0, pool_timeout=60)
Session = greenscope.scoped_session(sessionmaker(engine))
INSERT = sa.text(f"insert into {table} (owner, n) values (:owner, 1)")

invalidated = []
checkouts = []  # (closed, transaction status) of every connection handed out by the pool
event.listen(engine, "invalidate", lambda dbapi_conn, rec, exc: invalidated.append(repr(exc)))
event.listen(
    engine,
    "checkout",
    lambda dbapi_conn, rec, proxy: checkouts.append(
        (dbapi_conn.closed, dbapi_conn.get_transaction_status())
    ),
)

ready = {}
victim_pids = []


def write(owner):
    Session.execute(INSERT, {"owner": owner})
    victim_pids.append(Session.execute(sa.text("select pg_backend_pid()")).scalar())
    ready[owner] = True


def killed_in_query(owner):
    write(owner)
    Session.execute(sa.text("select pg_sleep(5)"))
    Session.commit()


def killed_between_queries(owner):
    write(owner)
    gevent.sleep(5)  # holding the connection, inside the transaction
    Session.commit()


def timed_out_in_query(owner):
    write(owner)
    with gevent.Timeout(0.2):
        Session.execute(sa.text("select pg_sleep(5)"))
    Session.commit()


def timed_out_and_swallowed(owner):
    # a handler that catches the Timeout, then "forgets" the session (no rollback, no remove)
    write(owner)
    try:
        with gevent.Timeout(0.2):
            Session.execute(sa.text("select pg_sleep(5)"))
    except gevent.Timeout:
        return "swallowed"
    Session.commit()


class AppTimeout(Exception):
    pass  # an application's own timeout error: an Exception, not an exit exception


def timed_out_with_an_exception_subclass(owner):
    # SQLAlchemy does not invalidate on an Exception raised inside the driver, but psycopg2's
    # wait-callback panic closed the socket: the rollback at session close finds it dead and
    # invalidates it then (greenscope logs that close error; it never reaches another greenlet).
    write(owner)
    with gevent.Timeout(0.2, AppTimeout("too slow")):
        Session.execute(sa.text("select pg_sleep(5)"))
    Session.commit()


def normal(owner):
    # runs alongside the victims on the same pool and must not notice them
    start_txid = Session.execute(sa.text("select txid_current_if_assigned()")).scalar()
    Session.execute(INSERT, {"owner": owner})
    gevent.sleep(0.05)
    Session.commit()
    return start_txid


victims = {}
for i in range(2):
    victims[f"kill-query-{i}"] = gevent.spawn(killed_in_query, f"kill-query-{i}")
    victims[f"kill-idle-{i}"] = gevent.spawn(killed_between_queries, f"kill-idle-{i}")
others = [gevent.spawn(normal, f"normal-a-{i}") for i in range(10)]
deadline = time.monotonic() + 30
while len(ready) < 4:
    assert time.monotonic() < deadline, "the victims never started"
    gevent.sleep(0.01)
gevent.sleep(0.2)  # the two "query" victims are inside pg_sleep now
for glet in victims.values():
    glet.kill(block=False)
for i in range(2):
    victims[f"timeout-{i}"] = gevent.spawn(timed_out_in_query, f"timeout-{i}")
victims["swallowed-0"] = gevent.spawn(timed_out_and_swallowed, "swallowed-0")
victims["apptimeout-0"] = gevent.spawn(timed_out_with_an_exception_subclass, "apptimeout-0")
others += [gevent.spawn(normal, f"normal-b-{i}") for i in range(10)]
gevent.joinall(list(victims.values()) + others, timeout=60)

# The same kills inside an explicit scope (a request under ScopeMiddleware): the scope's exit
# closes the session in the dying greenlet itself.
scoped_in_query = greenscope.scope()(killed_in_query)
scoped_between = greenscope.scope()(killed_between_queries)
victims["scope-kill-query-0"] = gevent.spawn(scoped_in_query, "scope-kill-query-0")
victims["scope-kill-idle-0"] = gevent.spawn(scoped_between, "scope-kill-idle-0")
deadline = time.monotonic() + 30
while not ("scope-kill-query-0" in ready and "scope-kill-idle-0" in ready):
    assert time.monotonic() < deadline, "the scoped victims never started"
    gevent.sleep(0.01)
gevent.sleep(0.2)
victims["scope-kill-query-0"].kill(block=False)
victims["scope-kill-idle-0"].kill(block=False)
gevent.joinall(list(victims.values()), timeout=60)
gevent.sleep(0.1)

# Later greenlets on the same small pool: every checkout must be healthy and transaction-free.
followers = [gevent.spawn(normal, f"follower-{i}") for i in range(40)]
gevent.joinall(followers, timeout=60)
for _ in range(100):  # let the closer greenlet finish
    if engine.pool.checkedout() == 0 and len(Session.registry) == 0:
        break
    gevent.sleep(0.02)

result = {
    "victims": {
        name: {"dead": glet.dead, "outcome": type(glet.exception or glet.value).__name__}
        for name, glet in victims.items()
    },
    "others": [[glet.successful(), glet.value] for glet in others + followers],
    "invalidated": invalidated,
    "checkouts": checkouts,
    "checkedout": engine.pool.checkedout(),
    "registry_len": len(Session.registry),
    "victim_pids": victim_pids,
}
engine.dispose()
print(json.dumps(result))
"""


def _rows_by_owner(pg_url: str, table: str) -> Dict[str, int]:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f"select owner, count(*) from {table} group by owner")
            return {owner: count for owner, count in rows}
    finally:
        engine.dispose()


def _wait_backends_gone(pg_url: str, pids: Any) -> None:
    """Wait (bounded) until the victims' server backends ended: a still-running ``pg_sleep`` of
    an interrupted query keeps its backend, and its open transaction, until it finishes."""
    import time

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                alive = conn.execute(
                    sa.text("select count(*) from pg_stat_activity where pid = any(:pids)"),
                    {"pids": list(pids)},
                ).scalar()
            if not alive:
                return
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_greenlets_killed_or_timed_out_mid_transaction_commit_nothing_and_poison_no_one(
    pg_url: str, pg_table: str
) -> None:
    result = run_python(GEVENT_FAULTS, args=[pg_table])

    victims = result["victims"]
    for name, seen in victims.items():
        assert seen["dead"], name
    killed = ("kill-query-0", "kill-query-1", "kill-idle-0", "kill-idle-1")
    for name in (*killed, "scope-kill-query-0", "scope-kill-idle-0"):
        assert victims[name]["outcome"] == "GreenletExit", victims[name]  # kill()'s value
    assert victims["timeout-0"]["outcome"] == "Timeout"
    assert victims["timeout-1"]["outcome"] == "Timeout"
    assert victims["swallowed-0"]["outcome"] == "str"  # returned "swallowed"
    assert victims["apptimeout-0"]["outcome"] == "AppTimeout"

    # Interrupted inside a query (3 kills, 4 timeouts): each connection was invalidated - at the
    # interruption for exit exceptions, at the rollback of the session close for AppTimeout.
    invalidated = result["invalidated"]
    assert len(invalidated) == 7, invalidated
    assert invalidated.count("GreenletExit()") == 3, invalidated
    assert sum("connection already closed" in e for e in invalidated) == 1, invalidated
    # Every other greenlet finished normally, and started outside any transaction.
    assert all(ok for ok, _ in result["others"]), result["others"]
    assert [txid for _, txid in result["others"]] == [None] * 60
    # Every connection ever handed out was open and idle (psycopg2 TRANSACTION_STATUS_IDLE == 0).
    assert result["checkouts"], "no checkout recorded"
    assert all(closed == 0 and status == 0 for closed, status in result["checkouts"]), result[
        "checkouts"
    ]
    assert result["checkedout"] == 0
    assert result["registry_len"] == 0

    # Nothing the victims wrote was ever committed, even after their server backends ended.
    _wait_backends_gone(pg_url, result["victim_pids"])
    rows = _rows_by_owner(pg_url, pg_table)
    victim_kinds = ("kill", "timeout", "swallowed", "apptimeout", "scope")
    assert not [owner for owner in rows if owner.split("-")[0] in victim_kinds], rows
    expected = {f"normal-{w}-{i}" for w in "ab" for i in range(10)}
    expected |= {f"follower-{i}" for i in range(40)}
    assert rows == dict.fromkeys(expected, 1)


# -- asyncio: task.cancel() and asyncio.wait_for timeouts mid-query (asyncpg) ---------------------

ASYNCIO_FAULTS = r"""
import asyncio, json, os, sys
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
import greenscope
from greenscope.asyncio import async_scoped_session

url = "postgresql+asyncpg://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
table = sys.argv[1]


async def main():
    engine = create_async_engine(url, pool_size=4, max_overflow=0, pool_timeout=60)
    invalidated, checkouts = [], []
    event.listen(engine.sync_engine, "invalidate", lambda c, r, e: invalidated.append(repr(e)))
    event.listen(
        engine.sync_engine,
        "checkout",
        lambda c, r, p: checkouts.append(
            [c.driver_connection.is_closed(), c.driver_connection.is_in_transaction()]
        ),
    )
    Session = async_scoped_session(async_sessionmaker(engine))
    insert = sa.text(f"insert into {table} (owner, n) values (:owner, 1)")
    ready = set()
    pids = []

    async def write(owner):
        await Session.execute(insert, {"owner": owner})
        pids.append((await Session.execute(sa.text("select pg_backend_pid()"))).scalar())
        ready.add(owner)

    async def in_query(owner):
        await write(owner)
        await Session.execute(sa.text("select pg_sleep(5)"))
        await Session.commit()

    async def between_queries(owner):
        await write(owner)
        await asyncio.sleep(5)
        await Session.commit()

    async def normal(owner):
        start = (await Session.execute(sa.text("select txid_current_if_assigned()"))).scalar()
        await Session.execute(insert, {"owner": owner})
        await asyncio.sleep(0.05)
        await Session.commit()
        return start

    victims = {
        "cancel-query-0": asyncio.ensure_future(in_query("cancel-query-0")),
        "cancel-query-1": asyncio.ensure_future(in_query("cancel-query-1")),
        "cancel-idle-0": asyncio.ensure_future(between_queries("cancel-idle-0")),
        # inside an explicit scope, closed by `async with` in the cancelled task itself
        "scope-cancel-query-0": asyncio.ensure_future(
            greenscope.scope()(in_query)("scope-cancel-query-0")
        ),
    }
    others = [asyncio.ensure_future(normal(f"normal-a-{i}")) for i in range(10)]
    for _ in range(3000):
        if len(ready) == 4:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    for task in victims.values():
        task.cancel()
    timeouts = []
    for i in range(2):
        try:
            # a task of its own: from 3.12 on, wait_for runs a bare coroutine in *this* task,
            # whose one session the first timeout would leave needing a rollback
            await asyncio.wait_for(asyncio.ensure_future(in_query(f"waitfor-{i}")), 0.3)
        except asyncio.TimeoutError as error:
            timeouts.append(type(error).__name__)
    others += [asyncio.ensure_future(normal(f"normal-b-{i}")) for i in range(10)]
    outcomes = await asyncio.gather(*victims.values(), return_exceptions=True)
    values = await asyncio.gather(*others, return_exceptions=True)
    followers = await asyncio.gather(
        *(normal(f"follower-{i}") for i in range(30)), return_exceptions=True
    )
    for _ in range(100):
        if engine.pool.checkedout() == 0 and len(Session.registry) == 0:
            break
        await asyncio.sleep(0.02)
    result = {
        "victims": [type(o).__name__ for o in outcomes],
        "timeouts": timeouts,
        "others": [repr(v) if isinstance(v, BaseException) else v for v in values + followers],
        "invalidated": invalidated,
        "checkouts": checkouts,
        "checkedout": engine.pool.checkedout(),
        "registry_len": len(Session.registry),
        "victim_pids": pids,
    }
    await engine.dispose()
    return result


print(json.dumps(asyncio.run(main())))
"""


def test_asyncio_tasks_cancelled_or_timed_out_mid_query_commit_nothing_and_poison_no_one(
    pg_url: str, pg_table: str
) -> None:
    result = run_python(ASYNCIO_FAULTS, args=[pg_table])

    assert result["victims"] == ["CancelledError"] * 4
    assert result["timeouts"] == ["TimeoutError"] * 2
    # Cancelled inside a query (3 cancels, 2 wait_for timeouts): each connection invalidated.
    assert len(result["invalidated"]) == 5, result["invalidated"]
    assert result["others"] == [None] * 50
    assert result["checkouts"]
    assert all(c == [False, False] for c in result["checkouts"]), result["checkouts"]
    assert result["checkedout"] == 0
    assert result["registry_len"] == 0

    _wait_backends_gone(pg_url, result["victim_pids"])
    rows = _rows_by_owner(pg_url, pg_table)
    assert not [o for o in rows if o.startswith(("cancel", "waitfor", "scope"))], rows
    expected = {f"normal-{w}-{i}" for w in "ab" for i in range(10)}
    expected |= {f"follower-{i}" for i in range(30)}
    assert rows == dict.fromkeys(expected, 1)


# -- the server kills a backend: pg_terminate_backend mid-request -------------------------------

TERMINATED = r"""
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()

import json, os, sys
import gevent
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
import greenscope

url = "postgresql+psycopg2://" + os.environ["GREENSCOPE_PG_URL"].split("://", 1)[1]
table = sys.argv[1]
engine = sa.create_engine(url, pool_size=3, max_overflow=0, pool_timeout=30, pool_pre_ping=True)
admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
Session = greenscope.scoped_session(sessionmaker(engine))
INSERT = sa.text(f"insert into {table} (owner, n) values (:owner, 1)")
pids = {}


def request(owner, sleep=0.0):
    # one "request": write, maybe wait on the server, commit; never remove()
    try:
        Session.execute(INSERT, {"owner": owner})
        pids[owner] = Session.execute(sa.text("select pg_backend_pid()")).scalar()
        if sleep:
            Session.execute(sa.text("select pg_sleep(:s)"), {"s": sleep})
        Session.commit()
        return {"ok": True}
    except sa.exc.DBAPIError as error:
        return {
            "ok": False,
            "type": type(error).__name__,
            "invalidated": error.connection_invalidated,
            "message": str(error.orig),
        }


def terminate(pid):
    with admin.connect() as conn:
        return conn.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()


# 1. terminated while inside a query
victim = gevent.spawn(request, "victim", 5)
while "victim" not in pids:
    gevent.sleep(0.01)
gevent.sleep(0.2)
terminated_mid_request = terminate(pids["victim"])
victim_result = victim.get(timeout=30)

# 2. the next requests succeed
after = [gevent.spawn(request, f"after-{i}") for i in range(20)]
gevent.joinall(after, timeout=30)

# 3. every idle pooled connection terminated between requests: pre-ping replaces them
gevent.sleep(0.1)
with admin.connect() as conn:
    idle = conn.execute(
        sa.text("select pid from pg_stat_activity where pid = any(:p) and pid <> pg_backend_pid()"),
        {"p": list(pids.values())},
    ).scalars().all()
terminated_idle = [terminate(pid) for pid in idle]
later = [gevent.spawn(request, f"later-{i}") for i in range(20)]
gevent.joinall(later, timeout=30)
for _ in range(100):
    if engine.pool.checkedout() == 0 and len(Session.registry) == 0:
        break
    gevent.sleep(0.02)
print(json.dumps({
    "terminated_mid_request": terminated_mid_request,
    "victim": victim_result,
    "after": [g.value for g in after],
    "terminated_idle": terminated_idle,
    "later": [g.value for g in later],
    "checkedout": engine.pool.checkedout(),
    "registry_len": len(Session.registry),
}))
engine.dispose()
"""


def test_backend_terminated_mid_request_fails_that_request_clearly_and_later_ones_succeed(
    pg_url: str, pg_table: str
) -> None:
    result = run_python(TERMINATED, args=[pg_table])

    assert result["terminated_mid_request"] is True
    victim = result["victim"]
    assert victim["ok"] is False
    assert victim["type"] == "OperationalError"
    assert victim["invalidated"] is True
    assert "terminat" in victim["message"] or "closed the connection" in victim["message"]
    assert result["after"] == [{"ok": True}] * 20
    assert result["terminated_idle"] and all(result["terminated_idle"])
    assert result["later"] == [{"ok": True}] * 20
    assert result["checkedout"] == 0
    assert result["registry_len"] == 0
    rows = _rows_by_owner(pg_url, pg_table)
    assert "victim" not in rows
    assert rows == dict.fromkeys(
        [f"after-{i}" for i in range(20)] + [f"later-{i}" for i in range(20)], 1
    )


# -- bad input: clear errors, nothing left behind -------------------------------------------------


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url, pool_size=2, max_overflow=0, pool_timeout=5)
    try:
        yield engine
    finally:
        engine.dispose()


def _unhashable_scope_key(engine: sa.Engine) -> Any:
    Session = greenscope.scoped_session(sessionmaker(engine), scopefunc=lambda: {"a": "dict"})
    with pytest.raises(TypeError, match="unhashable scope key"):
        Session.execute(sa.text("select 1"))
    return Session


def _kwargs_when_a_session_exists(engine: sa.Engine) -> Any:
    Session = greenscope.scoped_session(sessionmaker(engine))
    with greenscope.scope():
        Session.execute(sa.text("select 1"))  # a session holding a connection
        with pytest.raises(sa.exc.InvalidRequestError, match="already present"):
            Session(autoflush=False)
        assert len(Session.registry) == 1  # the misuse created nothing
    return Session


def _async_factory_on_sync_class(engine: sa.Engine) -> Any:
    async_engine = create_async_engine("postgresql+asyncpg://unused@127.0.0.1/unused")
    try:
        with pytest.raises(TypeError, match=r"greenscope\.asyncio\.async_scoped_session"):
            greenscope.scoped_session(async_sessionmaker(async_engine))  # type: ignore[type-var]
        wrong: Any = sessionmaker(async_engine, class_=AsyncSession)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match=r"greenscope\.asyncio\.async_scoped_session"):
            greenscope.scoped_session(wrong)
    finally:
        asyncio.run(async_engine.dispose())
    return None


def _sync_factory_on_async_class(engine: sa.Engine) -> Any:
    with pytest.raises(TypeError, match=r"greenscope\.scoped_session"):
        async_scoped_session(sessionmaker(engine))  # type: ignore[type-var]
    return None


def _async_registry_outside_a_loop(engine: sa.Engine) -> Any:
    async_engine = create_async_engine("postgresql+asyncpg://unused@127.0.0.1/unused")
    Session: async_scoped_session[AsyncSession] = async_scoped_session(
        async_sessionmaker(async_engine)
    )
    try:
        with pytest.raises(RuntimeError, match="outside a running asyncio task"):
            Session()
        with pytest.raises(RuntimeError, match="outside a running asyncio task"):
            Session.info  # noqa: B018 - the proxy looks the session up
    finally:
        asyncio.run(async_engine.dispose())
    return Session


def _reentering_an_open_scope(engine: sa.Engine) -> Any:
    Session = greenscope.scoped_session(sessionmaker(engine))
    explicit = greenscope.scope()
    with explicit:
        Session.execute(sa.text("select 1"))
        with pytest.raises(RuntimeError, match="already open"):
            explicit.__enter__()
        Session.execute(sa.text("select 1"))  # the open scope still works
    return Session


def _leaving_a_scope_that_is_not_open(engine: sa.Engine) -> Any:
    Session = greenscope.scoped_session(sessionmaker(engine))
    explicit = greenscope.scope()
    with pytest.raises(RuntimeError, match="not open"):
        explicit.__exit__(None, None, None)
    with explicit:
        Session.execute(sa.text("select 1"))
    with pytest.raises(RuntimeError, match="not open"):
        explicit.__exit__(None, None, None)  # twice
    return Session


@pytest.mark.parametrize(
    "misuse",
    [
        _unhashable_scope_key,
        _kwargs_when_a_session_exists,
        _async_factory_on_sync_class,
        _sync_factory_on_async_class,
        _async_registry_outside_a_loop,
        _reentering_an_open_scope,
        _leaving_a_scope_that_is_not_open,
    ],
    ids=lambda fn: fn.__name__.strip("_"),
)
def test_misuse_raises_a_clear_error_and_leaves_no_session_or_connection(
    misuse: Callable[[sa.Engine], Any], pg_engine: sa.Engine
) -> None:
    scoped = misuse(pg_engine)
    if scoped is not None:
        assert len(scoped.registry) == 0
    assert pg_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
