"""``make demo`` (examples/demo.py) on its embedded SQLite default, run as `make demo` runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Tuple

from conftest import ROOT


def _row(output: str, label: str) -> Tuple[str, str, str]:
    """The stock, greenscope and stock + remove() cells of the table row starting with ``label``."""
    for line in output.splitlines():
        if line.startswith(label):
            cells = re.split(r"\s{2,}", line[len(label) :].strip())
            assert len(cells) == 3, line
            return cells[0], cells[1], cells[2]
    raise AssertionError(f"no row {label!r} in:\n{output}")


def test_make_demo_shows_stock_crosstalk_and_none_with_greenscope_on_sqlite() -> None:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)  # the embedded SQLite default
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=str(ROOT),
    )
    output = proc.stdout
    assert proc.returncode == 0, f"{output}\n--- stderr\n{proc.stderr}"

    stock, green, correct = _row(output, "requests that saw another request's session")
    assert int(stock) > 0
    assert int(green) == int(correct) == 0  # the third column: stock done right
    requests = _row(output, "requests")
    sessions = _row(output, "distinct sessions")
    assert int(sessions[1]) == int(requests[1]) == 500
    assert int(sessions[0]) < int(requests[0])
    leaked = _row(output, "connections left checked out")
    assert int(leaked[0]) >= 1
    assert int(leaked[1]) == int(leaked[2]) == 0
    assert "stock + remove()" in output
    assert "FAIL" not in output

    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["ok"] is True
    green_summary = summary["greenscope"]
    assert green_summary["failed"] == 0
    assert green_summary["boom_status"] == [500]
    assert green_summary["keepalive_reused"] == green_summary["keepalive_connections"] == 20
    if (ROOT / "examples" / "failures.py").exists():
        assert summary["failures"]["ok"] is True

    # Had greenscope's column looked like stock's, the demo would have exited non-zero.
    demo = _demo_module()
    stock_result = demo.LoadResult(
        **{k: v for k, v in summary["stock"].items() if k in _fields(demo.LoadResult)}
    )
    assert demo.problems(stock_result) != []


def _fields(cls: Any) -> List[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def _demo_module() -> Any:
    import importlib.util

    name = "greenscope_examples_demo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "demo.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_demo_problems_counts_every_kind_of_failure() -> None:
    found: Dict[str, List[str]] = {}
    module = _demo_module()
    clean = module.LoadResult(
        mode="greenscope",
        requests=10,
        distinct_sessions=10,
        boom_status=[500],
        checkedout_after=0,
    )
    assert module.problems(clean) == []
    for change in (
        {"crosstalk": 1},
        {"distinct_sessions": 9},
        {"failed": 1},
        {"checkedout_after": 1},
        {"boom_status": [500, 200]},
    ):
        broken = module.LoadResult(**{**vars(clean), **change, "responses": []})
        found[str(change)] = module.problems(broken)
    assert all(found.values()), found
