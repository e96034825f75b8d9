"""``examples/job_worker.py``: run as a user would, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest
from conftest import PG_URL, ROOT

pytestmark = pytest.mark.timeout(120)

EXAMPLE = ROOT / "examples" / "job_worker.py"


def run_example(args: List[str], database_url: Optional[str] = None) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # the documented one-line JSON summary
    return json.loads(lines[0])  # type: ignore[no-any-return]


HEALTHY = {
    "registry": "greenscope",
    "jobs": 100,
    "failed_jobs": 10,
    "done": 90,
    "failed_updates_committed": 0,
    "distinct_sessions": 100,
    "jobs_that_inherited_a_session": 0,
    "sessions_open_at_end": 0,
    "registered_at_end": 0,
    "checked_out_at_end": 0,
}


def test_job_worker_on_sqlite_gets_a_fresh_session_per_job_and_leaks_nothing() -> None:
    assert run_example([]) == {"database": "sqlite", **HEALTHY}


def test_job_worker_on_postgresql_gets_a_fresh_session_per_job_and_leaks_nothing(
    pg_url: str,
) -> None:
    assert run_example([], database_url=PG_URL) == {"database": "postgresql", **HEALTHY}


def test_job_worker_with_stock_scoped_session_shares_one_session_and_commits_failed_work(
    pg_url: str,
) -> None:
    """The contrast the example exists for: proves the assertions above can fail."""
    summary = run_example(["--stock"], database_url=PG_URL)
    assert summary["distinct_sessions"] == 1
    assert summary["jobs_that_inherited_a_session"] == 99
    assert summary["failed_updates_committed"] == 9  # each committed by the next job
    assert summary["checked_out_at_end"] == 1  # the last failed job's transaction
