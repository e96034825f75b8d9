"""A small WSGI app with SQLAlchemy sessions, served by gunicorn's gevent worker.

Run it (from the repository root)::

    gunicorn -c python:greenscope.gunicorn --preload --pythonpath examples app:app
    curl http://127.0.0.1:8000/query

It is plain WSGI on purpose: nothing between the server and the session code but
:class:`greenscope.wsgi.ScopeMiddleware`, so what the demo measures is session scoping, not a
framework, and the streaming endpoint is a bare generator whose ``close()`` the server calls. With
Flask the wiring is one line, ``app.wsgi_app = ScopeMiddleware(app.wsgi_app)``.

Everything is created at import, so under ``--preload`` the engine, its pool (and a first
connection: ``create_all``) and the session registry exist in the master before gunicorn forks
and before gevent patches: the situation :mod:`greenscope.gunicorn` exists for.

Environment:

- ``DATABASE_URL``: default, an SQLite file in a temporary directory made at import (a file, so
  SQLAlchemy picks a ``QueuePool`` and ``check_same_thread=False``); e.g.
  ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``.
- ``GREENSCOPE_DEMO_MODE``: ``greenscope`` (default): ``greenscope.scoped_session`` and
  ``ScopeMiddleware``; ``stock``: ``sqlalchemy.orm.scoped_session`` built at import and no
  middleware, handlers that never call ``remove()`` - under ``--preload`` its ``threading.local``
  is created before gevent patches, so it is one Session for every greenlet of a worker;
  ``greenlet``: ``greenscope.scoped_session`` without the middleware, to show that a greenlet
  scope is not a request scope (keep-alive requests share their connection's greenlet);
  ``stock_remove``: stock done right - ``sqlalchemy.orm.scoped_session`` whose thread-local is
  made in the worker after gevent patched (a gevent.local, one per greenlet) and
  ``Session.remove()`` at the end of every request.
- ``POOL_SIZE`` (default 5; ``max_overflow`` is 0), ``POOL_TIMEOUT`` (seconds, default 30).
- ``GREENSCOPE_DEMO_TABLE``: the table (``id``, ``owner``, ``n``), created if missing.

Endpoints (all answer JSON):

- ``/query?sleep=S&pg_sleep=P``: writes a row and reads a count in the request's session, runs
  ``select pg_sleep(P)`` if asked (PostgreSQL), sleeps ``S`` seconds (cooperatively) holding
  it, and reports the session's ``token`` (a uuid stored in ``session.info`` on first use),
  ``others`` (ids of other requests that used the same session, from ``session.info``),
  ``checkedout`` pool connections, ``pid``, ``greenlet``, ``remote_port`` and the PostgreSQL
  ``backend_pid`` of its connection. Send ``X-Request-Id`` to choose the request id. A database
  error answers 500 with the same fields plus ``error``.
- ``/boom``: uses the session, then raises.
- ``/stream?chunks=N&sleep=S``: a generator response; each chunk uses the session and reports it.
- ``/stats``: worker, pool and registry statistics (without touching a session).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List
from urllib.parse import parse_qs

import greenlet
from sqlalchemy import Integer, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.util import ThreadLocalRegistry

import greenscope
from greenscope.wsgi import ScopeMiddleware

MODE = os.environ.get("GREENSCOPE_DEMO_MODE", "greenscope")
if MODE not in ("stock", "stock_remove", "greenscope", "greenlet"):
    raise SystemExit(
        f"GREENSCOPE_DEMO_MODE must be stock, stock_remove, greenscope or greenlet, not {MODE!r}"
    )


def _default_url() -> str:
    directory = tempfile.mkdtemp(prefix="greenscope-demo-")
    creator = os.getpid()

    def cleanup() -> None:  # workers inherit atexit handlers: only the creator removes it
        if os.getpid() == creator:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(cleanup)
    return "sqlite:///" + os.path.join(directory, "demo.db")


DATABASE_URL = os.environ.get("DATABASE_URL") or _default_url()
POOL_SIZE = int(os.environ.get("POOL_SIZE", "5"))
TABLE = os.environ.get("GREENSCOPE_DEMO_TABLE", "greenscope_demo_hits")

engine = create_engine(
    DATABASE_URL,
    pool_size=POOL_SIZE,
    max_overflow=0,
    pool_timeout=float(os.environ.get("POOL_TIMEOUT", "30")),
)

if engine.dialect.name == "sqlite":

    @event.listens_for(engine, "connect")
    def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
        # WAL: readers never wait for the writer. sqlite3 is not cooperative, so a connection
        # that waited for a lock would block the whole worker.
        dbapi_connection.execute("pragma journal_mode=wal")


class Base(DeclarativeBase):
    pass


class Hit(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))  # the request id
    n: Mapped[int] = mapped_column(Integer)  # the worker pid


Base.metadata.create_all(engine)  # connects before the fork under --preload, on purpose


def _backend_pid(connection: Any) -> Any:
    """PostgreSQL's server process id for a connection (None on SQLite): who talks to whom."""
    info = getattr(connection.connection.dbapi_connection, "info", None)
    return getattr(info, "backend_pid", None)


with engine.connect() as _connection:  # the pooled connection the master keeps
    IMPORT_BACKEND_PID = _backend_pid(_connection)

factory = sessionmaker(engine, expire_on_commit=False)
#: stock: a ``threading.local`` made at import (before patching under --preload)
Session: Any = (
    stock_scoped_session(factory)
    if MODE in ("stock", "stock_remove")
    else greenscope.scoped_session(factory)
)

_served = {"query": 0, "boom": 0, "stream": 0}

StartResponse = Callable[..., Any]


def _json(start_response: StartResponse, status: str, body: Dict[str, Any]) -> List[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _session_state(request_id: str) -> Dict[str, Any]:
    """The current session's token and the other requests it served (from ``session.info``)."""
    info = Session().info
    token = info.setdefault("token", uuid.uuid4().hex)
    seen: List[str] = info.setdefault("requests", [])
    if request_id not in seen:
        seen.append(request_id)
    others = [r for r in seen if r != request_id]
    return {"token": token, "others": len(others), "other_ids": others[:3]}


def query(environ: Dict[str, Any], start_response: StartResponse) -> List[bytes]:
    params = parse_qs(environ.get("QUERY_STRING", ""))
    request_id = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
    pause = float(params.get("sleep", ["0"])[0])
    pg_sleep = float(params.get("pg_sleep", ["0"])[0])
    _served["query"] += 1
    body: Dict[str, Any] = {
        "request_id": request_id,
        "pid": os.getpid(),
        "greenlet": f"{id(greenlet.getcurrent()):#x}",
        "remote_port": environ.get("REMOTE_PORT"),
    }
    body.update(_session_state(request_id))
    status = "200 OK"
    try:
        Session.add(Hit(owner=request_id, n=os.getpid()))
        Session.commit()
        body["rows"] = Session.scalar(select(func.count()).select_from(Hit))
        if pg_sleep:  # a slow query: does the worker serve others meanwhile?
            Session.execute(select(func.pg_sleep(pg_sleep)))
        if pause:
            time.sleep(pause)  # gevent's sleep in the worker: other requests run meanwhile
        body["checkedout"] = engine.pool.checkedout()  # type: ignore[attr-defined]
        body["backend_pid"] = _backend_pid(Session.connection())
    except Exception as error:  # a shared stock session fails in many ways; report them
        status = "500 Internal Server Error"
        body["error"] = f"{type(error).__name__}: {error}"[:300]
    body.update(_session_state(request_id))  # requests that joined the session meanwhile
    return _json(start_response, status, body)


def boom(environ: Dict[str, Any], start_response: StartResponse) -> List[bytes]:
    _served["boom"] += 1
    Session.scalar(select(func.count()).select_from(Hit))  # checks a connection out
    raise RuntimeError("boom: a handler that fails after using its session")


def stream(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    params = parse_qs(environ.get("QUERY_STRING", ""))
    chunks = int(params.get("chunks", ["3"])[0])
    pause = float(params.get("sleep", ["0"])[0])
    request_id = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
    _served["stream"] += 1
    start_response("200 OK", [("Content-Type", "application/x-ndjson")])

    def body() -> Iterator[bytes]:
        for chunk in range(chunks):
            rows = Session.scalar(select(func.count()).select_from(Hit))
            state = _session_state(request_id)
            state.update(chunk=chunk, rows=rows, checkedout=engine.pool.checkedout())  # type: ignore[attr-defined]
            yield json.dumps(state).encode() + b"\n"
            if pause:
                time.sleep(pause)

    return body()


def stats(environ: Dict[str, Any], start_response: StartResponse) -> List[bytes]:
    pool: Any = engine.pool
    body: Dict[str, Any] = {
        "pid": os.getpid(),
        "mode": MODE,
        "database": engine.dialect.name,
        "pool_class": type(pool).__name__,
        "pool_size": pool.size(),
        "checkedout": pool.checkedout(),
        "pool_lock": _lock_name(pool._pool.mutex),
        "served": dict(_served),
        "psycopg2_wait_callback": _wait_callback(),
        "import_backend_pid": IMPORT_BACKEND_PID,
        "gevent_patched": _gevent_patched(),
    }
    registry = Session.registry
    if MODE not in ("stock", "stock_remove"):
        body["registry_len"] = len(registry)
        body["ended_without_remove"] = registry.ended_without_remove
    else:
        body["registry_local"] = _type_name(registry.registry)
    return _json(start_response, "200 OK", body)


def not_found(environ: Dict[str, Any], start_response: StartResponse) -> List[bytes]:
    return _json(start_response, "404 Not Found", {"error": "not found"})


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _lock_name(lock: object) -> str:
    """The lock type under the pool's queue: ``_thread.RLock`` unpatched, a gevent lock patched."""
    return _type_name(getattr(lock, "_block", lock))


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


def _wait_callback() -> Any:
    extensions = sys.modules.get("psycopg2.extensions")
    if extensions is None:
        return None
    callback = extensions.get_wait_callback()
    return None if callback is None else f"{callback.__module__}.{callback.__qualname__}"


ROUTES = {"/query": query, "/boom": boom, "/stream": stream, "/stats": stats}


def router(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    return ROUTES.get(environ.get("PATH_INFO", ""), not_found)(environ, start_response)


def _patched_thread_local_and_remove(
    environ: Dict[str, Any], start_response: StartResponse
) -> Iterable[bytes]:
    """``stock_remove``: the registry's thread-local is made on the first request, in the worker,
    after gevent patched (a gevent.local); every request ends with ``Session.remove()``."""
    global _stock_registry_ready
    if not _stock_registry_ready:
        Session.registry = ThreadLocalRegistry(factory)
        _stock_registry_ready = True
    try:
        result = router(environ, start_response)
        if isinstance(result, list):
            return result
        return list(result)  # the body is produced inside the request, before remove()
    finally:
        Session.remove()


_stock_registry_ready = False

app: Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]
if MODE == "greenscope":
    app = ScopeMiddleware(router)
elif MODE == "stock_remove":
    app = _patched_thread_local_and_remove
else:
    app = router
