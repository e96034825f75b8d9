"""Per-request cost of the two WSGI configurations of ``bench/e2e_app.py``, in process.

    .venv/bin/python bench/request.py [--quick] [--smoke]

The end-to-end figure (``bench/e2e.py``) is dominated by the network, PostgreSQL and the load
generator sharing the machine; this isolates what the scoping adds per request. Both apps are
loaded in one gevent-patched process on the same SQLite file, and each round drives a batch of
requests through each app (``app(environ, start_response)``, iterate, ``close()``), several
requests per greenlet as on a keep-alive connection. Prints one JSON object: ``requests`` in
requests/s with per-round ratios to ``stock`` (gevent.local + ``remove()``).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, List  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._harness import compare_runs  # noqa: E402

QUICK = "--quick" in sys.argv
SMOKE = "--smoke" in sys.argv
ROUNDS, COUNT = (2, 200) if SMOKE else ((7, 3000) if QUICK else (15, 6000))
PER_GREENLET = 10  # requests per greenlet, as on a keep-alive connection


def load_app(mode: str, url: str, table: str) -> Any:
    os.environ.update(BENCH_MODE=mode, BENCH_TABLE=table, DATABASE_URL=url, POOL_SIZE="5")
    spec = importlib.util.spec_from_file_location(f"e2e_app_{mode}", ROOT / "bench" / "e2e_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import sqlalchemy

    directory = tempfile.mkdtemp(prefix="greenscope-bench-")
    url = "sqlite:///" + os.path.join(directory, "bench.db")
    table = "hits"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {table} (id integer primary key, owner text, n int)")
        for i in range(1, 101):
            conn.exec_driver_sql(f"insert into {table} (id, owner, n) values ({i}, 'b', {i})")
    engine.dispose()
    apps = {mode: load_app(mode, url, table) for mode in ("stock", "greenscope")}

    def start_response(status: str, headers: List[Any], exc_info: Any = None) -> Callable[..., Any]:
        return lambda data: None

    def driver(app: Callable[..., Any]) -> Callable[[], float]:
        def serve(first: int) -> None:
            for n in range(first, first + PER_GREENLET):
                environ = {"QUERY_STRING": f"id={n}", "REQUEST_METHOD": "GET", "PATH_INFO": "/"}
                body = app(environ, start_response)
                try:
                    for _chunk in body:
                        pass
                finally:
                    close = getattr(body, "close", None)
                    if close is not None:
                        close()

        def run() -> float:
            start = time.perf_counter()
            glets = [gevent.spawn(serve, i) for i in range(0, COUNT, PER_GREENLET)]
            gevent.joinall(glets)
            gevent.sleep(0)
            return COUNT / (time.perf_counter() - start)

        return run

    candidates = {mode: driver(module.app) for mode, module in apps.items()}
    for run in candidates.values():
        run()
    result = compare_runs(candidates, "stock", rounds=ROUNDS, between=gc.collect)
    result["unit"] = "requests/s"
    result["greenscope_closed_without_remove"] = apps[
        "greenscope"
    ].Session.registry.ended_without_remove
    for module in apps.values():
        module.engine.dispose()
    print(json.dumps({"requests": result}))


if __name__ == "__main__":
    main()
