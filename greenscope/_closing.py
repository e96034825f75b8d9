"""Closing a value: the two primitives every runtime backend and explicit scope share.

``close()`` is I/O (a ROLLBACK and a pool check-in), so these run only where the value's owner
may block: a closer greenlet, a closer task, the loop's executor, the ending thread itself or a
closer thread (see :mod:`greenscope.runtimes`), or the exit of an explicit scope. Logging
happens here, where closing happens, never in a hub, weakref or event-loop callback (DESIGN
rule 3): a handler that does I/O must be free to do it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Dict, List, Optional, TypeVar

_T = TypeVar("_T")

log = logging.getLogger("greenscope")

#: Values that belonged to the parent at ``os.fork()``. The child keeps them referenced forever
#: so that no finalizer ever rolls back or closes a connection whose socket is the parent's.
fork_orphans: List[Any] = []


def start_close(value: Any) -> Optional[Awaitable[Any]]:
    """Call ``value.close()`` if it has one; return the awaitable of an async ``close()``.
    Errors are raised (see :func:`close_now` for the logging variant)."""
    close = getattr(value, "close", None)
    if close is None:
        return None
    result = close()
    if result is None or not inspect.isawaitable(result):  # None: the usual sync close()
        return None
    return result


def close_now(value: Any, origin: Optional[str] = None) -> Optional[Awaitable[Any]]:
    """:func:`start_close`, logging failures instead of raising them.

    ``origin`` is where the value was created, with ``GREENSCOPE_TRACE=1``: its scope ended
    without ``remove()``, which is logged first.
    """
    if origin is not None:
        log.warning(
            "greenscope: closing %r, whose scope ended without remove(); created at:\n%s",
            value,
            origin,
        )
    try:
        return start_close(value)
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)
        return None


def is_async_close(value: Any) -> bool:
    """True when ``value.close`` is a coroutine function (``AsyncSession``). Asked at every
    task's end: answered once per class, unless the instance has a ``close`` of its own."""
    own = "close" in getattr(value, "__dict__", ())
    found = None if own else _async_close.get(type(value))
    if found is None:
        found = inspect.iscoroutinefunction(getattr(value, "close", None))
        if not own:
            _async_close[type(value)] = found
    return found


_async_close: Dict[type, bool] = {}


def closed_if_idle(value: Any) -> bool:
    """Close ``value`` here and return True if its close can do no I/O and run no user code:
    a ``Session`` or ``AsyncSession`` of a class that keeps SQLAlchemy's own ``close()``, with no
    transaction (so no connection) and no objects (so no event fires). Anything else, or any
    doubt, is False: the caller hands the value to a place where closing may block.

    Used where a scope ends by itself (a ``rawlink``, ``link()`` or done-callback, in the
    owner's thread): a session that never ran a query is then closed there and then, without a
    closer greenlet, task or executor job (the churn case of bench/churn.py). Never used in a
    weakref callback: the GC may run it in any thread."""
    kind = _idle_closer.get(type(value))
    if kind is None:
        kind = _plain_close(type(value))
    if kind is False or "close" in getattr(value, "__dict__", ()):
        return False
    try:
        session = value
        if kind is _ASYNC:
            session = value.sync_session
            if _plain_close(type(session)) is not True or "close" in session.__dict__:
                return False
        if (
            session._transaction is not None
            or session._new
            or session._deleted
            or len(session.identity_map)
        ):
            return False
        session.close()
    except Exception:  # never raised here: the caller's closer closes it again, and logs
        return False
    return True


_ASYNC = "async"
#: type -> True (a plain Session class), _ASYNC (a plain AsyncSession class), False (other)
_idle_closer: Dict[type, Any] = {}


def _plain_close(cls: type) -> Any:
    found = _idle_closer.get(cls)
    if found is not None:
        return found
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    if issubclass(cls, Session):
        found = all(
            getattr(cls, name) is getattr(Session, name)
            for name in ("close", "_close_impl", "expunge_all")
        )
    elif issubclass(cls, AsyncSession):
        found = _ASYNC if cls.close is AsyncSession.close else False
    else:
        found = False
    _idle_closer[cls] = found
    return found


def discard(awaitable: Awaitable[Any], value: Any) -> None:
    """Drop an async close that can no longer run (its loop is gone) without a warning."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: close it so it does not warn at exit
    log.debug("greenscope: no running loop left to close %r", value)


async def to_the_end(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` (in a task of its own, unless it already is a future) until it
    finishes, even if the caller is cancelled meanwhile (a request timeout), as SQLAlchemy's
    ``AsyncSession.__aexit__`` does; the cancellation is raised once it has finished. A close
    cut short would leave the rest of the sessions holding their connections until the GC runs."""
    future = asyncio.ensure_future(awaitable)
    cancelled: Optional[BaseException] = None
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError as error:
            if future.done():
                raise
            cancelled = error
    if cancelled is not None:
        raise cancelled
    return result
