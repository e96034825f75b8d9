"""Shared fixtures: the PostgreSQL URL and engines, a subprocess runner, GC helpers.

PostgreSQL is real: ``postgresql://postgres@127.0.0.1:5432/test`` unless ``GREENSCOPE_PG_URL``
says otherwise. Without a server the PostgreSQL tests skip on a developer's machine and *fail*
when ``CI`` is set.
"""

from __future__ import annotations

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
