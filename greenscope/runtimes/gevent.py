"""gevent: a ``Greenlet``'s ``rawlink`` ends its scope; closes run in a greenlet of its hub.

- **what ends a scope**: ``rawlink`` (runs in the hub when the greenlet finishes, even while
  it is still referenced);
- **where a close may run**: a fresh closer greenlet of *the same thread's* hub
  (:class:`greenscope.runtimes.green.HubHome`, kept on the hub: hubs in several threads each
  close their own, and a hub or thread that ends stops nothing elsewhere);
- **how to wake it**: ``gevent.spawn`` in the hub's own thread, the hub loop's
  ``run_callback_threadsafe`` from any other (a GC run there).

greenscope never imports gevent itself: a key can only be a gevent ``Greenlet`` once gevent is.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from greenlet import getcurrent

from .green import HubHome

__all__ = ["GeventHome", "greenlet_type", "home_if_running", "unwatch", "watch"]


def greenlet_type() -> Optional[type]:
    """``gevent.Greenlet``, or None while gevent is not imported."""
    module = sys.modules.get("gevent.greenlet")
    return None if module is None else module.Greenlet


def watch(glet: Any, entry: Any) -> Optional[GeventHome]:
    """Call ``entry.ended(glet)`` in the hub when ``glet`` finishes; return that hub's home.

    A gevent ``Greenlet``'s parent is its thread's hub, and only hubs carry a home: found there
    without a lookup once the hub has one (the churn path)."""
    glet.rawlink(entry.ended)
    return getattr(glet.parent, "_greenscope_home", None) or home_if_running()


def unwatch(glet: Any, entry: Any) -> None:
    glet.unlink(entry.ended)


class GeventHome(HubHome):
    """A gevent hub's closes."""

    __slots__ = ()

    def spawn(self, fn: Callable[[], None]) -> Any:
        return sys.modules["gevent"].spawn(fn)

    def here(self) -> bool:
        hub = self.hub  # a link runs in the hub itself: no lookup then
        return getcurrent() is hub or _current_hub() is hub

    def wake(self, fn: Callable[[], None]) -> Optional[Callable[[], None]]:
        loop = self.hub.loop
        if loop is None:  # destroyed
            return None
        return lambda: loop.run_callback_threadsafe(fn)


def _current_hub() -> Any:
    hub_local = sys.modules.get("gevent._hub_local")
    return None if hub_local is None else hub_local.get_hub_if_exists()


def home_if_running() -> Optional[GeventHome]:
    """The :class:`GeventHome` of this thread's hub, or None when this thread has none."""
    hub = _current_hub()
    if hub is None:
        return None
    found: Optional[GeventHome] = getattr(hub, "_greenscope_home", None)
    if found is None:
        found = hub._greenscope_home = GeventHome(hub)
    return found


def after_fork_in_child() -> None:
    """The child keeps the parent's hub object (gevent reinitialises its loop)."""
    hub = _current_hub()
    found = None if hub is None else getattr(hub, "_greenscope_home", None)
    if found is not None:
        found.orphan()
