"""Threads: a thread's end ends the scope of its main greenlet; the ending thread closes.

- **what ends a scope**: the thread itself ending. A plain thread's scope key is its main
  greenlet, which greenlet frees only "a moment after ``Thread.join()`` returns, from another
  thread" (and a weakref callback must not do I/O anyway). So each thread has a
  :class:`ThreadHome` in a real (never gevent-patched) thread-local: CPython releases it in the
  ending thread itself, after the thread's code returned and before ``join()`` returns, and its
  ``__del__`` closes the sessions of that thread's main greenlet there;
- **where a close may run**: that ending thread; for values whose key was garbage collected in
  a thread with no hub and no loop (a raw greenlet, a custom key), a closer thread of this home's
  own, started for each burst and ending when its queue is empty;
- **how to wake it**: starting the closer thread (a native one, also under monkeypatching).

Other runtimes of the same thread register what must still run when the thread ends
(:meth:`ThreadHome.at_end`): a gevent hub's closes queued but never run close here too.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .. import _closing

__all__ = ["ThreadHome", "close", "home", "watch"]


def _native(module: str, name: str) -> Any:
    """``module.name`` as it was before any monkeypatching (gevent's or eventlet's)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_object_patched(module, name):
        return monkey.get_original(module, name)
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("thread"):
        return getattr(patcher.original(module), name)
    return getattr(__import__(module), name)


class ThreadHome:
    """The closer of one OS thread's values whose key was garbage collected."""

    __slots__ = ("__weakref__", "closing", "queue")

    def __init__(self) -> None:
        self.queue: Deque[Tuple[Any, Optional[str]]] = collections.deque()
        self.closing = False

    def at_end(self, key: int, end: Callable[[], Any]) -> Callable[[Any], None]:
        """Run ``end()`` when the calling thread ends and close the ``(value, origin)`` it
        returns, if any, in that thread; return the unhook."""
        ends = _end_of_this_thread().ends
        ends[key] = end
        return lambda _glet: ends.pop(key, None) and None

    def close_soon(self, value: Any, origin: Optional[str]) -> None:
        """Close ``value`` in this home's closer thread; callable anywhere, never blocks."""
        self.queue.append((value, origin))
        if not self.closing:
            self.closing = True
            try:
                _native("_thread", "start_new_thread")(self._drain, ())
            except RuntimeError:  # interpreter shutting down: nothing can run it any more
                self.closing = False

    def _drain(self) -> None:
        queue = self.queue
        while True:
            try:
                value, origin = queue.popleft()
            except IndexError:
                self.closing = False
                if not queue:  # nothing slipped in after the last pop
                    return
                self.closing = True
                continue
            close(value, origin)


class _ThreadEnd:
    """Referenced only by the thread-local, so that its ``__del__`` runs as the thread ends
    (entries reference the :class:`ThreadHome`, never this)."""

    __slots__ = ("ends",)

    def __init__(self) -> None:
        #: id(owner) -> callable returning ``(value, origin)`` to close, or None
        self.ends: Dict[int, Callable[[], Any]] = {}

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # The thread is ending (its thread-local is being released, in this thread): close what
        # it owes, newest first. No later use of anything is needed. (At interpreter exit the
        # process's connections go with it, and modules are being torn down: nothing to do.)
        if _finalizing():
            return
        ends, self.ends = self.ends, {}
        for end in reversed(list(ends.values())):
            owed = end()
            if owed is not None:
                close(*owed)


def close(value: Any, origin: Optional[str]) -> None:
    """Close ``value`` here and now, logging (an async close cannot finish without a loop)."""
    awaitable = _closing.close_now(value, origin)
    if awaitable is not None:
        _closing.discard(awaitable, value)


_local: Any = _native("_thread", "_local")()


def home() -> ThreadHome:
    """This OS thread's :class:`ThreadHome` (made on first use)."""
    try:
        return _local.home  # type: ignore[no-any-return]
    except AttributeError:
        found = _local.home = ThreadHome()
        return found


def _end_of_this_thread() -> _ThreadEnd:
    try:
        return _local.end  # type: ignore[no-any-return]
    except AttributeError:
        found = _local.end = _ThreadEnd()
        return found


def watch(key_id: int, end: Callable[[], Any]) -> Callable[[Any], None]:
    """The end hook for a key that is this thread's main greenlet: ``end()`` at thread end
    returns ``(value, origin)`` to close, or None."""
    return home().at_end(key_id, end)


def after_fork_in_child() -> None:
    """Only the forking thread lives on in the child: it must never close the parent's values
    at its end, nor run the parent's closer queue."""
    found = getattr(_local, "home", None)
    if found is not None:
        _closing.fork_orphans.extend(found.queue)
        found.queue.clear()
        found.closing = False
    end = getattr(_local, "end", None)
    if end is not None:
        end.ends.clear()
