"""``examples/asyncio_app.py`` runs as a program and its one-line JSON summary holds.

It runs in a subprocess with ``-W error`` (an unclosed connection or a never-awaited close would
fail it), on aiosqlite and on PostgreSQL through asyncpg (``DATABASE_URL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest
from conftest import ROOT, async_pg_url, require_postgres

EXAMPLE = ROOT / "examples" / "asyncio_app.py"


def run_example(extra_env: Dict[str, str]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), REQUESTS="60", CONCURRENCY="10", POOL_SIZE="5")
    env.pop("DATABASE_URL", None)
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_asyncio_example_closes_every_tasks_session_without_remove(database: str) -> None:
    env: Dict[str, str] = {}
    if database == "postgresql":
        require_postgres()
        env["DATABASE_URL"] = async_pg_url()
    summary = run_example(env)
    assert summary["database"] == database
    assert summary["driver"] == ("asyncpg" if database == "postgresql" else "aiosqlite")
    assert {k: v for k, v in summary.items() if k not in ("database", "driver")} == {
        "requests": 60,
        "rows": 60,
        "sessions": 120,  # each request's and its child's
        "sessions_distinct": True,
        "child_shared_parent": False,
        "registry": 0,
        "checked_out": 0,
        "ended_without_remove": 120,
        "timeouts": 0,
    }
