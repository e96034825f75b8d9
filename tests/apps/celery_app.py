"""A Celery app on PostgreSQL whose tasks never call ``remove()``, for a real ``celery worker``.

Configured from the environment by tests/test_celery.py: ``GS_CELERY_BROKER`` (a Redis URL
with a database number of its own), ``GS_CELERY_QUEUE``, ``GS_FLAVOUR`` (``greenscope``: a
``greenscope.scoped_session`` and ``greenscope.celery.install(app)``; ``stock``: SQLAlchemy's
``scoped_session``), ``GS_APPLICATION_NAME`` (set on every connection, so the test finds this
run's backends in ``pg_stat_activity``) and ``GREENSCOPE_PG_URL``.

The engine connects once at import, as an app creating its tables would: under ``prefork`` that
connection is in the pool the children inherit.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Dict

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import scoped_session, sessionmaker

import greenscope
import greenscope.celery

FLAVOUR = os.environ.get("GS_FLAVOUR", "greenscope")
BROKER = os.environ.get("GS_CELERY_BROKER", "redis://127.0.0.1:6379/13")
QUEUE = os.environ.get("GS_CELERY_QUEUE", "greenscope-test")
PG_URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

app = Celery("gs_celery_app", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    task_time_limit=5,  # a stock task stuck on a socket shared with another process is killed
)

engine = sa.create_engine(
    "postgresql+psycopg2://" + PG_URL.split("://", 1)[1],
    pool_size=10,
    max_overflow=0,
    pool_timeout=float(os.environ.get("GS_POOL_TIMEOUT", "2")),
    connect_args={"application_name": os.environ.get("GS_APPLICATION_NAME", "gs-celery")},
)
factory = sessionmaker(engine)
if FLAVOUR == "greenscope":
    Session: Any = greenscope.scoped_session(factory)
    greenscope.celery.install(app)
else:
    Session = scoped_session(factory)

PID = sa.text("select pg_backend_pid()")

with engine.connect() as conn:  # "create the tables" at import: a pooled connection
    IMPORT_BACKEND = conn.execute(PID).scalar()


def _use_session(task_id: str) -> Dict[str, Any]:
    """What the task's session looks like; leaves a transaction open (no commit, no remove)."""
    session = Session()
    info = session.info
    earlier = info.get("task")  # set only by an earlier task that used this same session
    info.setdefault("marker", uuid.uuid4().hex)
    info["task"] = task_id
    backend = session.execute(PID).scalar()
    return {
        "marker": info["marker"],
        "session_id": id(session),
        "inherited_from": earlier,
        "backend": backend,
        "worker_pid": os.getpid(),
        "import_backend": IMPORT_BACKEND,
    }


@app.task(name="gs.probe", bind=True)
def probe(self: Any, n: int) -> Dict[str, Any]:
    seen = _use_session(self.request.id)
    seen["n"] = n
    return seen


@app.task(name="gs.fails", bind=True)
def fails(self: Any) -> None:
    _use_session(self.request.id)
    raise ValueError("the task failed with its session in a transaction")


@app.task(name="gs.retries", bind=True, max_retries=2)
def retries(self: Any) -> int:
    _use_session(self.request.id)
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return int(self.request.retries)


@app.task(name="gs.soft_limit", bind=True, soft_time_limit=0.5)
def soft_limit(self: Any) -> None:
    _use_session(self.request.id)
    time.sleep(5)  # interrupted by SoftTimeLimitExceeded after 0.5 s


@app.task(name="gs.sleeps", bind=True)
def sleeps(self: Any, seconds: float) -> None:
    _use_session(self.request.id)
    time.sleep(seconds)


@app.task(name="gs.inner", bind=True)
def inner(self: Any) -> Dict[str, Any]:
    return _use_session(self.request.id)


@app.task(name="gs.outer", bind=True)
def outer(self: Any) -> Dict[str, Any]:
    mine = _use_session(self.request.id)
    session = Session()
    nested = inner.apply().result  # an eager call from inside a task: a scope of its own
    return {
        "outer": mine,
        "inner": nested,
        "same_session_after": Session() is session,
        "outer_still_works": session.execute(PID).scalar() == mine["backend"],
    }


@app.task(name="gs.stats")
def stats() -> Dict[str, Any]:
    """Run last, alone: what the worker process holds."""
    import psycopg2.extensions

    return {
        "psycopg2_wait_callback": psycopg2.extensions.get_wait_callback() is not None,
        "checkedout": engine.pool.checkedout(),
        "registry_len": len(Session.registry) if FLAVOUR == "greenscope" else None,
        "worker_pid": os.getpid(),
    }
