"""Every ``scoped_session`` / ``async_scoped_session`` alive in the process, classified.

Found with :func:`gc.get_objects` (Flask-SQLAlchemy's ``db.session`` included, which
:mod:`.flask` describes): a ``threading.local`` created before gevent or eventlet patched (one
Session per OS thread, shared by every greenlet), a ``scopefunc`` built on ``id()`` (ids are
reused), or a plain dict keyed on the greenlet or task with nothing to clean up.
"""

from __future__ import annotations

import dis
import functools
import sys
import types
from typing import Any, Iterator, List, Tuple

from ..findings import OK, UNSAFE, WARNING, Context, Finding
from . import flask as flask_checks
from ._common import (
    callable_name,
    green_runtime,
    is_os_thread_local,
    name_of,
    objects_of,
    patch_order_fix,
)

__all__ = ["check_scoped_sessions", "classify_scopefunc"]

_ID_NAMES = frozenset({"get_ident", "get_native_id", "_get_ident"})
_GREENLET_NAMES = frozenset({"getcurrent"})
_TASK_NAMES = frozenset({"current_task", "_current_task"})


def _code_names(code: types.CodeType) -> Iterator[Tuple[str, str]]:
    """(opname, name) for every name a code object (and its nested code) loads."""
    for instruction in dis.get_instructions(code):
        if isinstance(instruction.argval, str):
            yield instruction.opname, instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def classify_scopefunc(scopefunc: Any) -> str:
    """What a ``scopefunc`` keys on: ``current_scope``, ``id``, ``greenlet``, ``task`` or ``other``.

    ``id`` covers ``id(...)`` and thread idents (gevent's ``get_ident`` is ``id(getcurrent())``):
    both are reused once their object dies, so a new greenlet inherits a dead one's Session.

    Example::

        >>> import greenlet
        >>> classify_scopefunc(lambda: id(greenlet.getcurrent()))
        'id'
        >>> classify_scopefunc(greenlet.getcurrent)
        'greenlet'
    """
    while isinstance(scopefunc, functools.partial):
        scopefunc = scopefunc.func
    from ...scoping import current_scope

    if scopefunc is current_scope:
        return "current_scope"
    name = getattr(scopefunc, "__name__", "")
    if name in _ID_NAMES or scopefunc is id:
        return "id"
    if name in _GREENLET_NAMES:
        return "greenlet"
    if name in _TASK_NAMES:
        return "task"
    code = getattr(getattr(scopefunc, "__func__", scopefunc), "__code__", None)
    if not isinstance(code, types.CodeType):
        return "other"
    names = list(_code_names(code))
    if any(n == "id" and op in ("LOAD_GLOBAL", "LOAD_NAME") for op, n in names):  # builtin id
        return "id"
    loaded = {n for _op, n in names}
    if loaded & _ID_NAMES:
        return "id"
    if loaded & _GREENLET_NAMES:
        return "greenlet"
    if loaded & _TASK_NAMES:
        return "task"
    return "other"


def _scoped_session_classes() -> List[type]:
    from sqlalchemy.orm import scoped_session

    classes: List[type] = [scoped_session]
    if "sqlalchemy.ext.asyncio" in sys.modules:
        from sqlalchemy.ext.asyncio import async_scoped_session

        classes.append(async_scoped_session)
    return classes


def check_scoped_sessions(ctx: Context) -> List[Finding]:
    """Classify every ``scoped_session`` / ``async_scoped_session`` alive in the process.

    Example::

        >>> from sqlalchemy.orm import scoped_session, sessionmaker
        >>> from greenscope.diagnostics.findings import Context
        >>> Session = scoped_session(sessionmaker(), scopefunc=lambda: id(object()))
        >>> [f.level for f in check_scoped_sessions(Context()) if "id()-based" in f.message]
        ['UNSAFE']
    """
    if "sqlalchemy.orm" not in sys.modules:
        return []
    findings = []
    green = green_runtime()
    for cls in _scoped_session_classes():
        for proxy in objects_of(cls):
            registry = getattr(proxy, "registry", None)
            subject = f"{type(proxy).__name__} {name_of(proxy)}"
            if flask_checks.is_flask_sqlalchemy_session(proxy):
                findings.append(flask_checks.classify_db_session(subject, proxy))
            else:
                findings.append(_classify_registry(subject, registry, green, ctx.mode))
    return findings


_FIX_STOCK = (
    "use greenscope.scoped_session(session_factory) (greenscope.asyncio.async_scoped_session "
    "for asyncio; greenscope.flask.SQLAlchemy for Flask-SQLAlchemy)"
)


def _classify_registry(subject: str, registry: Any, green: Any, mode: str) -> Finding:
    from sqlalchemy.util import ThreadLocalRegistry

    from ...registry import WeakScopeRegistry

    greenlets = "greenthread" if green == "eventlet" else "greenlet"
    if isinstance(registry, WeakScopeRegistry):
        kind = classify_scopefunc(registry.scopefunc)
        if kind == "id":
            return Finding(
                UNSAFE,
                subject,
                f"greenscope registry with an id()-based scopefunc {registry.scopefunc!r}: "
                "ints are kept strongly and reused, so a new scope inherits a dead one's Session",
                "drop the scopefunc (the default, current_scope, is right) or return the "
                "object itself instead of its id",
            )
        scope_name = kind if kind != "other" else callable_name(registry.scopefunc)
        return Finding(OK, subject, f"greenscope registry (scope: {scope_name})")
    if isinstance(registry, ThreadLocalRegistry):
        local = registry.registry
        if is_os_thread_local(local):
            if green is not None:
                measured = " (measured: 50 concurrent greenlets got 1 Session)"
                return Finding(
                    UNSAFE,
                    subject,
                    f"its threading.local was created before {green} patched threading: it is "
                    f"per OS thread, so every {greenlets} of a worker shares one Session"
                    + (measured if green == "gevent" else ""),
                    f"{_FIX_STOCK}; {patch_order_fix(mode, 'the scoped_session', green)}",
                )
            if "gevent" in sys.modules or "eventlet" in sys.modules:
                return Finding(
                    WARNING,
                    subject,
                    "thread-local created while gevent (or eventlet) is imported but not "
                    "patched: one Session per OS thread, shared by greenlets if they run them",
                    _FIX_STOCK,
                )
            return Finding(OK, subject, "stock thread-local: one Session per OS thread")
        measured = " (measured: 30 of 40 requests timed out)" if green == "gevent" else ""
        return Finding(
            WARNING,
            subject,
            f"stock thread-local patched by {green or 'a green runtime'}: one Session per "
            f"{greenlets}, but nothing closes a Session whose {greenlets} ended without remove(); "
            f"its connection stays checked out until the garbage collector frees it{measured}",
            _FIX_STOCK + "; or make sure every code path calls remove()",
        )
    scopefunc = getattr(registry, "scopefunc", None)
    kind = classify_scopefunc(scopefunc)
    if kind == "id":
        return Finding(
            UNSAFE,
            subject,
            f"scopefunc {scopefunc!r} is id()-based: ids are reused, so a new greenlet or "
            "context inherits a dead one's Session (measured: 9,998 of 10,000 sequential "
            "greenlets)",
            _FIX_STOCK,
        )
    if kind in ("greenlet", "task"):
        leaked = "greenlet" if kind == "greenlet" else "Task"
        return Finding(
            UNSAFE,
            subject,
            f"scopefunc {scopefunc!r} keys a plain dict on the {leaked}: every {leaked} and "
            "its Session stays alive until remove() (measured: with a pool of 10, 30 of 40 "
            "later requests timed out)",
            _FIX_STOCK,
        )
    return Finding(
        WARNING,
        subject,
        f"custom scopefunc {scopefunc!r} in a stock registry: the doctor cannot tell whether "
        "its keys are reused or outlive their scope; every entry lives until remove()",
        "greenscope.scoped_session(factory, scopefunc=...) holds keys weakly and closes "
        "sessions of ended scopes",
    )
