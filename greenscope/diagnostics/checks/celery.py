"""Celery apps next to scoped sessions: is ``greenscope.celery.install(app)`` called?

A Celery worker runs task after task in the same process and thread (the prefork pool's
children, the solo and threads pools). A scoped session - greenscope's in its default scope, or
a stock thread-local one - is then one Session for every task that thread runs: one task's
identity map, pending objects and open (or failed) transaction are the next task's, and nothing
closes it. ``greenscope.celery.install(app)`` runs every task in its own explicit scope; it
marks the app with ``app.greenscope_installed = True``, which is what this check reads. A
``task_postrun`` signal handler may already call ``remove()``: with one connected, this is a
WARNING rather than UNSAFE.
"""

from __future__ import annotations

import sys
from typing import Any, List

from ..findings import OK, UNSAFE, WARNING, Context, Finding
from ._common import greenscope_registries, name_of, objects_of

__all__ = ["check_celery"]

_FIX = "call greenscope.celery.install(app) right after creating the Celery app"


def _celery_apps(ctx: Context) -> List[Any]:
    base = sys.modules.get("celery.app.base")
    cls = getattr(base, "Celery", None)
    if not isinstance(cls, type):
        return []
    if isinstance(ctx.app, cls):
        return [ctx.app]
    return objects_of(cls)


def _scoped_sessions() -> int:
    """Scoped sessions a task would share: greenscope's in the default scope, stock ones."""
    count = len(greenscope_registries(default_scope_only=True))
    if "sqlalchemy.orm" in sys.modules:
        from sqlalchemy.orm import scoped_session

        from ...session import scoped_session as greenscope_scoped_session

        count += sum(
            1 for s in objects_of(scoped_session) if not isinstance(s, greenscope_scoped_session)
        )
    return count


def _postrun_handlers() -> bool:
    signals = sys.modules.get("celery.signals")
    task_postrun = getattr(signals, "task_postrun", None)
    return bool(getattr(task_postrun, "receivers", None))


def check_celery(ctx: Context) -> List[Finding]:
    """Every Celery app in the process (the loaded one first), when scoped sessions exist.

    Example (Celery is not imported here: nothing to check)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_celery(Context()) if "celery" not in __import__("sys").modules else []
        []
    """
    if "celery" not in sys.modules:
        return []
    apps = _celery_apps(ctx)
    sessions = _scoped_sessions() if apps else 0
    findings = []
    for app in apps:
        subject = f"Celery app {name_of(app)}"
        if getattr(app, "greenscope_installed", False):
            findings.append(
                Finding(OK, subject, "greenscope.celery.install(app): every task in its own scope")
            )
        elif sessions:
            message = (
                f"greenscope.celery.install(app) was not called and {sessions} scoped "
                "session(s) exist: the prefork, solo and threads pools run task after task on one "
                "thread, so one "
                "task's Session (its identity map, its open or failed transaction) is the next "
                "task's, and nothing closes it"
            )
            if _postrun_handlers():
                findings.append(
                    Finding(
                        WARNING,
                        subject,
                        message + " - unless the task_postrun handler connected calls remove()",
                        _FIX,
                    )
                )
            else:
                findings.append(Finding(UNSAFE, subject, message, _FIX))
    return findings
