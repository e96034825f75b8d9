"""uWSGI ``--master --processes 2 --gevent 100`` with the app loaded in the master (the default,
not ``--lazy-apps``): every worker opens its own connections (``greenscope.fork``), none runs on
the connection the master opened at import, and 200 requests (20 at a time) all succeed.

uWSGI forks its workers in C: CPython's at-fork handlers run only with
``--py-call-uwsgi-fork-hooks``, or when the app calls ``greenscope.fork.ensure_child_state``
from ``uwsgidecorators.postfork``. Without either, the workers share the master's connection:
the counterpart run shows it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from conftest import PG_URL, ROOT, free_port, require_postgres

pytestmark = pytest.mark.postgres

UWSGI = Path(sys.executable).parent / "uwsgi"


def require_uwsgi() -> str:
    if not UWSGI.exists():
        problem = f"uwsgi is not installed at {UWSGI} (pip install 'greenscope[uwsgi]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {problem}", pytrace=False)
        pytest.skip(problem)
    return str(UWSGI)


def _get(port: int, timeout: float = 15) -> Tuple[int, Dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@contextlib.contextmanager
def uwsgi_server(how: str) -> Iterator[Tuple[int, str]]:
    require_postgres()
    binary = require_uwsgi()
    port, appname = free_port(), f"gs-uwsgi-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        GREENSCOPE_PG_URL=PG_URL,
        GS_APPLICATION_NAME=appname,
        GS_UWSGI_POSTFORK="1" if how == "postfork" else "0",
    )
    cmd = [binary, "--master", "--processes", "2", "--gevent", "100"]
    cmd += ["--http-socket", f"127.0.0.1:{port}", "--module", "apps.uwsgi_app:application"]
    cmd += ["--virtualenv", sys.prefix, "--die-on-term", "--disable-logging"]
    if how == "fork-hooks":
        cmd.append("--py-call-uwsgi-fork-hooks")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _get(port, timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"uwsgi did not start:\n{log.read()}", pytrace=False)
                    time.sleep(0.2)
            yield port, appname
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def _load(port: int, requests: int = 200, concurrency: int = 20, timeout: float = 15) -> List[Any]:
    def one(_: int) -> Any:
        try:
            status, body = _get(port, timeout)
            if status != 200 or "backend" not in body:
                # a worker whose session failed to close on a shared connection answers
                # 200 with an empty body (uWSGI has sent the status line): a failure too
                return {"error": status, "body": body}
            return body
        except Exception as error:
            return {"error": repr(error)}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(requests)))


def _idle_in_transaction(appname: str) -> int:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select count(*) from pg_stat_activity"
                " where application_name = %s and state = 'idle in transaction'",
                (appname,),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["fork-hooks", "postfork"])
def test_uwsgi_gevent_workers_never_run_on_the_masters_connection(how: str) -> None:
    with uwsgi_server(how) as (port, appname):
        results = _load(port)
        idle = _idle_in_transaction(appname)
    failed = [r for r in results if "error" in r]
    assert failed == []
    assert len({r["marker"] for r in results}) == 200  # a session per request
    assert not any(r["inherited"] for r in results)
    assert all(r["backend"] != r["master_backend"] for r in results)
    assert len({r["worker_pid"] for r in results}) == 2
    by_worker: Dict[int, set[int]] = {}
    for r in results:
        by_worker.setdefault(r["worker_pid"], set()).add(r["backend"])
    first, second = by_worker.values()
    assert not first & second  # the two workers never share a connection
    assert idle == 0


def test_uwsgi_without_fork_hooks_runs_workers_on_the_masters_connection() -> None:
    with uwsgi_server("none") as (port, _):
        results = _load(port, requests=40, concurrency=4, timeout=3)
    ok = [r for r in results if "error" not in r]
    on_master = [r for r in ok if r["backend"] == r["master_backend"]]
    print(
        f"uwsgi without fork hooks: {len(on_master)} of {len(results)} requests on the "
        f"master's connection, {len(results) - len(ok)} failed"
    )
    assert on_master or len(ok) < len(results), results  # shared (or broken) connections
