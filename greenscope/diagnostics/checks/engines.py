"""Engines under gevent: a pool whose lock or thread-local predates the patch."""

from __future__ import annotations

import sys
from typing import List

from ..findings import OK, UNSAFE, Context, Finding
from ._common import gevent_patched, is_unpatched_local, is_unpatched_lock, objects_of

__all__ = ["check_engines"]


def _rebuild_fix(mode: str) -> str:
    if mode == "preload":
        return (
            "rebuild the pool in each worker: engine.dispose(close=False) (gunicorn -c "
            "python:greenscope.gunicorn does), or drop --preload"
        )
    return (
        "call gevent.monkey.patch_all() before the engine is created (the first lines of the "
        "entry point), or engine.dispose(close=False) after patching"
    )


def check_engines(ctx: Context) -> List[Finding]:
    """Under gevent, flag engines whose pool locks (or thread-local) predate patching.

    Example (without gevent patched there is nothing to say)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_engines(Context())
        []
    """
    if "sqlalchemy.engine" not in sys.modules or not gevent_patched():
        return []
    from sqlalchemy.engine import Engine

    findings = []
    for engine in objects_of(Engine):
        subject = f"engine {engine.url.render_as_string(hide_password=True)}"
        pool = engine.pool
        queue = getattr(pool, "_pool", None)
        mutex = getattr(queue, "mutex", None)
        conn_local = getattr(pool, "_conn", None)
        if mutex is not None and is_unpatched_lock(mutex):
            findings.append(
                Finding(
                    UNSAFE,
                    subject,
                    f"{type(pool).__name__}'s lock was created before gevent patched threading:"
                    " a greenlet waiting for a connection blocks the whole worker, and an "
                    "exhausted pool deadlocks it",
                    _rebuild_fix(ctx.mode),
                )
            )
        elif conn_local is not None and is_unpatched_local(conn_local):
            findings.append(
                Finding(
                    UNSAFE,
                    subject,
                    f"{type(pool).__name__} keeps its connection in a threading.local created "
                    "before gevent patched threading: every greenlet shares one connection",
                    _rebuild_fix(ctx.mode),
                )
            )
        else:
            findings.append(
                Finding(
                    OK,
                    subject,
                    f"{type(pool).__name__}: no OS lock or thread-local from before patching",
                )
            )
    return findings
