"""Stock ``scoped_session`` failures on greenlets, next to greenscope, on embedded SQLite.

Reproduces three failures from the design brief (section 1) in one process and prints a table::

    python examples/failures.py          # the table; exit code 0 when greenscope fixes every case
    python examples/failures.py --json   # the same, plus one JSON object on the last line

(a) a stock ``scoped_session`` built *before* ``monkey.patch_all()`` keeps its ``threading.local``
    per OS thread: concurrent greenlets share one Session;
(b) ``scopefunc=greenlet.getcurrent`` (Flask-SQLAlchemy 2.5) and handlers that skip ``remove()``:
    every finished greenlet keeps its Session and its pooled connection, later requests time out;
(c) ``scopefunc=lambda: id(greenlet.getcurrent())`` (Flask-SQLAlchemy 3 keys on ``id()``): ids are
    reused, so new greenlets inherit dead greenlets' Sessions.

This script is its own process, so it may monkeypatch: it builds the "before patch" registries
first, then calls ``gevent.monkey.patch_all()``. :func:`run_scenarios` returns the figures as data
(``examples/demo.py`` and ``tests/test_failures_demo.py`` use it); :func:`main` prints them.
"""

from __future__ import annotations

# Built before gevent patches anything, exactly like gunicorn --preload or an early import.
import greenlet
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.orm import sessionmaker

import greenscope

_BEFORE_PATCH_STOCK = stock_scoped_session(sessionmaker())
_BEFORE_PATCH_GREENSCOPE = greenscope.scoped_session(sessionmaker())

from gevent import monkey  # noqa: E402

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

import gevent  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import TimeoutError as PoolTimeout  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from sqlalchemy.pool import QueuePool  # noqa: E402

CONCURRENT_GREENLETS = 50
POOL_SIZE = 10
REQUESTS = 40
SEQUENTIAL_GREENLETS = 10_000

Result = Dict[str, Any]


def shared_session_scenario() -> Result:
    """(a) How many Sessions do 50 concurrent greenlets get from registries built pre-patch?"""

    def count(scoped: Any) -> int:
        def handler() -> Session:
            session = scoped()
            gevent.sleep(0.001)  # overlap: every greenlet is alive at once
            assert scoped() is session
            return session  # type: ignore[no-any-return]

        jobs = [gevent.spawn(handler) for _ in range(CONCURRENT_GREENLETS)]
        gevent.joinall(jobs, raise_error=True)
        sessions = [job.value for job in jobs]
        return len({id(s) for s in sessions})  # every session is still referenced here

    return {
        "scenario": f"built before patch_all: sessions for {CONCURRENT_GREENLETS} greenlets",
        "stock": count(_BEFORE_PATCH_STOCK),
        "greenscope": count(_BEFORE_PATCH_GREENSCOPE),
        "expected": CONCURRENT_GREENLETS,
    }


def pool_exhaustion_scenario(db_path: str) -> Result:
    """(b) 40 requests on a pool of 10 whose handlers never call ``remove()``: how many time out?"""

    def timeouts(make_scoped: Callable[[sessionmaker[Session]], Any]) -> int:
        engine = create_engine(
            f"sqlite:///{db_path}",
            poolclass=QueuePool,
            pool_size=POOL_SIZE,
            max_overflow=0,
            pool_timeout=0.5,
        )
        scoped = make_scoped(sessionmaker(engine))
        failed: List[int] = []

        def handler(n: int) -> None:
            try:
                scoped.execute(text("select :n"), {"n": n})  # checks out a connection
                gevent.sleep(0.01)  # the request does some other work; no remove() at the end
            except PoolTimeout:
                failed.append(n)

        jobs = [gevent.spawn(handler, n) for n in range(REQUESTS)]
        gevent.joinall(jobs, raise_error=True)
        del jobs
        gevent.sleep(0)
        # the stock registry still holds every leaked session (and connection): drop them
        for session in list(getattr(scoped.registry, "registry", {}).values()):
            session.close()
        engine.dispose()
        return len(failed)

    return {
        "scenario": f"no remove(), pool of {POOL_SIZE}: requests of {REQUESTS} timed out",
        "stock": timeouts(lambda factory: stock_scoped_session(factory, greenlet.getcurrent)),
        "greenscope": timeouts(greenscope.scoped_session),
        "expected": 0,
    }


def id_reuse_scenario() -> Result:
    """(c) 10,000 sequential greenlets: how many received a Session another greenlet used?"""

    def inherited(scoped: Any) -> int:
        count = 0

        def handler(token: int) -> None:
            nonlocal count
            session = scoped()
            if "owner" in session.info:  # tagged by an earlier (dead) greenlet
                count += 1
            session.info["owner"] = token

        for token in range(SEQUENTIAL_GREENLETS):
            greenlet.greenlet(handler).switch(token)  # a raw greenlet: runs, dies, is freed
        return count

    return {
        "scenario": f"id()-keyed scope: of {SEQUENTIAL_GREENLETS} greenlets inherited a session",
        "stock": inherited(stock_scoped_session(sessionmaker(), lambda: id(greenlet.getcurrent()))),
        "greenscope": inherited(greenscope.scoped_session(sessionmaker())),
        "expected": 0,
    }


def run_scenarios() -> List[Result]:
    """Run the three scenarios; one dict per scenario: ``scenario``, ``stock``, ``greenscope``,
    ``expected`` (the right answer) and ``fixed`` (greenscope gave the right answer).

    Example (in a fresh process; importing this module calls ``monkey.patch_all()``)::

        >>> results = run_scenarios()  # doctest: +SKIP
        >>> [r["fixed"] for r in results]  # doctest: +SKIP
        [True, True, True]
    """
    with tempfile.TemporaryDirectory(prefix="greenscope-demo-") as tmp:
        results = [
            shared_session_scenario(),
            pool_exhaustion_scenario(os.path.join(tmp, "demo.db")),
            id_reuse_scenario(),
        ]
    for result in results:
        result["fixed"] = result["greenscope"] == result["expected"]
        result["stock_fails"] = result["stock"] != result["expected"]
    return results


def format_table(results: List[Result]) -> str:
    """The results as a plain-text table: scenario, stock, greenscope."""
    rows = [("scenario", "stock", "greenscope")]
    rows += [(r["scenario"], str(r["stock"]), str(r["greenscope"])) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}" for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    """Print the table (and the JSON with ``--json``); 0 if greenscope fixed every case."""
    args = sys.argv[1:] if argv is None else argv
    results = run_scenarios()
    print(format_table(results))
    ok = all(r["fixed"] for r in results)
    print("greenscope fixes every case" if ok else "greenscope did NOT fix every case")
    if "--json" in args:
        print(json.dumps({"ok": ok, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
