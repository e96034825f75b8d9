"""The WSGI app of the end-to-end benchmark (``bench/e2e.py``), one per configuration.

The same request in both modes - one primary-key ``select`` on PostgreSQL plus a few proxied
calls (``Session.info``, ``Session.execute``, ``Session.is_active``) - so the only difference
measured is how the session is scoped and ended:

- ``BENCH_MODE=stock``: the stock configuration that is *correct* under gunicorn ``-k gevent``:
  ``sqlalchemy.orm.scoped_session`` created at import, which happens in the worker after gevent
  patched (no ``--preload``), so its registry is a gevent.local; ``Session.remove()`` at the end
  of every request (keep-alive requests share a greenlet, so remove() is what ends the session).
- ``BENCH_MODE=greenscope``: ``greenscope.scoped_session`` and
  :class:`greenscope.wsgi.ScopeMiddleware` (an explicit scope per request), no ``remove()``.
- ``BENCH_MODE=greenscope_remove``: ``greenscope.scoped_session`` with ``Session.remove()`` at the
  end of every request by hand, as in ``stock`` (what the middleware must not be slower than).

psycopg2 is made cooperative with psycogreen at import (the worker has patched by then).
Run by hand::

    BENCH_MODE=greenscope BENCH_TABLE=t DATABASE_URL=postgresql+psycopg2://postgres@127.0.0.1/test \
        .venv/bin/gunicorn -k gevent -w 1 --pythonpath bench e2e_app:app
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List

from psycogreen.gevent import patch_psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker

import greenscope
from greenscope.wsgi import ScopeMiddleware

patch_psycopg()

MODE = os.environ.get("BENCH_MODE", "greenscope")
TABLE = os.environ["BENCH_TABLE"]
ROWS = int(os.environ.get("BENCH_ROWS", "100"))
engine = create_engine(
    os.environ["DATABASE_URL"],
    pool_size=int(os.environ.get("POOL_SIZE", "10")),
    max_overflow=0,
    pool_timeout=float(os.environ.get("POOL_TIMEOUT", "30")),
)
factory = sessionmaker(engine)
Session: Any = scoped_session(factory) if MODE == "stock" else greenscope.scoped_session(factory)
QUERY = text(f"select n from {TABLE} where id = :id")


def _handle(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    query = environ.get("QUERY_STRING", "")
    row_id = int(query[3:]) if query.startswith("id=") else 1
    Session.info.setdefault("requests", 0)
    Session.info["requests"] += 1
    n = Session.execute(QUERY, {"id": row_id % ROWS + 1}).scalar()
    body = json.dumps({"n": n, "active": Session.is_active}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _stock_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    try:
        return _handle(environ, start_response)
    finally:
        Session.remove()


app: Callable[..., Iterable[bytes]] = (
    ScopeMiddleware(_handle) if MODE == "greenscope" else _stock_app  # stock, greenscope_remove
)
