"""``examples/failures.py``: stock ``scoped_session`` fails each scenario, greenscope fixes it.

The script monkeypatches, so it runs in a subprocess, through its command-line interface
(``--json`` prints one JSON object on the last line) - the interface ``make demo`` relies on.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict

from conftest import ROOT, run_python

SCRIPT = ROOT / "examples" / "failures.py"


def _results() -> Dict[str, Any]:
    code = f"""
    import runpy, sys
    sys.argv = [{str(SCRIPT)!r}, "--json"]
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """
    # run_path ends with sys.exit(main()): exit code 0 is required by run_python
    return run_python(code)  # type: ignore[no-any-return]


def test_failures_demo_shows_every_stock_failure_and_greenscope_fixing_it() -> None:
    report = _results()
    assert report["ok"] is True
    shared, pool, reuse = report["results"]

    # (a) built before monkey.patch_all(): stock hands one session to 50 greenlets
    assert shared["stock"] == 1
    assert shared["greenscope"] == shared["expected"] == 50

    # (b) getcurrent-keyed and no remove(), pool of 10: 30 of 40 requests time out
    assert pool["stock"] == 30
    assert pool["greenscope"] == 0

    # (c) id()-keyed: most of 10,000 sequential greenlets inherit a dead greenlet's session
    assert reuse["stock"] > 5_000
    assert reuse["greenscope"] == 0

    assert all(r["fixed"] and r["stock_fails"] for r in report["results"])


def test_failures_demo_prints_the_table_and_exits_zero() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header == ["scenario", "stock", "greenscope"]
    assert "greenscope fixes every case" in proc.stdout
