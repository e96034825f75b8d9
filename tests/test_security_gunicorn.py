"""No cross-request data, through real gunicorn with keep-alive connections shared by users.

A reverse proxy keeps a few upstream HTTP/1.1 connections open and sends any user's request down
any of them; gunicorn's gevent worker serves every request of one connection in one greenlet. So
this drives ``tests/apps/secure_app.py`` under ``gunicorn -k gevent -c python:greenscope.gunicorn``
(PostgreSQL through psycopg2) over keep-alive connections, each alternating users A, B, A, B ...,
with handlers that store user state in the session and forget ``remove()``, and handlers that
raise after modifying objects. Every request reports what its session held before it touched
it: ``Session.info``, the identity map, pending and dirty objects, and other requests'
uncommitted rows. With greenscope every report is empty; the same app on stock
``scoped_session`` (the only difference) shows the leak, so the test can fail.

Each server is a subprocess on a free loopback port, killed (its process group) in a ``finally``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import sqlalchemy as sa
from conftest import ROOT, free_port, no_control_socket

pytestmark = pytest.mark.postgres

HOST = "127.0.0.1"
CONNECTIONS = 4  # keep-alive connections, like a proxy's upstream pool
REQUESTS_PER_CONNECTION = 24
USERS_PER_CONNECTION = 2  # alternating on each connection: A, B, A, B, ...
EMPTY = {"info": {}, "identity": [], "new": [], "dirty": [], "in_transaction": False}


class _Server:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log_path: str) -> None:
        self.port = port
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def get(self, path: str) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=15)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@contextmanager
def _gunicorn(
    mode: str, database_url: str, table: str, preload: bool, middleware: bool = True
) -> Iterator[_Server]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(GREENSCOPE_SECURE_MODE=mode, DATABASE_URL=database_url, SECURE_TABLE=table)
    env["GREENSCOPE_SECURE_MIDDLEWARE"] = "1" if middleware else "0"
    command = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-c", "python:greenscope.gunicorn"]
    command += ["-w", "1", "-b", f"{HOST}:{port}", "--graceful-timeout", "5", "--keep-alive", "30"]
    command += no_control_socket()
    command += ["--preload"] if preload else []
    command += ["--pythonpath", str(ROOT / "tests"), "apps.secure_app:app"]
    log_fd, log_path = tempfile.mkstemp(prefix="greenscope-secure-", suffix=".log")
    process = subprocess.Popen(
        command,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,  # its own process group: the worker dies with it
    )
    os.close(log_fd)
    server = _Server(port, process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited {process.returncode}:\n{server.log()}")
            try:
                if server.get("/stats")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer in 30 s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        os.unlink(log_path)


def _seed(pg_url: str, table: str) -> List[str]:
    """Two committed rows per user; returns the users."""
    users = [f"user-{c}-{u}" for c in range(CONNECTIONS) for u in "AB"[:USERS_PER_CONNECTION]]
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(f"insert into {table} (owner, n) values (:owner, 0)"),
                [{"owner": user} for user in users for _ in range(2)],
            )
    finally:
        engine.dispose()
    return users


def _drive_keepalive_connection(port: int, index: int, boom: bool) -> List[Dict[str, Any]]:
    """One keep-alive connection: users A and B alternate; with ``boom`` every third raises."""
    conn = http.client.HTTPConnection(HOST, port, timeout=15)
    seen: List[Dict[str, Any]] = []
    try:
        for i in range(REQUESTS_PER_CONNECTION):
            user = f"user-{index}-{'AB'[i % USERS_PER_CONNECTION]}"
            path = "/boom" if boom and i % 3 == 2 else "/remember"
            conn.request("GET", f"{path}?user={user}")
            response = conn.getresponse()
            body = response.read()
            entry: Dict[str, Any] = {"user": user, "path": path, "status": response.status}
            if response.status == 200:
                entry.update(json.loads(body))
            seen.append(entry)
            if response.will_close:  # gunicorn closes after an error; a proxy reconnects
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=15)
    finally:
        conn.close()
    return seen


def _run(server: _Server, boom: bool) -> List[Dict[str, Any]]:
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        per_connection = list(
            pool.map(
                lambda i: _drive_keepalive_connection(server.port, i, boom), range(CONNECTIONS)
            )
        )
    return [entry for entries in per_connection for entry in entries]


def _final_stats(server: _Server) -> Dict[str, Any]:
    stats: Dict[str, Any] = {}
    for _ in range(50):
        stats = json.loads(server.get("/stats")[1])
        if stats["checkedout"] == 0 and stats["registry_len"] in (0, None):
            break
        time.sleep(0.1)
    return stats


def _leaks(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Requests that saw anything at all in their session before touching it."""
    return [
        e
        for e in entries
        if e["status"] == 200 and (e["seen"] != {**EMPTY, "uncommitted_rows": []})
    ]


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_no_request_sees_another_users_session_state_over_shared_keepalive_connections(
    pg_url: str, pg_table: str, preload: bool
) -> None:
    users = _seed(pg_url, pg_table)
    with _gunicorn("greenscope", pg_url, pg_table, preload) as server:
        entries = _run(server, boom=True)
        stats = _final_stats(server)
        log = server.log()

    ok = [e for e in entries if e["path"] == "/remember"]
    boom = [e for e in entries if e["path"] == "/boom"]
    assert len(entries) == CONNECTIONS * REQUESTS_PER_CONNECTION
    assert all(e["status"] == 200 for e in ok), [e for e in ok if e["status"] != 200]
    assert all(e["status"] == 500 for e in boom)
    assert "boom in user-" in log  # the handler really raised mid-request
    # Each request saw its own user's rows only, and nothing left by any other request.
    assert all(e["loaded"] == 2 for e in ok)
    assert _leaks(entries) == []
    print(
        f"\ngreenscope ({'preload' if preload else 'no preload'}): {len(entries)} requests "
        f"({len(boom)} raising) over {CONNECTIONS} keep-alive connections, 0 saw another's state"
    )
    assert stats == {"mode": "greenscope", "checkedout": 0, "registry_len": 0}

    # No uncommitted change of any request was ever committed.
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f"select owner, n from {pg_table} order by owner").all()
    finally:
        engine.dispose()
    assert sorted(rows) == sorted((user, 0) for user in users for _ in range(2))


@pytest.mark.parametrize(
    ("mode", "middleware"),
    [("stock", True), ("greenscope", False)],
    ids=["stock-scoped_session", "greenscope-without-ScopeMiddleware"],
)
def test_controls_leak_state_between_users_on_the_same_keepalive_connection(
    pg_url: str, pg_table: str, mode: str, middleware: bool
) -> None:
    # The controls prove the test above can fail: the same app on stock scoped_session (the only
    # difference), and greenscope without ScopeMiddleware (greenlet scope is not request scope:
    # every request of a keep-alive connection runs in one greenlet). Without the raising
    # handler: gunicorn closes a connection after a 500, and a stock session left behind by a
    # finished greenlet keeps its connection and row locks until the garbage collector frees
    # it, which would stall later requests for the same user's rows.
    _seed(pg_url, pg_table)
    with _gunicorn(mode, pg_url, pg_table, preload=False, middleware=middleware) as server:
        entries = _run(server, boom=False)

    leaks = _leaks(entries)
    assert leaks, f"{mode} showed no cross-request data: the check is blind"
    foreign_info = [e for e in leaks if e["seen"]["info"].get("user") not in (None, e["user"])]
    foreign_objects = [e for e in leaks if set(e["seen"]["identity"]) - {e["user"]}]
    foreign_uncommitted = [e for e in leaks if set(e["seen"]["new"]) - {e["user"]}]
    print(
        f"\n{mode} (middleware={middleware}): {len(leaks)} of {len(entries)} requests inherited "
        f"state; {len(foreign_info)} another user's Session.info, {len(foreign_objects)} their "
        f"objects, {len(foreign_uncommitted)} their uncommitted changes"
    )
    assert foreign_info, leaks[:3]  # another user's Session.info
    assert foreign_objects, leaks[:3]  # another user's objects in the identity map
    assert foreign_uncommitted, leaks[:3]  # another user's pending changes
