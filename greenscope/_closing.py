"""Closing a session whose scope has ended, without blocking where blocking is forbidden.

End hooks run in awkward places: a gevent ``rawlink`` callback runs in the hub, a weakref
callback can run inside the garbage collector, an asyncio done-callback runs on the loop.
None of them may do blocking I/O (DESIGN rule 3), and ``Session.close()`` is I/O (a ROLLBACK
and a pool check-in). So an end hook only *drops* the entry and hands the value here:

- :func:`close_in_greenlet` - a gevent hub runs: queue it for a closer greenlet that drains
  the queue (one spawn per burst, not per session; another while one is blocked in I/O);
- :func:`close_on_loop` - an ``AsyncSession``: a closer task on its loop (one per burst of
  closes without I/O, one per close with I/O), kept referenced until done, which the loop's
  shutdown (``asyncio.run``) waits for instead of cancelling it;
- otherwise the registry parks it and closes it on its own next use (``registry._pending``).

Errors while closing are logged on the ``greenscope`` logger, never raised into an unrelated
greenlet or task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import sys
import types
from typing import (
    Any,
    AsyncGenerator,
    Awaitable,
    Coroutine,
    Deque,
    Dict,
    Generator,
    List,
    Optional,
    Set,
    Tuple,
)

from greenlet import getcurrent

log = logging.getLogger("greenscope")

#: values waiting for a closer greenlet; the greenlet draining them (None: none will again);
#: whether that greenlet is inside a ``close()`` (see :func:`close_in_greenlet`)
_queue: List[Any] = []
_closer: Any = None
_closer_busy = False

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


def close_now(value: Any) -> Optional[Awaitable[Any]]:
    """:func:`start_close`, logging failures instead of raising them."""
    try:
        return start_close(value)
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)
        return None


#: Seconds a close on a loop may take before it is abandoned (a dead server must not hang exit).
CLOSE_TIMEOUT = 30.0


class _CloseTask(asyncio.Task[None]):
    """A closer: a task that the loop's shutdown waits for instead of cancelling.

    ``asyncio.run()`` cancels every pending task before closing the loop. A close cancelled
    before its first step leaves ``AsyncSession.close()`` never awaited and its connection
    checked out; one cancelled midway leaves it half closed. So ``cancel()`` is refused, except
    by the deadline of the close it waits on (:data:`CLOSE_TIMEOUT`): ``asyncio.run`` then
    simply waits for it in its cancel-and-gather step.
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
    """The closes pending on one loop, and the async generator that guards them.

    ``queue`` holds the closes not started yet; ``closer`` is the task draining it (None when no
    closer will look at the queue again); ``tasks`` is every closer not done yet (what keeps them
    referenced until done, and what shutdown and ``wait_closed()`` wait for).

    Closers created while ``asyncio.run()`` is already cancelling (tasks that ended in its
    cancel step) would be destroyed pending by ``loop.close()``. An async generator iterated on
    the loop is finalized by ``loop.shutdown_asyncgens()``, which ``asyncio.run`` awaits after
    the cancel step: its ``finally`` waits for them. It lives only while closes are pending, so
    it never keeps an idle loop alive.
    """

    __slots__ = ("agen", "closer", "closing", "loop", "queue", "tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.agen: Any = None
        self.closing = False
        self.closer: Optional[_CloseTask] = None
        self.queue: Deque[Tuple[Any, Awaitable[Any]]] = collections.deque()
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


def _watch(loop: asyncio.AbstractEventLoop) -> _ShutdownWatch:
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _ShutdownWatch(loop)
        if asyncio._get_running_loop() is loop:  # the asyncgen hooks in force are this loop's
            agen = _wait_at_shutdown(watch)
            _step(agen.asend(None))  # first iteration: the loop now tracks it for shutdown
            watch.agen = agen
    return watch


def _start_closer(watch: _ShutdownWatch, coro: Coroutine[Any, Any, None]) -> _CloseTask:
    try:
        closer = _CloseTask(coro, loop=watch.loop)
    except BaseException:  # RuntimeError: the loop is closed, or this is not its thread
        coro.close()
        raise
    watch.tasks.add(closer)
    closer.add_done_callback(_closer_done)
    return closer


def _closer_done(closer: _CloseTask) -> None:
    if closer._deadline is not None:
        closer._deadline.cancel()
    watch = _watches.get(closer.get_loop())
    if watch is not None:
        watch.tasks.discard(closer)
        _forget_if_idle(watch)


def _forget_if_idle(watch: _ShutdownWatch) -> None:
    if not watch.tasks and not watch.closing and _watches.get(watch.loop) is watch:
        del _watches[watch.loop]
        if watch.agen is not None:
            _step(watch.agen.aclose())  # finish it now: nothing left to wait for


async def _drain(watch: _ShutdownWatch) -> None:
    """The queue's closer: run the queued closes one after another, until the queue is empty or
    one of them suspends (see :func:`_hand_over`)."""
    closer = asyncio.current_task()
    queue = watch.queue
    try:
        while queue and watch.closer is closer:
            value, awaitable = queue.popleft()
            await _close_one(watch, value, awaitable)
    finally:
        if watch.closer is closer:
            watch.closer = None
            if queue:  # left by a BaseException: never leave a queued close without a closer
                watch.closer = _start_closer(watch, _drain(watch))


async def _close_alone(watch: _ShutdownWatch, value: Any, awaitable: Awaitable[Any]) -> None:
    """A closer for one close (see :func:`_hand_over`)."""
    await _close_one(watch, value, awaitable)


@types.coroutine
def _close_one(
    watch: _ShutdownWatch, value: Any, awaitable: Awaitable[Any]
) -> Generator[Any, None, None]:
    """``await awaitable`` (an async ``close()``) in the closer, logging its errors.

    Most closes finish without suspending (no connection to roll back), so one closer runs a
    whole burst of them in one step, with no deadline: they cannot hang. A close that suspends
    does I/O and may take long or hang: at its first suspension it gets its deadline and its
    closer is dedicated to it from then on (see :func:`_hand_over`).
    """
    steps = awaitable.__await__()
    error: Optional[BaseException] = None
    suspended = False
    try:
        while True:
            try:
                pending = steps.send(None) if error is None else steps.throw(error)
            except StopIteration:
                return
            if not suspended:
                suspended = True
                _hand_over(watch)
            try:
                yield pending  # the task waits on what the close waits on
                error = None
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:  # thrown in by the task (the deadline's cancel)
                error = exc
    except asyncio.CancelledError:  # only the deadline cancels a closer (see _CloseTask)
        log.error("greenscope: closing %r took over %s s; abandoned", value, CLOSE_TIMEOUT)
    except Exception:
        log.exception("greenscope: error closing %r after its scope ended", value)


def _hand_over(watch: _ShutdownWatch) -> None:
    """The running closer's current close suspended (it does I/O): the close gets its deadline,
    and the closer its own close only. If it was the queue's closer, every close still queued
    gets a closer of its own, so that they all run at once, as they may all do I/O; the next
    close queued starts a new queue's closer."""
    closer = asyncio.current_task()
    assert isinstance(closer, _CloseTask)
    closer._deadline = watch.loop.call_later(CLOSE_TIMEOUT, closer._expire)
    if watch.closer is closer:
        watch.closer = None
        queue = watch.queue
        while queue:
            value, awaitable = queue.popleft()
            _start_closer(watch, _close_alone(watch, value, awaitable))


def close_on_loop(value: Any, loop: Optional[asyncio.AbstractEventLoop]) -> None:
    """Close ``value``; if its ``close()`` is a coroutine, finish it on ``loop``."""
    awaitable = close_now(value)
    if awaitable is not None:
        close_on_loop_awaitable(value, awaitable, loop)


def close_on_loop_awaitable(
    value: Any, awaitable: Awaitable[Any], loop: Optional[asyncio.AbstractEventLoop]
) -> None:
    """Finish an async ``close()`` already started, on ``loop`` (the loop's thread), in a
    closer task that the loop's shutdown waits for instead of cancelling.

    A session in a transaction has a connection to roll back and return: its close does I/O
    and gets a closer of its own at once, so such closes run concurrently, as soon as possible.
    Any other close is queued for the loop's queue closer, which runs a whole burst of them in
    one step (see :func:`_hand_over` for one that does I/O after all).
    """
    alone = _in_transaction(value)
    watch = _watches.get(loop) if loop is not None else None
    if watch is not None and watch.closer is not None and not alone:
        watch.queue.append((value, awaitable))  # the queue's closer will get to it
        return
    if loop is None or loop.is_closed():
        _discard(awaitable, value)
        return
    watch = _watch(loop)
    try:
        if alone:
            _start_closer(watch, _close_alone(watch, value, awaitable))
            return
        watch.closer = _start_closer(watch, _drain(watch))
    except RuntimeError:  # the loop is shutting down
        _discard(awaitable, value)
        _forget_if_idle(watch)
        return
    watch.queue.append((value, awaitable))


def _in_transaction(value: Any) -> bool:
    """``value.in_transaction()`` (``AsyncSession``'s), False if it has none or it fails."""
    in_transaction = getattr(value, "in_transaction", None)
    if in_transaction is None:
        return False
    try:
        return bool(in_transaction())
    except Exception:
        return False


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
    """Queue ``value`` for a closer greenlet of this process (gevent must be running).

    One closer drains a whole burst of ended greenlets' sessions. Seen from here (the hub, or
    another greenlet), a closer that is inside a ``close()`` is blocked in its I/O (a ROLLBACK):
    a fresh closer then takes the queue, so closes never wait behind one another's round trip.
    """
    global _closer, _closer_busy
    _queue.append(value)
    if _closer is None or _closer_busy:
        import gevent

        _closer_busy = False
        _closer = gevent.spawn(_drain_queue)


def _drain_queue() -> None:
    global _closer, _closer_busy
    me = getcurrent()
    try:
        while _queue and _closer is me:
            value = _queue.pop()
            _closer_busy = True
            awaitable = close_now(value)
            if _closer is me:
                _closer_busy = False
            if awaitable is not None:
                _discard(awaitable, value)
    finally:
        if _closer is me:
            _closer = None
            _closer_busy = False


def _after_fork_in_child() -> None:
    global _closer, _closer_busy
    fork_orphans.extend(_queue)
    _queue.clear()
    _closer = None
    _closer_busy = False
    fork_orphans.extend(_watches.values())  # never finalize the parent's generators
    _watches.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
