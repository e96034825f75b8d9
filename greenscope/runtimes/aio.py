"""asyncio: a Task's done-callback ends its scope; closes run on the task's own loop.

- **what ends a scope**: one done-callback, added by the registry on first store (never by
  the scopefunc: SQLAlchemy issue 8340);
- **where a close may run**: an ``AsyncSession`` in a closer task on the owning loop (one per
  burst of closes without I/O, one per close with I/O, each with a deadline), which the loop's
  shutdown (``asyncio.run``) waits for instead of cancelling; a sync ``Session`` used in a task in
  the loop's default executor, never on the loop itself (a ROLLBACK is blocking I/O);
- **how to wake it**: ``loop.call_soon_threadsafe`` from any other thread (a GC run there).

The state of each loop (its queue, its closers) is a :class:`LoopHome`, kept only while closes
are pending on that loop.

Note: this module is ``aio``, not ``asyncio``: a submodule named ``asyncio`` would shadow the stdlib
name in the package namespace (DESIGN section 4).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import types
from typing import (
    Any,
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Deque,
    Dict,
    Generator,
    Optional,
    Set,
    Tuple,
)

from .. import _closing
from . import threads

__all__ = ["CLOSE_TIMEOUT", "LoopDoor", "LoopHome", "finish_close", "home", "wait_closed", "watch"]

#: Seconds a close on a loop may take before it is abandoned (a dead server must not hang exit).
CLOSE_TIMEOUT = 30.0


def watch(task: asyncio.Future[Any], ended: Callable[..., None]) -> Callable[[Any], None]:
    """Call ``ended(task)`` when ``task`` is done (on its loop); return the unhook."""
    task.add_done_callback(ended)

    def unhook(key: asyncio.Future[Any]) -> None:
        key.remove_done_callback(ended)

    return unhook


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


class LoopHome:
    """The closes pending on one loop, and the async generator that guards them at shutdown.

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
        self.tasks: Set[asyncio.Future[Any]] = set()  # closer tasks and executor closes


class LoopDoor:
    """The way to one loop's home, kept by the entries of its tasks: the home itself exists only
    while closes are pending (so an idle loop is never kept alive by it)."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def close_soon(self, value: Any, origin: Optional[str]) -> None:
        """Close ``value`` on its loop's terms; callable from any thread, never blocks."""
        loop = self.loop
        if asyncio._get_running_loop() is not loop:  # another thread (a GC run there)
            try:
                loop.call_soon_threadsafe(self.close_soon, value, origin)
            except RuntimeError:  # the loop is closed: nothing runs there any more
                threads.home().close_soon(value, origin)
            return
        if not _closing.is_async_close(value):
            _close_in_executor(loop, value, origin)
            return
        awaitable = _closing.close_now(value, origin)  # makes the coroutine: no I/O yet
        if awaitable is not None:
            finish_close(value, awaitable, loop)


#: the home of each loop with closes pending (dropped when idle)
_homes: Dict[asyncio.AbstractEventLoop, LoopHome] = {}


def home(loop: asyncio.AbstractEventLoop) -> LoopHome:
    """The :class:`LoopHome` of ``loop`` (made on first use, dropped when idle)."""
    found = _homes.get(loop)
    if found is None:
        found = _homes[loop] = LoopHome(loop)
        if asyncio._get_running_loop() is loop:  # the asyncgen hooks in force are this loop's
            agen = _wait_at_shutdown(found)
            _step(agen.asend(None))  # first iteration: the loop now tracks it for shutdown
            found.agen = agen
    return found


def _close_in_executor(loop: asyncio.AbstractEventLoop, value: Any, origin: Optional[str]) -> None:
    """A sync ``close()`` from a task's end: in the loop's default executor, not on the loop."""
    try:
        job = loop.run_in_executor(None, _closing.close_now, value, origin)
    except RuntimeError:  # the executor is shut down (the loop is finishing)
        threads.home().close_soon(value, origin)
        return
    home(loop).tasks.add(job)  # wait_closed() and the loop's shutdown wait for it
    job.add_done_callback(_closer_done)


async def _wait_at_shutdown(watch: LoopHome) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        watch.closing = True
        while watch.tasks:
            await asyncio.wait(list(watch.tasks))
        for loop, other in list(_homes.items()):
            if other is watch:
                del _homes[loop]


def _step(awaitable: Any) -> None:
    """Run one step of an async generator's ``asend``/``aclose`` synchronously."""
    with contextlib.suppress(StopIteration):
        awaitable.send(None)


def _start_closer(watch: LoopHome, coro: Coroutine[Any, Any, None]) -> _CloseTask:
    try:
        closer = _CloseTask(coro, loop=watch.loop)
    except BaseException:  # RuntimeError: the loop is closed, or this is not its thread
        coro.close()
        raise
    watch.tasks.add(closer)
    closer.add_done_callback(_closer_done)
    return closer


def _closer_done(closer: asyncio.Future[Any]) -> None:
    deadline = getattr(closer, "_deadline", None)
    if deadline is not None:
        deadline.cancel()
    watch = _homes.get(closer.get_loop())
    if watch is not None:
        watch.tasks.discard(closer)
        _forget_if_idle(watch)


def _forget_if_idle(watch: LoopHome) -> None:
    if not watch.tasks and not watch.closing and _homes.get(watch.loop) is watch:
        del _homes[watch.loop]
        if watch.agen is not None:
            _step(watch.agen.aclose())  # finish it now: nothing left to wait for


async def _drain(watch: LoopHome) -> None:
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


async def _close_alone(watch: LoopHome, value: Any, awaitable: Awaitable[Any]) -> None:
    """A closer for one close (see :func:`_hand_over`)."""
    await _close_one(watch, value, awaitable)


@types.coroutine
def _close_one(
    watch: LoopHome, value: Any, awaitable: Awaitable[Any]
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
        _closing.log.error("greenscope: closing %r took over %s s; abandoned", value, CLOSE_TIMEOUT)
    except Exception:
        _closing.log.exception("greenscope: error closing %r after its scope ended", value)


def _hand_over(watch: LoopHome) -> None:
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
    """Close ``value`` now; if its ``close()`` is a coroutine, finish it on ``loop``."""
    awaitable = _closing.close_now(value)
    if awaitable is not None:
        finish_close(value, awaitable, loop)


def finish_close(
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
    watch = _homes.get(loop) if loop is not None else None
    if watch is not None and watch.closer is not None and not alone:
        watch.queue.append((value, awaitable))  # the queue's closer will get to it
        return
    if loop is None or loop.is_closed():
        _closing.discard(awaitable, value)
        return
    watch = home(loop)
    try:
        if alone:
            _start_closer(watch, _close_alone(watch, value, awaitable))
            return
        watch.closer = _start_closer(watch, _drain(watch))
    except RuntimeError:  # the loop is shutting down
        _closing.discard(awaitable, value)
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


async def wait_closed() -> None:
    """Wait until the closes pending on the running loop are done (see
    :func:`greenscope.asyncio.wait_closed`)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0)  # let done-callbacks of tasks that just finished run
        watch = _homes.get(loop)
        if watch is None or not watch.tasks:
            return
        await asyncio.wait(list(watch.tasks))


def after_fork_in_child() -> None:
    """The parent's loops do not run in the child: never finalize their closers."""
    _closing.fork_orphans.extend(_homes.values())
    _homes.clear()
