"""Which scope is the caller in? ``current_scope()`` and the explicit-scope key.

The answer never depends on ``threading.local`` or on whether gevent has patched anything,
so it is right whatever was imported or patched first:

1. the innermost explicit :func:`greenscope.scope` opened *by this greenlet or task*;
2. else the running :class:`asyncio.Task`, when the caller runs on its behalf: the task's own
   step, or SQLAlchemy's ``run_sync`` / ``greenlet_spawn`` greenlets spawned for it;
3. else ``greenlet.getcurrent()`` (a plain thread is its own main greenlet).

"On its behalf" is a matter of lineage, not of which loop is running (DESIGN rule 4b). The
running loop is per OS thread: while a task is suspended inside a gevent-cooperative call (a
patched ``time.sleep``, psycopg2 under psycogreen), the hub runs unrelated greenlets on the same
thread, and for them ``asyncio.current_task()`` still names the suspended task. A caller acts for
the task when the task's coroutine frame is on its stack, or on the stack of the greenlet that
spawned it through SQLAlchemy's greenlet provider (``__sqlalchemy_greenlet_provider__``). The
answer is remembered in the task's context (``_acts_for``: a weak reference, so no cycle), so each
task walks its frames once.

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
import sys
import threading
import weakref
from typing import Any, Callable, List, Optional, Tuple

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


#: The task this context is known to act for, and the greenlet that was found to act for it
#: (weak references; set by :func:`_acts_for`). The greenlet is part of the answer: a greenlet
#: running code in a *copy* of the task's context carries the copy of this value too.
_acting_for: contextvars.ContextVar[Optional[Tuple[weakref.ref[Any], weakref.ref[Any]]]] = (
    contextvars.ContextVar("greenscope.acting_for", default=None)
)


def current_owner() -> object:
    """The task running on this thread's loop if the caller acts for it, else the greenlet.

    This is the identity an explicit scope belongs to and the identity the registry's fast
    path verifies.
    """
    loop = _get_running_loop()
    if loop is not None:
        task = _current_task(loop)
        if task is not None and _acts_for(task):
            return task
    return getcurrent()


def _acts_for(task: Any) -> bool:
    """Does the caller run on ``task``'s behalf (rule 4b)? Remembered in this context."""
    known = _acting_for.get()
    glet = getcurrent()
    if known is not None and known[0]() is task and known[1]() is glet:
        return True
    if not _in_lineage(task):
        return False
    _acting_for.set((weakref.ref(task), weakref.ref(glet)))
    return True


def _in_lineage(task: Any) -> bool:
    """True when ``task``'s coroutine frame is on the caller's stack, or on the stack of the
    greenlet that spawned the caller through SQLAlchemy's greenlet provider (``run_sync``)."""
    target = getattr(task.get_coro(), "cr_frame", None)
    if target is None:  # not a native coroutine: its frames cannot be told apart
        return True
    glet: Any = getcurrent()
    frame: Any = sys._getframe(1)
    while True:
        while frame is not None:
            if frame is target:
                return True
            frame = frame.f_back
        if not getattr(glet, "__sqlalchemy_greenlet_provider__", False):
            return False
        glet = glet.parent
        if glet is None:
            return False
        frame = glet.gr_frame


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
    owner: object = None  # current_owner(), inlined: this is every miss's scopefunc
    loop = _get_running_loop()
    if loop is not None:
        task = _current_task(loop)
        if task is not None and _acts_for(task):
            owner = task
    if owner is None:
        owner = getcurrent()
    key = scope_var.get()
    if key is not None:
        if key.owner is owner:
            return key
        # Handed off: a thread running a copy of the scope's context, outside any task (asyncio
        # child tasks also run in copies and must get their own session: DESIGN rule 4).
        if key.handoff and not key.ended and _get_running_loop() is None:
            return key
    return owner
