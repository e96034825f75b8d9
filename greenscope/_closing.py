"""Closing a session whose scope has ended, without blocking where blocking is forbidden.

End hooks run in awkward places: a gevent ``rawlink`` callback runs in the hub, a weakref
callback can run inside the garbage collector, an asyncio done-callback runs on the loop.
None of them may do blocking I/O (DESIGN rule 3), and ``Session.close()`` is I/O (a ROLLBACK
and a pool check-in). So an end hook only *drops* the entry and hands the value here:

- :func:`close_in_greenlet` - a gevent hub runs: queue it for one closer greenlet that drains
  the queue (one spawn per burst, not per session);
- :func:`close_on_loop` - an ``AsyncSession``: a task on its loop, kept referenced until done;
- otherwise the registry parks it and closes it on its own next use (``registry._pending``).

Errors while closing are logged on the ``greenscope`` logger, never raised into an unrelated
greenlet or task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from typing import Any, Awaitable, List, Optional, Set

log = logging.getLogger("greenscope")

_queue: List[Any] = []
_closer_scheduled = False
_loop_tasks: Set[asyncio.Future[Any]] = set()

#: Values that belonged to the parent at ``os.fork()``. The child keeps them referenced forever
#: so that no finalizer ever rolls back or closes a connection whose socket is the parent's.
fork_orphans: List[Any] = []


def close_now(value: Any) -> Optional[Awaitable[Any]]:
    """Call ``value.close()``; log failures. Returns the awaitable of an async ``close()``."""
    close = getattr(value, "close", None)
    if close is None:
        return None
    try:
        result = close()
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)
        return None
    if inspect.isawaitable(result):
        return result
    return None


async def _await_logged(value: Any, awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)


def close_on_loop(value: Any, loop: Optional[asyncio.AbstractEventLoop]) -> None:
    """Close ``value``; if its ``close()`` is a coroutine, run it as a task on ``loop``."""
    awaitable = close_now(value)
    if awaitable is not None:
        close_on_loop_awaitable(value, awaitable, loop)


def close_on_loop_awaitable(
    value: Any, awaitable: Awaitable[Any], loop: Optional[asyncio.AbstractEventLoop]
) -> None:
    """Finish an async ``close()`` already started: a task on ``loop``, kept referenced."""
    if loop is None or loop.is_closed():
        _discard(awaitable, value)
        return
    try:
        task = loop.create_task(_await_logged(value, awaitable))
    except RuntimeError:  # the loop is shutting down
        _discard(awaitable, value)
        return
    _loop_tasks.add(task)
    task.add_done_callback(_loop_tasks.discard)


def _discard(awaitable: Awaitable[Any], value: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: close it so it does not warn at exit
    log.debug("greenscope: no running loop left to close %r", value)


def gevent_hub_running() -> bool:
    """True when this thread has a gevent hub, so a closer greenlet can be spawned."""
    hub_module = sys.modules.get("gevent.hub")
    if hub_module is None:
        return False
    return hub_module._get_hub() is not None


def close_in_greenlet(value: Any) -> None:
    """Queue ``value`` for the closer greenlet of this process (gevent must be running)."""
    global _closer_scheduled
    _queue.append(value)
    if not _closer_scheduled:
        _closer_scheduled = True
        import gevent

        gevent.spawn(_drain_queue)


def _drain_queue() -> None:
    global _closer_scheduled
    try:
        while _queue:
            value = _queue.pop()
            awaitable = close_now(value)
            if awaitable is not None:
                _discard(awaitable, value)
    finally:
        _closer_scheduled = False


def _after_fork_in_child() -> None:
    global _closer_scheduled
    fork_orphans.extend(_queue)
    _queue.clear()
    _closer_scheduled = False
    _loop_tasks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
