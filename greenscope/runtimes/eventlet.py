"""eventlet: a ``GreenThread``'s ``link()`` ends its scope; closes run in a greenthread of its hub.

- **what ends a scope**: ``GreenThread.link`` (called as the greenthread finishes, in its own
  execution context). A weakref callback is no end hook here: a finished greenthread stays
  referenced by its pool's bookkeeping until the cyclic GC runs, so without ``link()`` a
  ``GreenPool`` of jobs that forget ``remove()`` runs the connection pool dry;
- **where a close may run**: a fresh closer greenthread of the same thread's hub, draining that
  hub's queue (:class:`greenscope.runtimes.green.HubHome`, kept on the hub);
- **how to wake it**: ``eventlet.spawn_n`` in the hub's thread. eventlet's hub has no thread-safe
  wake-up: a value collected by a GC run in another thread goes to that thread's own closer.

greenscope never imports eventlet itself. Raw greenlets started with ``spawn_n`` have no
``link()``: they end by the weakref callback, as raw greenlets do.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from .green import HubHome

__all__ = ["EventletHome", "greenthread_type", "home_if_running", "watch"]


def greenthread_type() -> Optional[type]:
    """``eventlet.greenthread.GreenThread``, or None while eventlet is not imported."""
    module = sys.modules.get("eventlet.greenthread")
    return None if module is None else module.GreenThread


def watch(thread: Any, ended: Callable[..., None]) -> Callable[[Any], None]:
    """Call ``ended(thread)`` when the greenthread finishes; return the unhook."""
    thread.link(ended)
    return lambda key: key.unlink(ended) and None


class EventletHome(HubHome):
    """An eventlet hub's closes."""

    __slots__ = ()

    def spawn(self, fn: Callable[[], None]) -> Any:
        return sys.modules["eventlet"].spawn(fn)

    def here(self) -> bool:
        return _current_hub() is self.hub

    def wake(self, fn: Callable[[], None]) -> Optional[Callable[[], None]]:
        return None  # no thread-safe wake-up: the caller's thread closes it


def _current_hub() -> Any:
    hubs = sys.modules.get("eventlet.hubs")
    if hubs is None:
        return None
    return getattr(hubs._threadlocal, "hub", None)


def home_if_running() -> Optional[EventletHome]:
    """The :class:`EventletHome` of this thread's hub, or None when this thread has none."""
    hub = _current_hub()
    if hub is None:
        return None
    found: Optional[EventletHome] = getattr(hub, "_greenscope_home", None)
    if found is None:
        found = hub._greenscope_home = EventletHome(hub)
    return found


def after_fork_in_child() -> None:
    """A forked child keeps the parent's hub object: never close the parent's queued values."""
    hub = _current_hub()
    found = None if hub is None else getattr(hub, "_greenscope_home", None)
    if found is not None:
        found.orphan()
