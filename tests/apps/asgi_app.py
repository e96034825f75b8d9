"""A FastAPI app that reports which session each part of a request got, run under real uvicorn.

Run by ``tests/test_asgi.py`` (``uvicorn --lifespan on apps.asgi_app:app``) on PostgreSQL,
asyncpg for the async session and psycopg2 for the sync one. Every session gets a serial number
when it is created (ids are reused, serials never) and records its closes, so a response can say
which session the endpoint, its dependency, a streaming body or a background task used:

- ``/async``: ``async def`` endpoint and ``async def`` dependency, ``AsyncSession`` (asyncpg);
- ``/sync``: ``def`` endpoint and ``def`` dependency (two thread-pool calls), ``Session``;
- ``/stream``: a ``StreamingResponse`` of a sync generator and ``/astream`` of an async one,
  each chunk reporting its session and backend pid; ``?delay=`` seconds between chunks;
- ``/background``: a response with a sync and an async ``BackgroundTask``;
- ``/sync-yield``: a ``def`` generator dependency, whose exit FastAPI runs after the response;
  ``/insert``: one that commits in its exit (the common FastAPI pattern);
- ``/boom`` and ``/aboom``: use a session, leave a transaction open, raise;
- ``/ws``: a websocket echoing the serial of its session for every message;
- ``/stats``: connections checked out, sessions created and closed, lifespan facts, and what
  the background tasks saw.

``ASGI_MODE`` picks the configuration: ``greenscope`` (the default: greenscope sessions and
:class:`greenscope.asgi.ScopeMiddleware`), ``no-middleware`` (greenscope sessions, no
middleware) and ``stock`` (SQLAlchemy's ``scoped_session`` and
``async_scoped_session(scopefunc=current_task)``, no ``remove()``): the last two are the controls
that show the failure. ``DATABASE_URL`` (psycopg2), ``ASYNC_DATABASE_URL`` (asyncpg) and
``APP_NAME`` (the ``application_name`` of every connection, for ``pg_stat_activity``) are
required.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from typing import Any, AsyncIterator, Dict, Iterator, List

import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import Annotated

import greenscope
from greenscope.asgi import ScopeMiddleware

MODE = os.environ.get("ASGI_MODE", "greenscope")
APP_NAME = os.environ["APP_NAME"]
_serials = itertools.count(1)
created: List[int] = []
closed: List[int] = []
background: List[Dict[str, Any]] = []
lifespan_facts: Dict[str, Any] = {}


class SerialSession(Session):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serial = next(_serials)
        created.append(self.serial)

    def close(self) -> None:
        closed.append(self.serial)
        super().close()


class SerialAsyncSession(AsyncSession):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serial = next(_serials)
        created.append(self.serial)

    async def close(self) -> None:
        closed.append(self.serial)
        await super().close()


engine = sa.create_engine(
    os.environ["DATABASE_URL"],
    pool_size=8,
    max_overflow=0,
    pool_timeout=20,
    connect_args={"application_name": APP_NAME},
)
async_engine = create_async_engine(
    os.environ["ASYNC_DATABASE_URL"],
    pool_size=8,
    max_overflow=0,
    pool_timeout=20,
    connect_args={"server_settings": {"application_name": APP_NAME}},
)
make_session = sessionmaker(engine, class_=SerialSession)
make_async_session = async_sessionmaker(async_engine, class_=SerialAsyncSession)

if MODE == "stock":
    from sqlalchemy.ext.asyncio import async_scoped_session as stock_async_scoped_session
    from sqlalchemy.orm import scoped_session as stock_scoped_session

    DB: Any = stock_scoped_session(make_session)
    ADB: Any = stock_async_scoped_session(make_async_session, scopefunc=asyncio.current_task)
else:
    from greenscope.asyncio import async_scoped_session

    DB = greenscope.scoped_session(make_session)
    ADB = async_scoped_session(make_async_session)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    lifespan_facts["startup"] = True
    lifespan_facts["scope_is_a_request_scope"] = isinstance(
        greenscope.current_scope(), greenscope.scoping.ScopeKey
    )
    yield
    lifespan_facts["shutdown"] = True


app = FastAPI(lifespan=lifespan)
if MODE == "greenscope":
    app.add_middleware(ScopeMiddleware)


def _pid(session: Session) -> int:
    return int(session.execute(sa.text("select pg_backend_pid()")).scalar_one())


async def async_dependency() -> Any:
    return ADB()


@app.get("/async")
async def async_endpoint(dep: Annotated[Any, Depends(async_dependency)]) -> Dict[str, Any]:
    pid = (await ADB.execute(sa.text("select pg_backend_pid()"))).scalar_one()  # stays open
    return {"dependency": dep.serial, "endpoint": ADB().serial, "pid": pid}


def sync_dependency() -> Dict[str, Any]:
    return {"session": DB(), "thread": threading.get_ident()}


# response_model=None: with a response model, FastAPI validates a def endpoint's result in the
# thread pool too, and with a connection pool smaller than the thread pool (40 threads) requests
# holding connections then wait for threads held by requests waiting for connections.
@app.get("/sync", response_model=None)
def sync_endpoint(dep: Annotated[Dict[str, Any], Depends(sync_dependency)]) -> Dict[str, Any]:
    session = DB()
    return {
        "dependency": dep["session"].serial,
        "endpoint": session.serial,
        "dependency_thread": dep["thread"],
        "endpoint_thread": threading.get_ident(),
        "pid": _pid(session),  # leaves a transaction open: nobody commits
    }


yield_exits: List[Dict[str, Any]] = []


def yield_dependency() -> Iterator[SerialSession]:
    session = DB()
    yield session
    # FastAPI runs a def generator dependency's exit in the thread pool too
    yield_exits.append(
        {
            "request": session.serial,
            "proxy": DB().serial,
            "closed_before_exit": session.serial in closed,
        }
    )


@app.get("/sync-yield", response_model=None)
def sync_yield(db: Annotated[SerialSession, Depends(yield_dependency)]) -> Dict[str, Any]:
    return {"request": db.serial, "endpoint": DB().serial, "pid": _pid(db)}


def committing_dependency() -> Iterator[SerialSession]:
    session = DB()
    yield session
    session.commit()  # the common FastAPI pattern: commit in the dependency's exit


@app.post("/insert", response_model=None)
def insert(
    db: Annotated[SerialSession, Depends(committing_dependency)], table: str, owner: str
) -> Dict[str, Any]:
    db.execute(sa.text(f"insert into {table} (owner, n) values (:owner, 1)"), {"owner": owner})
    return {"request": db.serial}


def _chunk(**fields: Any) -> bytes:
    return (repr(sorted(fields.items())) + "\n").encode()


@app.get("/stream")
def stream(delay: float = 0.0) -> StreamingResponse:
    session = DB()
    pid = _pid(session)

    def body() -> Iterator[bytes]:  # Starlette steps it in its thread pool
        for _ in range(3):
            yield _chunk(
                request=session.serial,
                proxy=DB().serial,
                pid=_pid(session),
                first_pid=pid,
                closed=session.serial in closed,
            )
            if delay:
                threading.Event().wait(delay)

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/astream")
async def astream(request: Request, delay: float = 0.0) -> StreamingResponse:
    session = ADB()
    pid = (await session.execute(sa.text("select pg_backend_pid()"))).scalar_one()
    spec = request.scope.get("asgi", {}).get("spec_version", "2.0")
    endpoint_task = asyncio.current_task()

    # a child task of Starlette's under ASGI spec < 2.4, and always on Starlette 0.36.3 (the floor)
    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            now = (await session.execute(sa.text("select pg_backend_pid()"))).scalar_one()
            yield _chunk(
                request=session.serial,
                proxy=ADB().serial,
                pid=now,
                first_pid=pid,
                closed=session.serial in closed,
                spec=spec,
                in_request_task=asyncio.current_task() is endpoint_task,
            )
            if delay:
                await asyncio.sleep(delay)

    return StreamingResponse(body(), media_type="text/plain")


def sync_background(session: SerialSession, key: object) -> None:
    own = DB()
    background.append(
        {
            "kind": "sync",
            "request": session.serial,
            "request_closed_before": session.serial in closed,
            "in_request_scope": greenscope.current_scope() is key,
            "proxy": own.serial,
            "pid": _pid(own),  # a transaction left open
        }
    )


async def async_background(session: SerialSession, key: object) -> None:
    own = ADB()
    await own.execute(sa.text("select 1"))  # a transaction left open
    background.append(
        {
            "kind": "async",
            "request": session.serial,
            "request_closed_before": session.serial in closed,
            "in_request_scope": greenscope.current_scope() is key,
            "proxy": own.serial,
        }
    )


@app.get("/background", response_model=None)
def with_background(tasks: BackgroundTasks) -> Dict[str, Any]:
    session = DB()
    _pid(session)
    key = greenscope.current_scope()  # the request's scope, handed to this pool thread
    tasks.add_task(sync_background, session, key)
    tasks.add_task(async_background, session, key)
    return {"request": session.serial}


class Boom(Exception):
    pass


@app.get("/boom")
def boom() -> None:
    _pid(DB())
    raise Boom("the endpoint failed with a transaction open")


@app.get("/aboom")
async def aboom() -> None:
    await ADB.execute(sa.text("select 1"))
    raise Boom("the endpoint failed with a transaction open")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.receive_text()
            session = ADB()
            await session.execute(sa.text("select 1"))
            await websocket.send_text(str(session.serial))
    except WebSocketDisconnect:
        pass


@app.get("/stats", response_model=None)
async def stats() -> Dict[str, Any]:
    # on the loop: SQLAlchemy 2.0.38's async pool makes its asyncio.Queue on first use, which on
    # CPython 3.9 needs the thread's event loop (a threadpool `def` endpoint has none)
    return {
        "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
        "async_checked_out": async_engine.pool.checkedout(),  # type: ignore[attr-defined]
        # live registry entries (greenscope's registries count them; stock ones cannot)
        "entries": None if MODE == "stock" else len(DB.registry) + len(ADB.registry),
        "created": list(created),
        "closed": list(closed),
        "background": list(background),
        "yield_exits": list(yield_exits),
        "lifespan": dict(lifespan_facts),
    }
