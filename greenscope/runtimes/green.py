"""A hub's queue of closes, drained by a closer greenlet of that hub (gevent and eventlet).

One closer greenlet drains a whole burst of ended greenlets' sessions. Seen from the hub (or any
other greenlet), a closer that is inside a ``close()`` is blocked in its I/O (a ROLLBACK): a fresh
closer then takes the queue, so closes never wait behind one another's round trip. Closes a hub
queued but never ran (its thread left the hub's loop first) are closed when that thread ends
(:meth:`greenscope.runtimes.threads.ThreadHome.at_end`).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Deque, List, Optional, Tuple

from greenlet import getcurrent

from .. import _closing
from . import threads

__all__ = ["HubHome", "take_entries"]

#: Set by greenscope.registry: drop every live entry whose home is the given hub home and return
#: their ``(value, origin)`` pairs (a thread's end, for its hub's greenlets that never linked).
take_entries: Optional[Callable[[Any], List[Tuple[Any, Optional[str]]]]] = None


class HubHome:
    """The closes queued on one hub and the greenlet draining them; one per hub, kept on it.

    Subclasses say how to start a greenlet on the hub (:meth:`spawn`), whether the caller runs
    in the hub's own thread (:meth:`here`) and how to wake the hub from another (:meth:`wake`).
    """

    __slots__ = ("__weakref__", "busy", "closer", "hub", "queue")

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.queue: Deque[Tuple[Any, Optional[str]]] = collections.deque()
        self.closer: Any = None  # the greenlet draining the queue; None: none will again
        self.busy = False  # that greenlet is inside a close() (blocked in its I/O)
        threads.home().at_end(id(self), self._close_left)

    def spawn(self, fn: Callable[[], None]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def here(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def wake(self, fn: Callable[[], None]) -> Optional[Callable[[], None]]:  # pragma: no cover
        """How to run ``fn`` in the hub's thread soon, from another thread; None if it cannot."""
        raise NotImplementedError

    def close_soon(self, value: Any, origin: Optional[str]) -> None:
        """Queue ``value`` for this hub's closer; callable from any thread, never blocks."""
        if self.here():
            self.queue.append((value, origin))
            if self.closer is None or self.busy:
                self._start()
            return
        wake = self.wake(self._start)
        if wake is None:  # a GC run in another thread: that thread's own closer
            threads.home().close_soon(value, origin)
            return
        self.queue.append((value, origin))
        with contextlib.suppress(Exception):  # destroyed meanwhile: its thread closes it at its end
            wake()

    def _start(self) -> None:
        if self.queue and (self.closer is None or self.busy):
            self.busy = False
            self.closer = self.spawn(self._drain)

    def _drain(self) -> None:
        me = getcurrent()
        queue = self.queue
        try:
            while self.closer is me:
                try:
                    value, origin = queue.popleft()
                except IndexError:
                    break
                self.busy = True
                threads.close(value, origin)
                if self.closer is me:
                    self.busy = False
        finally:
            if self.closer is me:
                self.closer = None
                self.busy = False

    def _close_left(self) -> None:
        """At the thread's end: close, in that thread, what this hub's closer never got to, and
        the values of this hub's greenlets whose links never ran (the thread left the hub's loop
        first): none of its greenlets can run again."""
        queue = self.queue
        while queue:
            threads.close(*queue.popleft())
        if take_entries is not None:
            for owed in take_entries(self):
                threads.close(*owed)

    def orphan(self) -> None:
        """After ``os.fork()``, in the child: the queued values are the parent's."""
        _closing.fork_orphans.extend(self.queue)
        self.queue.clear()
        self.closer = None
        self.busy = False
