"""One backend per runtime, each answering the same three questions (DESIGN rule 4c).

- **explicit** ``scope()``: its exit ends it; the exiting greenlet or task closes.
- **gevent** ``Greenlet`` (:mod:`.gevent`): ``rawlink``; a closer greenlet of the same thread's
  hub; woken by ``spawn``, or ``run_callback_threadsafe`` from another thread.
- **eventlet** ``GreenThread`` (:mod:`.eventlet`): ``link()``; a closer greenthread of its hub;
  woken by ``spawn`` (a GC run in another thread hands the value to that thread's closer).
- **asyncio** ``Task`` (:mod:`.aio`): a done-callback; a closer task on its own loop, or the loop's
  executor for a sync Session; woken by ``call_soon_threadsafe``.
- **a thread's main greenlet** (:mod:`.threads`): the thread's end; the ending thread itself.
- **anything else** (raw greenlets, custom identity keys): the weakref callback (GC); the home of
  the thread that stored it (its hub, its running loop, else a closer thread of its own).

Every home has ``close_soon(value, origin)``: callable from any thread and any callback (a hub
callback, a weakref callback inside the GC, an event-loop callback), it never blocks and never
logs; the closing and its logging happen in the home's place. State lives with its owner: a hub's
queue on the hub, a loop's closers with the loop, a thread's debts in a thread-local; nothing that
one hub, loop or thread holds can stop closes anywhere else. The registry asks :func:`attach` and
keeps no runtime branch of its own.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from greenlet import getcurrent
from greenlet import greenlet as _greenlet

from ..scoping import ScopeKey, _get_running_loop
from . import aio, eventlet, gevent, threads

__all__ = ["Home", "ScopeEnded", "attach", "home_here"]


class Home(Protocol):
    """Where the values of one hub, loop or thread are closed."""

    def close_soon(self, value: Any, origin: Optional[str]) -> None: ...


class Ending(Protocol):
    """What a registry entry offers the backends (see ``greenscope.registry._Entry``)."""

    def ended(self, *_args: Any) -> None: ...

    def taken(self) -> Any: ...

    def scope_ended(self) -> Any: ...


#: takes an entry's end hook off its key again (for ``clear()``): a plain function of
#: ``(key, entry)``, so that an entry holds neither its key nor its hook
Unwatch = Optional[Callable[[Any, Any], None]]


class ScopeEnded(Exception):
    """Raised by :func:`attach` for a handed-off scope that ended before its hook was added: the
    caller stores the value in the caller's own scope instead."""


_SCOPE, _GEVENT, _EVENTLET, _TASK, _GREENLET, _OTHER = range(6)
#: type -> kind; a type's kind never changes (gevent's and eventlet's types exist only once they
#: are imported, so a type seen before that is never one of theirs)
_kinds: Dict[type, int] = {}


def _kind(cls: type) -> int:
    kind = _kinds.get(cls)
    if kind is None:
        gevent_type = gevent.greenlet_type()
        eventlet_type = eventlet.greenthread_type()
        if issubclass(cls, ScopeKey):
            kind = _SCOPE
        elif gevent_type is not None and issubclass(cls, gevent_type):
            kind = _GEVENT
        elif eventlet_type is not None and issubclass(cls, eventlet_type):
            kind = _EVENTLET
        elif issubclass(cls, asyncio.Future):
            kind = _TASK
        elif issubclass(cls, _greenlet):
            kind = _GREENLET
        else:
            kind = _OTHER
        _kinds[cls] = kind
    return kind


def attach(key: Any, entry: Ending) -> Tuple[Unwatch, Optional[Home], bool]:
    """Hook what ends ``key``'s scope to ``entry``. Return how to take the hook off again (for
    ``clear()``; None when only the GC ends it), the home its value is closed in if the scope
    ends by itself (None: found when needed, :func:`home_here`), and whether the entry keeps its
    registry alive until then (a short-lived scope: a greenlet, task or explicit scope, so that
    a registry its user dropped still closes what it holds).

    Raises whatever the key's hook raises: the caller stores nothing then.
    """
    kind = _kind(type(key))
    if kind == _GEVENT:  # the churn case: checked first
        return gevent.unwatch, gevent.watch(key, entry) or home_here(), True
    if kind == _SCOPE:
        if not key.add_end(entry.scope_ended):  # a scope handed off to this thread ended
            raise ScopeEnded
        # an explicit scope closes its values at its exit; the home is needed only if it is
        # garbage collected without exiting (a response the server never closed)
        return _unwatch_scope, None, True
    if kind == _TASK:
        aio.watch(key, entry)
        return aio.unwatch, aio.LoopDoor(key.get_loop()), True
    if kind == _EVENTLET:
        eventlet.watch(key, entry)
        return eventlet.unwatch, eventlet.home_if_running() or home_here(), True
    if kind == _GREENLET and key.parent is None and key is getcurrent():
        # this thread's main greenlet: the thread's end is the scope's end (a thread may live as
        # long as the process: it does not keep the registry alive)
        threads.watch(key, entry)
        return threads.unwatch, threads.home(), False
    return None, home_here(), False  # the weakref callback (the GC) ends it


def _unwatch_scope(key: Any, entry: Any) -> None:
    hook = entry.scope_ended
    if hook in key._ends:
        key._ends.remove(hook)


def home_here() -> Home:
    """The home of the calling thread: its hub's, its running loop's, or the thread's own."""
    found: Optional[Home] = gevent.home_if_running() or eventlet.home_if_running()
    if found is not None:
        return found
    loop = _get_running_loop()
    if loop is not None:
        return aio.LoopDoor(loop)
    return threads.home()


def _after_fork_in_child() -> None:
    gevent.after_fork_in_child()
    eventlet.after_fork_in_child()
    aio.after_fork_in_child()
    threads.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
