"""Which scope is the caller in? ``current_scope()`` and the explicit-scope key.

The answer never depends on ``threading.local`` or on whether gevent has patched anything,
so it is right whatever was imported or patched first:

1. the innermost explicit :func:`greenscope.scope` opened *by this greenlet or task*;
2. else the running :class:`asyncio.Task`, also from SQLAlchemy's ``run_sync`` /
   ``greenlet_spawn`` greenlets, which run on the task's behalf and share its context;
3. else ``greenlet.getcurrent()`` (a plain thread is its own main greenlet).

Explicit scopes live in a :class:`contextvars.ContextVar`. greenlet >= 1.0 gives every greenlet
an empty context, so gevent children never see their parent's scope; asyncio child tasks get
a *copy* of their parent's context, so every scope records the greenlet or task that opened it
(its ``owner``) and is ignored anywhere else (DESIGN rule 4: children never inherit by accident).
The one exception is a scope *handed off* to threads (``ScopeKey.handoff``: the ASGI middleware's
requests, :func:`greenscope.handoff`): a thread running in a copy of its context, outside any
asyncio task, is in it until it ends (``ScopeKey.ended``).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from typing import Any, Callable, List, Optional

from greenlet import getcurrent

__all__ = ["ScopeKey", "current_owner", "current_scope"]

_get_running_loop: Callable[[], Optional[asyncio.AbstractEventLoop]] = asyncio._get_running_loop


def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], Optional[asyncio.Task[Any]]]:
    # Fastest way to ask "which task is running on this loop?" on this interpreter: the C
    # function on 3.12+, the C dict behind ``asyncio.current_task`` on 3.9-3.11.
    try:
        from _asyncio import current_task  # type: ignore[attr-defined]

        return current_task  # type: ignore[no-any-return]
    except ImportError:
        pass
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(tasks, dict):
        return tasks.get
    return asyncio.current_task


_current_task = _task_lookup()


class ScopeKey:
    """The key of one explicit scope: what :func:`current_scope` returns inside ``scope()``.

    ``owner`` is the greenlet or task that opened it; ``_ends`` are the callbacks the
    registries attached to it, run (newest first) when the scope exits.

    ``handoff``: the scope is shared on purpose with threads running a copy of its context
    outside any asyncio task (a framework's thread pool, :func:`greenscope.handoff`);
    ``ended``: it is over, and such threads no longer see it. For a handed-off key, ending and
    attaching an end hook take a lock, so that a thread racing the end never registers a
    session under a dead key (see :meth:`add_end`).
    """

    __slots__ = ("__weakref__", "_ends", "ended", "handoff", "owner")

    def __init__(self, owner: object, handoff: bool = False) -> None:
        self.owner = owner
        self._ends: List[Callable[[], object]] = []
        self.handoff = handoff
        self.ended = False

    def end(self) -> List[Any]:
        """Run the registries' end hooks, newest first, once; return the values to close."""
        if self.handoff:
            with _end_lock:
                self.ended = True
                ends, self._ends = self._ends, []
        else:
            self.ended = True
            ends, self._ends = self._ends, []
        values = [end() for end in reversed(ends)]
        return [value for value in values if value is not None]

    def add_end(self, hook: Callable[[], object]) -> bool:
        """Attach a registry's end hook; False, and nothing attached, if the scope has ended
        (a handed-off thread that found the key just before its end)."""
        if not self.handoff:
            self._ends.append(hook)
            return True
        with _end_lock:
            if self.ended:
                return False
            self._ends.append(hook)
            return True

    def __repr__(self) -> str:
        return f"<greenscope.ScopeKey owner={self.owner!r} at {id(self):#x}>"


#: Guards ``ended`` and ``_ends`` of handed-off keys (held for a few bytecodes, never across I/O).
_end_lock = threading.Lock()


def _new_end_lock() -> None:
    global _end_lock
    _end_lock = threading.Lock()  # a fork child must not inherit it held by another thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_end_lock)


#: The innermost explicit scope of this context; set and reset only by ``greenscope.scope``.
scope_var: contextvars.ContextVar[Optional[ScopeKey]] = contextvars.ContextVar(
    "greenscope.scope", default=None
)


def current_owner() -> object:
    """The task running on this thread's loop, else the current greenlet.

    This is the identity an explicit scope belongs to and the identity the registry's fast
    path verifies.
    """
    loop = _get_running_loop()
    if loop is not None:
        task = _current_task(loop)
        if task is not None:
            return task
    return getcurrent()


def current_scope() -> object:
    """Return the scope key for the caller.

    The innermost explicit scope opened in this greenlet or task; else the running asyncio
    Task; else the current greenlet. The result is hashable and weakly referenceable, and it is
    the default ``scopefunc`` of every greenscope registry::

        >>> import greenlet, greenscope
        >>> greenscope.current_scope() is greenlet.getcurrent()
        True
        >>> with greenscope.scope() as key:
        ...     greenscope.current_scope() is key
        True
    """
    owner = current_owner()
    key = scope_var.get()
    if key is not None:
        if key.owner is owner:
            return key
        # Handed off: a thread running a copy of the scope's context, outside any task (asyncio
        # child tasks also run in copies and must get their own session: DESIGN rule 4).
        if key.handoff and not key.ended and _get_running_loop() is None:
            return key
    return owner
