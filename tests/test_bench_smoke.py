"""The benchmark harness runs end to end (``bench/run.py --quick --smoke``): tiny counts.

Benchmarks are never timed assertions: this only proves that ``make bench`` would run and that
it writes the JSON keys and the chart the docs are built from. The figures themselves are in
docs/performance.md, produced by a full ``make bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PG_URL, ROOT, require_postgres


def test_bench_harness_smoke_run_writes_every_figure_and_the_chart(tmp_path: Path) -> None:
    require_postgres()  # the end-to-end part runs gunicorn against PostgreSQL
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--smoke", "--out-dir", str(tmp_path)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "GREENSCOPE_PG_URL": PG_URL},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "bench-results.json").read_text())
    assert results["mode"] == "smoke"
    assert {"command", "machine", "targets", "memory", "flat", "parts"} <= set(results)
    parts = results["parts"]
    for figure in (
        "main.registry",
        "main.session",
        "main.proxied",
        "greenlet.registry",
        "scope.registry",
        "task.registry",
        "task.session",
    ):
        assert "greenscope" in parts["micro"][figure]["candidates"], figure
    assert "stock_threadlocal" in parts["micro_patched"]["main.registry"]["candidates"]
    assert "greenscope" in parts["churn_greenlet"]["greenlet_churn"]["candidates"]
    assert "greenscope" in parts["churn_task"]["task_churn"]["candidates"]
    for part in ("e2e", "asgi_e2e"):
        for scenario in ("normal", "pressure"):
            candidates = parts[part][f"{scenario}.rps"]["candidates"]
            assert {"stock", "greenscope", "greenscope_remove"} <= set(candidates), scenario
            assert f"{scenario}.max_ms" in parts[part]
    assert "greenscope" in parts["request"]["requests"]["candidates"]
    assert all("ratio" in row for row in results["targets"]), results["targets"]
    assert (tmp_path / "bench-chart.png").stat().st_size > 0
    # the smoke run never rewrites the committed results
    assert "--smoke" in results["command"]
