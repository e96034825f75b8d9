"""Closing a session whose scope has ended, without blocking where blocking is forbidden.

End hooks run in awkward places: a gevent ``rawlink`` callback runs in the hub, a weakref
callback can run inside the garbage collector, an asyncio done-callback runs on the loop.
None of them may do blocking I/O (DESIGN rule 3), and ``Session.close()`` is I/O (a ROLLBACK
and a pool check-in). So an end hook only *drops* the entry and hands the value here:

- :func:`close_in_greenlet` - a gevent hub runs: queue it for one closer greenlet that drains
  the queue (one spawn per burst, not per session);
- :func:`close_on_loop` - an ``AsyncSession``: a task on its loop, kept referenced until done,
  which the loop's shutdown (``asyncio.run``) waits for instead of cancelling it;
- otherwise the registry parks it and closes it on its own next use (``registry._pending``).

Errors while closing are logged on the ``greenscope`` logger, never raised into an unrelated
greenlet or task.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import sys
from typing import Any, AsyncGenerator, Awaitable, Dict, List, Optional, Set

log = logging.getLogger("greenscope")

_queue: List[Any] = []
_closer_scheduled = False

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
    except asyncio.CancelledError:  # only the deadline cancels a close (see _CloseTask)
        log.error("greenscope: closing %r took over %s s; abandoned", value, CLOSE_TIMEOUT)
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)


#: Seconds a close on a loop may take before it is abandoned (a dead server must not hang exit).
CLOSE_TIMEOUT = 30.0


class _CloseTask(asyncio.Task[None]):
    """A close that the loop's shutdown waits for instead of cancelling.

    ``asyncio.run()`` cancels every pending task before closing the loop. A close cancelled
    before its first step leaves ``AsyncSession.close()`` never awaited and its connection
    checked out; one cancelled midway leaves it half closed. So ``cancel()`` is refused, except
    by the close's own deadline (:data:`CLOSE_TIMEOUT`): ``asyncio.run`` then simply waits for
    it in its cancel-and-gather step.
    """

    _expired = False
    _deadline: Optional[asyncio.TimerHandle] = None

    def cancel(self, msg: Any = None) -> bool:
        if self._expired:
            return super().cancel(msg)
        return False

    def _expire(self) -> None:
        self._expired = True
        self.cancel()


class _ShutdownWatch:
    """The close tasks pending on one loop (``tasks`` is what keeps them referenced until done),
    and the async generator that guards them.

    Close tasks created while ``asyncio.run()`` is already cancelling (tasks that ended in its
    cancel step) would be destroyed pending by ``loop.close()``. An async generator iterated on
    the loop is finalized by ``loop.shutdown_asyncgens()``, which ``asyncio.run`` awaits after
    the cancel step: its ``finally`` waits for them. It lives only while closes are pending, so
    it never keeps an idle loop alive.
    """

    __slots__ = ("agen", "closing", "tasks")

    def __init__(self) -> None:
        self.agen: Any = None
        self.closing = False
        self.tasks: Set[_CloseTask] = set()


_watches: Dict[asyncio.AbstractEventLoop, _ShutdownWatch] = {}


async def _wait_at_shutdown(watch: _ShutdownWatch) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        watch.closing = True
        while watch.tasks:
            await asyncio.wait(list(watch.tasks))
        for loop, other in list(_watches.items()):
            if other is watch:
                del _watches[loop]


def _step(awaitable: Any) -> None:
    """Run one step of an async generator's ``asend``/``aclose`` synchronously."""
    with contextlib.suppress(StopIteration):
        awaitable.send(None)


def _watch(loop: asyncio.AbstractEventLoop, task: _CloseTask) -> None:
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _ShutdownWatch()
        if asyncio._get_running_loop() is loop:  # the asyncgen hooks in force are this loop's
            agen = _wait_at_shutdown(watch)
            _step(agen.asend(None))  # first iteration: the loop now tracks it for shutdown
            watch.agen = agen
    watch.tasks.add(task)


def _close_task_done(task: _CloseTask) -> None:
    if task._deadline is not None:
        task._deadline.cancel()
    loop = task.get_loop()
    watch = _watches.get(loop)
    if watch is None:
        return
    watch.tasks.discard(task)
    if not watch.tasks and not watch.closing:
        del _watches[loop]
        if watch.agen is not None:
            _step(watch.agen.aclose())  # finish it now: nothing left to wait for


def close_on_loop(value: Any, loop: Optional[asyncio.AbstractEventLoop]) -> None:
    """Close ``value``; if its ``close()`` is a coroutine, run it as a task on ``loop``."""
    awaitable = close_now(value)
    if awaitable is not None:
        close_on_loop_awaitable(value, awaitable, loop)


def close_on_loop_awaitable(
    value: Any, awaitable: Awaitable[Any], loop: Optional[asyncio.AbstractEventLoop]
) -> None:
    """Finish an async ``close()`` already started: a task on ``loop`` (the loop's thread),
    kept referenced until done and waited for, not cancelled, when the loop shuts down."""
    if loop is None or loop.is_closed():
        _discard(awaitable, value)
        return
    coro = _await_logged(value, awaitable)
    try:
        task = _CloseTask(coro, loop=loop)
    except RuntimeError:  # the loop is shutting down
        coro.close()
        _discard(awaitable, value)
        return
    task._deadline = loop.call_later(CLOSE_TIMEOUT, task._expire)
    _watch(loop, task)
    task.add_done_callback(_close_task_done)


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
    fork_orphans.extend(_watches.values())  # never finalize the parent's generators
    _watches.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
