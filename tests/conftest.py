"""Shared fixtures: the PostgreSQL URL and engines, a subprocess runner, GC helpers.

PostgreSQL is real: ``postgresql://postgres@127.0.0.1:5432/test`` unless ``GREENSCOPE_PG_URL``
says otherwise. Without a server the PostgreSQL tests skip on a developer's machine and *fail*
when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_problem() -> Optional[str]:
    try:
        import psycopg2
    except ImportError as error:  # pragma: no cover - the test extra installs it
        return f"psycopg2 is not installed: {error}"
    try:
        psycopg2.connect(PG_URL, connect_timeout=5).close()
    except Exception as error:
        return f"PostgreSQL at {PG_URL} is unreachable: {error}"
    return None


_PG_PROBLEM: Optional[str] = None
_PG_CHECKED = False


def require_postgres() -> str:
    """Return the sync URL; skip (locally) or fail (CI) when PostgreSQL is unreachable."""
    global _PG_PROBLEM, _PG_CHECKED
    if not _PG_CHECKED:
        _PG_PROBLEM, _PG_CHECKED = _pg_problem(), True
    if _PG_PROBLEM:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {_PG_PROBLEM}", pytrace=False)
        pytest.skip(_PG_PROBLEM)
    return PG_URL


def sync_pg_url() -> str:
    """``postgresql+psycopg2://...`` for the configured server."""
    return "postgresql+psycopg2://" + PG_URL.split("://", 1)[1]


def async_pg_url() -> str:
    """``postgresql+asyncpg://...`` for the configured server."""
    return "postgresql+asyncpg://" + PG_URL.split("://", 1)[1]


@pytest.fixture
def pg_url() -> str:
    """The sync (psycopg2) SQLAlchemy URL of the test server."""
    require_postgres()
    return sync_pg_url()


@pytest.fixture
def pg_async_url() -> str:
    """The asyncpg SQLAlchemy URL of the test server."""
    require_postgres()
    return async_pg_url()


@pytest.fixture
def pg_table(pg_url: str) -> Iterator[str]:
    """A fresh table ``(id serial, owner text, n int)`` with a unique name, dropped afterwards."""
    import sqlalchemy

    name = f"gs_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {name} (id serial primary key, owner text, n int)")
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"drop table if exists {name}")
        engine.dispose()


def run_python(
    code: str,
    *,
    env: Optional[Dict[str, str]] = None,
    timeout: float = 240,
    args: Optional[List[str]] = None,
) -> Any:
    """Run ``code`` in a fresh interpreter (for anything that monkeypatches) and return what it
    printed on its last line, parsed as JSON. A non-zero exit fails the test with its output.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["GREENSCOPE_PG_URL"] = PG_URL
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"subprocess printed nothing\n--- stderr\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.fixture
def subprocess_json() -> Callable[..., Any]:
    """The :func:`run_python` runner, as a fixture."""
    return run_python


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (loopback only: load and fault tests never leave it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def collect() -> None:
    """Run the garbage collector until nothing more is freed (weakref callbacks included)."""
    for _ in range(3):
        if gc.collect() == 0:
            break


@pytest.fixture
def gc_collect() -> Callable[[], None]:
    """:func:`collect` as a fixture."""
    return collect


class CountingSession(Session):
    """A real Session that records how often it was closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1
        super().close()


def session_class_whose_first_close_hangs(in_close: Any, never: Any) -> type[Session]:
    """A Session class whose first ``close()`` (across all instances) sets ``in_close`` and then
    waits on ``never``: a ROLLBACK that hangs, for a kill or timeout to land in."""

    class BlocksOnce(Session):
        blocked = False

        def close(self) -> None:
            if not BlocksOnce.blocked:
                BlocksOnce.blocked = True
                in_close.set()
                never.wait()
            super().close()

    return BlocksOnce


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> bool:
    """Wait (bounded) until ``condition()`` is true, letting this thread's gevent hub run (its
    closer greenlets) if gevent is in use: a wait for asynchronous closes, not a timed assertion.
    """
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        if "gevent" in sys.modules:
            import gevent

            gevent.sleep(0.005)
        else:
            time.sleep(0.005)
    return True


# -- real servers started by the tests: gunicorn on an app of the test's own, PgBouncer --------


class GunicornApp:
    """A gunicorn master started by :func:`gunicorn_app`: its port, process and error log."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port, self.process, self.log_path = port, process, log_path

    def get(self, path: str, timeout: float = 15.0) -> Any:
        """GET ``path`` on a fresh connection; the JSON body."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:2000], self.log())
            return json.loads(body)
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def no_control_socket() -> List[str]:
    """``--no-control-socket`` on gunicorn 25.1+ (no control socket under ``$HOME``); older
    releases (the gunicorn floor, 23.0) lack the option and make no socket."""
    from gunicorn.config import KNOWN_SETTINGS

    known = any("--no-control-socket" in (getattr(s, "cli", None) or []) for s in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


@contextlib.contextmanager
def gunicorn_app(
    app_dir: Path,
    app: str,
    *,
    args: List[str],
    env: Optional[Dict[str, str]] = None,
    ready_path: str = "/",
    deadline: float = 30.0,
) -> Iterator[GunicornApp]:
    """Run ``gunicorn <args> -b 127.0.0.1:<free port> <app>`` with ``app_dir`` on its path; wait
    until ``ready_path`` answers 200; stop the master by its pid (SIGINT, then its process group).
    gunicorn's error log (stderr) goes to a file next to the app, kept for assertions.
    """
    import signal
    import time

    port = free_port()
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    full_env["GREENSCOPE_PG_URL"] = PG_URL
    full_env.update(env or {})
    log_path = app_dir / f"gunicorn-{port}.log"
    command = [sys.executable, "-m", "gunicorn", *no_control_socket(), *args]
    command += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]
    command += ["--pythonpath", str(app_dir), app]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(app_dir),
            start_new_session=True,  # its own process group: the workers go with it
        )
    server = GunicornApp(port, process, log_path)
    try:
        start = time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited {process.returncode}:\n{server.log()}")
            try:
                server.get(ready_path, timeout=2)
                break
            except (OSError, AssertionError):
                if time.monotonic() - start > deadline:
                    raise RuntimeError(
                        f"gunicorn not ready in {deadline} s:\n{server.log()}"
                    ) from None
                time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


class PgBouncer:
    """A PgBouncer started by the :func:`pgbouncer` fixture (transaction pooling)."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port, self.process, self.log_path = port, process, log_path

    def url(self, driver: str) -> str:
        """The SQLAlchemy URL of database ``test`` through PgBouncer, for ``driver``."""
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/test"

    def show(self, what: str) -> List[Dict[str, Any]]:
        """``SHOW <what>`` on PgBouncer's admin console, as a list of dicts."""
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="pgbouncer"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"SHOW {what}")
                names = [column[0] for column in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def pool(self) -> Dict[str, Any]:
        """The ``SHOW POOLS`` row of database ``test``."""
        rows = [row for row in self.show("POOLS") if row["database"] == "test"]
        return rows[0] if rows else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


PGBOUNCER_POOL_SIZE = 5
PGBOUNCER_QUERY_WAIT_TIMEOUT = 3


def pgbouncer_binary() -> str:
    """The ``pgbouncer`` executable; skip (locally) or fail (CI) when it is not installed.

    ``.ci/run`` and ``make pgbouncer`` install Debian's ``pgbouncer`` package.
    """
    import shutil

    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
    if found:
        return found
    problem = "pgbouncer is not installed (make pgbouncer, or apt-get install pgbouncer)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def pgbouncer(tmp_path: Path) -> Iterator[PgBouncer]:
    """PgBouncer on a free loopback port in front of the test server: ``pool_mode =
    transaction``, ``default_pool_size = 5``, ``query_wait_timeout = 3`` (a client waiting that
    long for a server connection gets an error: the stock runs fail in bounded time),
    ``auth_type = trust``. Run as the ``postgres`` user (``-u``) when the tests run as root
    (PgBouncer refuses root). Stopped by its pid.
    """
    import time
    from urllib.parse import urlsplit

    require_postgres()
    binary = pgbouncer_binary()
    upstream = urlsplit(PG_URL)
    port = free_port()
    home = tmp_path / "pgbouncer"
    home.mkdir()
    (home / "users.txt").write_text('"postgres" ""\n')
    (home / "pgbouncer.ini").write_text(
        textwrap.dedent(
            f"""\
            [databases]
            test = host={upstream.hostname or "127.0.0.1"} port={upstream.port or 5432} \
dbname={upstream.path.lstrip("/") or "test"} user={upstream.username or "postgres"}

            [pgbouncer]
            listen_addr = 127.0.0.1
            listen_port = {port}
            unix_socket_dir =
            auth_type = trust
            auth_file = {home / "users.txt"}
            admin_users = postgres
            pool_mode = transaction
            default_pool_size = {PGBOUNCER_POOL_SIZE}
            max_client_conn = 500
            query_wait_timeout = {PGBOUNCER_QUERY_WAIT_TIMEOUT}
            ignore_startup_parameters = extra_float_digits
            """
        )
    )
    for path in (tmp_path, home, *home.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    command = [binary, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    log_path = home / "pgbouncer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(port, process, log_path)
    try:
        for _ in range(100):  # up to 10 s
            if process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {process.returncode}:\n{bouncer.log()}")
            try:
                bouncer.show("VERSION")
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"pgbouncer not answering after 10 s:\n{bouncer.log()}")
        yield bouncer
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
