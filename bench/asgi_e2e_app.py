"""The FastAPI app of the ASGI end-to-end benchmark (``bench/asgi_e2e.py``), one per configuration.

The same ``async def`` request in every mode - one primary-key ``select`` on PostgreSQL through
asyncpg plus a few proxied calls (``AsyncSession.info``, ``execute``, ``is_active``) - so the only
difference measured is how the session is scoped and ended:

- ``BENCH_MODE=stock``: the stock configuration that is *correct* on asyncio:
  ``async_scoped_session(scopefunc=asyncio.current_task)`` and a pure ASGI middleware that
  awaits ``Session.remove()`` at the end of every request;
- ``BENCH_MODE=greenscope``: ``greenscope.asyncio.async_scoped_session`` and
  :class:`greenscope.asgi.ScopeMiddleware`, no ``remove()``;
- ``BENCH_MODE=greenscope_remove``: greenscope's session with the stock ``remove()``
  middleware instead of ``ScopeMiddleware`` (a greenscope user ending sessions by hand).

A request that times out waiting for the pool answers 503 (the connection stays usable) and is
counted; ``/stats`` returns the count. Run by hand::

    BENCH_MODE=greenscope BENCH_TABLE=t DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1/test \\
        .venv/bin/python -m uvicorn --app-dir bench asgi_e2e_app:app
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable, Dict, MutableMapping

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from greenscope.asgi import ScopeMiddleware

MODE = os.environ.get("BENCH_MODE", "greenscope")
TABLE = os.environ["BENCH_TABLE"]
ROWS = int(os.environ.get("BENCH_ROWS", "100"))
engine = create_async_engine(
    os.environ["DATABASE_URL"],
    pool_size=int(os.environ.get("POOL_SIZE", "10")),
    max_overflow=0,
    pool_timeout=float(os.environ.get("POOL_TIMEOUT", "30")),
)
factory = async_sessionmaker(engine)
if MODE == "stock":
    from sqlalchemy.ext.asyncio import async_scoped_session

    Session: Any = async_scoped_session(factory, scopefunc=asyncio.current_task)
else:
    from greenscope.asyncio import async_scoped_session as greenscope_async_scoped_session

    Session = greenscope_async_scoped_session(factory)
QUERY = text(f"select n from {TABLE} where id = :id")
pool_timeouts = [0]

app = FastAPI()


@app.get("/")
async def handle(id: int = 1) -> Any:
    Session.info.setdefault("requests", 0)
    Session.info["requests"] += 1
    try:
        n = (await Session.execute(QUERY, {"id": id % ROWS + 1})).scalar()
    except exc.TimeoutError:
        pool_timeouts[0] += 1
        return JSONResponse({"error": "pool timeout"}, status_code=503)
    return {"n": n, "active": Session.is_active}


@app.get("/stats")
async def stats() -> Dict[str, Any]:
    return {"pool_timeouts": pool_timeouts[0], "mode": MODE}


_Scope = MutableMapping[str, Any]
_Call = Callable[..., Awaitable[Any]]


class RemoveMiddleware:
    """What a correct stock app does: ``await Session.remove()`` when each request ends."""

    def __init__(self, app: _Call) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Call, send: _Call) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await Session.remove()


if MODE == "greenscope":
    app.add_middleware(ScopeMiddleware)
else:
    app.add_middleware(RemoveMiddleware)
