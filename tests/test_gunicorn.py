"""greenscope.gunicorn under real gunicorn: ``-k gevent --preload -c python:greenscope.gunicorn``.

Every server is ``examples/app.py`` started as a subprocess on a free loopback port and killed in
a ``finally`` (``examples/demo.py``'s :func:`gunicorn_server`); the load is bounded in count and
each HTTP call has a timeout. What a request saw comes back in its JSON body and is asserted here.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Dict, List, Set

import pytest
from conftest import ROOT, free_port


def _load_demo() -> ModuleType:
    """``examples/demo.py`` (the server runner and load driver), under a name of its own."""
    name = "greenscope_examples_demo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "demo.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


demo = _load_demo()
HOST, drive_load, gunicorn_server = demo.HOST, demo.drive_load, demo.gunicorn_server

WAIT_CALLBACK = "psycogreen.gevent.gevent_wait_callback"


def _poll(fetch: Callable[[], Dict[str, Any]], done: Callable[[Dict[str, Any]], bool]) -> Any:
    """Fetch until ``done`` (at most 50 times, 0.1 s apart); return the last answer."""
    answer = fetch()
    for _ in range(50):
        if done(answer):
            break
        time.sleep(0.1)
        answer = fetch()
    return answer


def _pg_env(table: str) -> Dict[str, str]:
    return {"GREENSCOPE_DEMO_TABLE": table, "POOL_SIZE": "5"}


@pytest.mark.postgres
def test_every_request_gets_a_fresh_session_under_gunicorn_gevent_preload_on_postgres(
    pg_url: str, pg_table: str
) -> None:
    with gunicorn_server(
        "greenscope", port=free_port(), database_url=pg_url, extra_env=_pg_env(pg_table)
    ) as server:
        stats_before = server.stats()
        result = drive_load(
            server,
            "greenscope",
            requests=200,
            concurrency=50,
            keepalive_connections=20,
            keepalive_requests=5,
            boom_requests=20,
        )
        stats_after = _poll(server.stats, lambda s: s["checkedout"] == 0)

    # The worker: gevent patched, psycopg2 cooperative, the pre-fork pool rebuilt after patching.
    assert stats_before["database"] == "postgresql"
    assert stats_before["gevent_patched"] is True
    assert stats_before["psycopg2_wait_callback"] == WAIT_CALLBACK
    assert stats_before["pool_lock"].startswith("gevent."), stats_before
    assert stats_before["pool_size"] == 5

    responses = result.responses
    assert len(responses) == 200 + 20 * 5
    assert result.failed == 0, result.errors[:5]
    assert all(r["request_id"] == r["sent_id"] for r in responses)
    tokens = [r["token"] for r in responses]
    assert len(set(tokens)) == len(tokens), "a session token was seen by two requests"
    assert [r for r in responses if r["others"]] == []
    # Requests really overlapped: several pool connections were in use at once.
    assert max(r["checkedout"] for r in responses) > 1
    assert max(r["checkedout"] for r in responses) <= 5
    # No request ran on the connection the master opened at import (``create_all``): the pool
    # inherited at fork was replaced, with the master's connection left to the master.
    assert stats_before["import_backend_pid"] is not None
    assert stats_before["import_backend_pid"] not in {r["backend_pid"] for r in responses}

    # Keep-alive: each connection stayed one connection, served by one greenlet, and still
    # every request had its own session.
    assert result.keepalive_connections == 20
    assert result.keepalive_reused == 20
    assert result.keepalive_one_greenlet == 20

    # Handlers that raise after using their session leave nothing checked out.
    assert result.boom_status == [500] * 20
    assert stats_after["served"]["boom"] == 20
    assert result.checkedout_after == 0
    assert stats_after["checkedout"] == 0
    assert stats_after["registry_len"] == 0
    # Closed by the request scopes themselves, not later when a greenlet ended.
    assert stats_after["ended_without_remove"] == 0


@pytest.mark.postgres
def test_two_preloaded_workers_never_share_a_connection_with_each_other_or_the_master(
    pg_url: str, pg_table: str
) -> None:
    # Without greenscope.gunicorn both workers inherit the master's pooled connection: measured,
    # 37-39 of these 200 requests failed or hung (see the module docstring). Not asserted here:
    # which requests break is up to the scheduler.
    with gunicorn_server(
        "greenscope",
        port=free_port(),
        database_url=pg_url,
        workers=2,
        extra_env=_pg_env(pg_table),
    ) as server:
        stats = server.stats()
        result = drive_load(
            server,
            "greenscope",
            requests=200,
            concurrency=40,
            keepalive_connections=0,
            boom_requests=0,
        )
    assert result.failed == 0, result.errors[:5]
    assert result.distinct_sessions == result.requests == 200
    backends: Dict[int, Set[Any]] = {}
    for response in result.responses:
        backends.setdefault(response["pid"], set()).add(response["backend_pid"])
    assert stats["import_backend_pid"] not in set().union(*backends.values())
    if len(backends) == 2:  # both workers served requests (almost always): no shared backend
        first, second = backends.values()
        assert first.isdisjoint(second)


@pytest.mark.postgres
def test_stock_scoped_session_under_the_same_server_shares_sessions_between_requests(
    pg_url: str, pg_table: str
) -> None:
    with gunicorn_server(
        "stock", port=free_port(), database_url=pg_url, extra_env=_pg_env(pg_table)
    ) as server:
        stats = server.stats()
        result = drive_load(
            server,
            "stock",
            requests=100,
            concurrency=20,
            keepalive_connections=5,
            keepalive_requests=5,
            boom_requests=5,
        )

    # Same hooks ran (so the difference is the session registry): its threading.local was
    # made in the master before gevent patched, so it is one Session for every greenlet.
    assert stats["psycopg2_wait_callback"] == WAIT_CALLBACK
    assert stats["registry_local"] == "_thread._local"
    assert result.requests == 125
    assert result.distinct_sessions < result.requests
    assert result.crosstalk > 0
    # Nobody closes the shared session: its connection stays checked out after the load.
    assert result.checkedout_after >= 1


@pytest.mark.postgres
def test_streaming_response_keeps_its_session_until_the_server_closes_it(
    pg_url: str, pg_table: str
) -> None:
    with gunicorn_server(
        "greenscope", port=free_port(), database_url=pg_url, extra_env=_pg_env(pg_table)
    ) as server:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            conn.request("GET", "/stream?chunks=3&sleep=0.3")
            response = conn.getresponse()
            assert response.status == 200
            chunks = [json.loads(response.readline())]
            during = server.stats()  # another connection, while the body is being produced
            chunks += [json.loads(line) for line in response.read().splitlines()]
        finally:
            conn.close()
        after = _poll(server.stats, lambda s: s["checkedout"] == 0 and s["registry_len"] == 0)

    assert [c["chunk"] for c in chunks] == [0, 1, 2]
    assert len({c["token"] for c in chunks}) == 1, "the stream changed sessions between chunks"
    assert all(c["others"] == 0 for c in chunks)
    assert all(c["checkedout"] == 1 for c in chunks)
    assert during["registry_len"] == 1
    assert during["checkedout"] == 1
    assert after["checkedout"] == 0
    assert after["registry_len"] == 0
    assert after["ended_without_remove"] == 0


@pytest.mark.postgres
def test_gevent_worker_without_greenscope_config_blocks_but_gets_its_own_connections(
    pg_url: str, pg_table: str
) -> None:
    # The counterpart of the first test: plain `-k gevent --preload`, no greenscope.gunicorn.
    # greenscope.fork renews the registry's engine at the fork itself (so the worker never
    # talks on the master's socket), but before gevent patches: the locks and driver block.
    with gunicorn_server(
        "greenscope",
        port=free_port(),
        database_url=pg_url,
        config=None,
        extra_env=_pg_env(pg_table),
    ) as server:
        stats = server.stats()
        first = server.get_json("/query")[1]
    assert stats["gevent_patched"] is True
    assert stats["psycopg2_wait_callback"] is None  # every query blocks the whole worker
    assert stats["pool_lock"] == "_thread.RLock"  # the pool made at the fork, before patching
    # Not the connection the master opened before the fork (before greenscope.fork the worker's
    # first request ran on it: a socket two processes held).
    assert first["backend_pid"] != stats["import_backend_pid"]


def _serves_others_during_a_slow_query(server: Any) -> Dict[str, Any]:
    """Run ``select pg_sleep(1.5)`` in one request; poll /stats until that query holds a
    connection or the request is answered. Returns the last stats and whether it was answered.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(server.get_json, "/query?pg_sleep=1.5")
        stats = _poll(server.stats, lambda s: s["checkedout"] == 1 or slow.done())
        answered_first = slow.done()
        assert slow.result()[0] == 200
    return {"stats": stats, "slow_answered_first": answered_first}


@pytest.mark.postgres
def test_worker_serves_other_requests_while_psycopg2_waits_for_a_slow_query(
    pg_url: str, pg_table: str
) -> None:
    with gunicorn_server(
        "greenscope", port=free_port(), database_url=pg_url, extra_env=_pg_env(pg_table)
    ) as server:
        seen = _serves_others_during_a_slow_query(server)
    assert seen["stats"]["checkedout"] == 1
    assert seen["slow_answered_first"] is False


@pytest.mark.postgres
def test_without_greenscope_config_a_slow_query_blocks_the_whole_gevent_worker(
    pg_url: str, pg_table: str
) -> None:
    with gunicorn_server(
        "greenscope",
        port=free_port(),
        database_url=pg_url,
        config=None,
        extra_env=_pg_env(pg_table),
    ) as server:
        seen = _serves_others_during_a_slow_query(server)
    # /stats could only be answered once the slow request had finished.
    assert seen["slow_answered_first"] is True
    assert seen["stats"]["checkedout"] == 0


def test_user_conf_importing_greenscope_gunicorn_gets_its_worker_class_and_hooks() -> None:
    # examples/gunicorn.conf.py: `from greenscope.gunicorn import *`, 2 workers, its own
    # post_worker_init chaining greenscope's. No -k on the command line: the conf picks gevent.
    with gunicorn_server(
        "greenscope",
        port=free_port(),
        config=str(ROOT / "examples" / "gunicorn.conf.py"),
        worker_class=None,
        workers=None,
        extra_env={"WEB_CONCURRENCY": "2"},
    ) as server:
        result = drive_load(
            server,
            "greenscope",
            requests=100,
            concurrency=20,
            keepalive_connections=5,
            keepalive_requests=5,
            boom_requests=5,
        )
        stats = _poll(server.stats, lambda s: s["checkedout"] == 0)
        ready = _poll(
            lambda: {"n": server.log().count("your own start-up code goes here")},
            lambda seen: seen["n"] >= 2,
        )
    pids = {r["pid"] for r in result.responses}
    assert 1 <= len(pids) <= 2
    assert stats["gevent_patched"] is True
    assert stats["pool_lock"].startswith("gevent.")
    assert stats["psycopg2_wait_callback"] == WAIT_CALLBACK  # installed: patched, on SQLite too
    assert result.failed == 0, result.errors[:5]
    assert result.distinct_sessions == result.requests == 125
    assert result.crosstalk == 0
    assert stats["checkedout"] == 0
    assert ready["n"] == 2  # both workers ran the conf's own post_worker_init
    assert server.final_log.count("greenscope runtime (pid") == 2  # and greenscope's worker_exit


def test_post_fork_finds_registries_already_emptied_by_the_at_fork_handler(
    subprocess_json: Callable[..., Any],
) -> None:
    # In the child of a fork the core's os.register_at_fork handler has emptied every registry
    # before gunicorn's post_fork runs; the hook verifies it (and would empty them otherwise).
    out = subprocess_json(
        """
        import json, os, logging
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker
        import greenscope, greenscope.gunicorn as conf

        records = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append(record)

        logging.getLogger("greenscope").addHandler(Collect(logging.WARNING))
        engine = create_engine("sqlite://")
        Session = greenscope.scoped_session(sessionmaker(engine))
        parent_session = Session()
        conf.pre_fork(None, None)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            from greenscope import _closing

            before = len(Session.registry)
            conf.post_fork(None, None)
            child_session = Session()
            child_new = child_session is not parent_session
            # An entry the at-fork handler would have missed: the hook drops it, warns, and
            # never closes it (it is parked with the fork orphans).
            warnings = len(records)
            conf.post_fork(None, None)
            ensured = [len(Session.registry), len(records) - warnings,
                       any(o is child_session for o in _closing.fork_orphans),
                       Session() is not child_session]
            os.write(write, json.dumps([before, warnings, child_new, ensured]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        before, warnings, child_new, ensured = json.loads(os.read(read, 1000))
        print(json.dumps({"before": before, "warnings": warnings, "child_new": child_new,
                          "ensured": ensured, "parent_kept": Session() is parent_session}))
        """
    )
    assert out == {
        "before": 0,
        "warnings": 0,
        "child_new": True,
        "ensured": [0, 1, True, True],
        "parent_kept": True,
    }


def test_post_worker_init_disposes_only_engines_that_existed_at_fork(
    subprocess_json: Callable[..., Any],
) -> None:
    out = subprocess_json(
        """
        import json, os, tempfile
        from sqlalchemy import create_engine, text
        import greenscope.gunicorn as conf

        path = os.path.join(tempfile.mkdtemp(), "x.db")
        before = create_engine("sqlite:///" + path)
        with before.connect() as conn:
            conn.execute(text("select 1"))
        option_view = before.execution_options(isolation_level="SERIALIZABLE")
        conf.pre_fork(None, None)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            conf.post_fork(None, None)
            after = create_engine("sqlite:///" + path)
            pools = (id(before.pool), id(after.pool))
            conf.post_worker_init(None)
            again = conf.dispose_engines_inherited_at_fork()
            result = [id(before.pool) != pools[0], id(after.pool) == pools[1],
                      option_view.pool is before.pool, again]
            os.write(write, json.dumps(result).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 1000).decode())
        """
    )
    rebuilt, untouched, view_follows, second_call = out
    assert rebuilt is True
    assert untouched is True
    assert view_follows is True
    assert second_call == 0


def test_greenscope_gunicorn_exports_settings_and_hooks_gunicorn_accepts() -> None:
    from gunicorn.config import Config

    import greenscope.gunicorn as conf

    config = Config()
    exported: List[str] = list(conf.__all__)
    for name in exported:
        assert name in config.settings, name
        config.set(name, getattr(conf, name))  # validates arity of the hooks
    assert config.worker_class_str == "gevent"


def test_without_the_middleware_keepalive_requests_share_their_greenlets_session() -> None:
    # greenscope.scoped_session alone scopes by greenlet, and gunicorn serves every request of a
    # keep-alive connection in one greenlet: this is what ScopeMiddleware is for. The session is
    # still closed when the connection (its greenlet) ends, without remove().
    with gunicorn_server("greenlet", port=free_port()) as server:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        try:
            responses = [demo._query(conn, 0) for _ in range(5)]
        finally:
            conn.close()
        stats = _poll(server.stats, lambda s: s["registry_len"] == 0 and s["checkedout"] == 0)
    assert len({r["client_port"] for r in responses}) == 1
    assert len({r["greenlet"] for r in responses}) == 1
    assert len({r["token"] for r in responses}) == 1
    assert [r["others"] for r in responses] == [0, 1, 2, 3, 4]
    assert stats["registry_len"] == 0
    assert stats["checkedout"] == 0
    assert stats["ended_without_remove"] == 1
    # greenscope.gunicorn's worker_exit reported it through gunicorn's log.
    assert "1 sessions closed because their scope ended without remove()" in server.final_log
