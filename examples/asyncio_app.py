"""A small asyncio program: concurrent "requests" as tasks, sessions never removed.

Run it (from the repository root)::

    python examples/asyncio_app.py
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test python examples/asyncio_app.py

Each request is a task that uses ``greenscope.asyncio.async_scoped_session`` - no
``scopefunc``, and no ``remove()`` anywhere - writes a row, reads a count, and runs a child task
(an "audit" that reads in its own session). With stock ``async_scoped_session(scopefunc=
current_task)`` this program leaks every Task and AsyncSession and, with a pool of 5, stalls on
the pool (SQLAlchemy issue 8340); with greenscope each session is closed when its task ends.

It prints one line of JSON::

    {"database": "sqlite", "requests": 100, "sessions": 200, "sessions_distinct": true,
     "child_shared_parent": false, "registry": 0, "checked_out": 0, "timeouts": 0, ...}

and exits 1 if any of those is wrong.

Environment:

- ``DATABASE_URL``: default an aiosqlite file in a temporary directory; any async URL works
  (``postgresql+asyncpg://...``).
- ``REQUESTS`` (default 100), ``CONCURRENCY`` (requests in flight at once, default 10),
  ``POOL_SIZE`` (default 5, ``max_overflow`` 0), ``POOL_TIMEOUT`` (seconds, default 10).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Tuple

from sqlalchemy import func, insert, select
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from greenscope.asyncio import async_scoped_session, wait_closed


class Base(DeclarativeBase):
    pass


class Visit(Base):
    # A unique name: several runs may share one PostgreSQL database.
    __tablename__ = f"gs_async_demo_{uuid.uuid4().hex[:10]}"
    id: Mapped[int] = mapped_column(primary_key=True)
    request: Mapped[int]


async def main() -> Dict[str, Any]:
    tmp = tempfile.TemporaryDirectory()
    url = os.environ.get("DATABASE_URL") or f"sqlite+aiosqlite:///{tmp.name}/demo.db"
    requests = int(os.environ.get("REQUESTS", "100"))
    concurrency = int(os.environ.get("CONCURRENCY", "10"))
    engine = create_async_engine(
        url,
        pool_size=int(os.environ.get("POOL_SIZE", "5")),
        max_overflow=0,
        pool_timeout=float(os.environ.get("POOL_TIMEOUT", "10")),
    )
    Session = async_scoped_session(async_sessionmaker(engine, expire_on_commit=False))
    seen: List[Tuple[AsyncSession, AsyncSession]] = []  # kept alive: ids stay meaningful
    timeouts = 0

    async def audit(request: int) -> AsyncSession:
        """A child task: copies its parent's context, must still get its own session."""
        await Session.scalar(select(func.count()).where(Visit.request == request))
        return Session()

    async def handle(request: int) -> None:
        nonlocal timeouts
        try:
            await Session.execute(insert(Visit).values(request=request))
            await Session.scalar(select(func.count()).select_from(Visit))
            await Session.commit()  # gives the connection back: the child needs one
            child = await asyncio.create_task(audit(request))
        except PoolTimeout:
            timeouts += 1
            return
        seen.append((Session(), child))  # and no remove(): the task's end closes both

    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        for start in range(0, requests, concurrency):
            batch = range(start, min(start + concurrency, requests))
            await asyncio.gather(*(asyncio.create_task(handle(n)) for n in batch))
        await wait_closed()  # the last sessions are closing on the loop
        async with engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(Visit))
        sessions = [s for pair in seen for s in pair]
        return {
            "database": engine.dialect.name,
            "driver": engine.dialect.driver,
            "requests": requests,
            "rows": rows,
            "sessions": len(sessions),
            "sessions_distinct": len({id(s) for s in sessions}) == len(sessions),
            "child_shared_parent": any(parent is child for parent, child in seen),
            "registry": len(Session.registry),
            "checked_out": engine.pool.checkedout(),  # type: ignore[attr-defined]
            "ended_without_remove": Session.registry.ended_without_remove,
            "timeouts": timeouts,
        }
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()
        tmp.cleanup()


def healthy(summary: Dict[str, Any]) -> bool:
    return (
        summary["sessions_distinct"]
        and not summary["child_shared_parent"]
        and summary["registry"] == 0
        and summary["checked_out"] == 0
        and summary["timeouts"] == 0
        and summary["rows"] == summary["requests"]
    )


if __name__ == "__main__":
    summary = asyncio.run(main())
    print(json.dumps(summary))
    sys.exit(0 if healthy(summary) else 1)
