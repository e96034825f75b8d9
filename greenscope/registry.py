"""``WeakScopeRegistry``: SQLAlchemy's ``ScopedRegistry`` with weak keys and end hooks.

The data structure, for one registry::

    registry._entries : id(key) -> _Entry: a weakref(key) holding value and fast_ref
    registry.registry : key -> value            (keys that cannot be weakly referenced)
    registry._var     : ContextVar -> _Fast(owner, value)   (default scope only)

``_entries`` is the truth: one entry per live scope, found by ``id(key)`` and then verified by
identity through the weak reference (rule 1: an id alone is only a hint, ids are reused).
Nothing in it holds a key strongly, so a key that dies takes its entry with it.

``_var`` is a per-context cache for the hot path. Every greenlet and task has its own
contextvars context, so ``var.get()`` (a few nanoseconds) finds this context's ``_Fast``;
it is trusted only if its ``owner`` is the greenlet (no loop running) or the task (loop
running) asking, because asyncio child tasks and ``asyncio.to_thread`` run in *copies* of
their creator's context. Explicit scopes reset every registry's ``_var`` on entry and
restore it on exit, so an outer scope's ``_Fast`` is never visible inside an inner one.

End hooks, in both directions:

- scope ends -> entry goes: a gevent ``Greenlet`` via ``rawlink`` (fires when it finishes, even
  while still referenced); an asyncio Task via one done-callback added here on first store;
  an explicit scope on exit; anything else via the weakref callback when the key is collected.
  The entry is dropped synchronously; the value is closed elsewhere (see ``_closing``).
- registry dies -> every ``_Fast`` it left in other contexts is emptied, so nothing it stored
  outlives it.
- ``os.fork()`` -> the child's registries start empty and never close the parent's sessions.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import weakref
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from greenlet import getcurrent
from sqlalchemy.util import ScopedRegistry

from . import _closing
from .scoping import (
    ScopeKey,
    _current_task,
    _get_running_loop,
    current_owner,
    current_scope,
)

__all__ = ["WeakScopeRegistry"]

_T = TypeVar("_T")

#: Placed in ``_Fast.owner`` when an entry ends: never identical to any greenlet or task.
_DEAD = object()


class _Fast:
    """What a context caches for the hot path: the owner to verify and the value."""

    __slots__ = ("__weakref__", "owner", "value")

    def __init__(self, owner: object, value: Any) -> None:
        self.owner = owner
        self.value = value


class _Entry(weakref.ref):  # type: ignore[type-arg]
    """One live scope in one registry, stored at ``registry._entries[key_id]``.

    The entry *is* the weak reference to its key (``entry()`` is the key while it lives, and
    ``_collected`` its callback), so a scope costs one object here rather than an entry, a weak
    reference and a callback bound to it. Made only by :func:`_new_entry`.
    """

    __slots__ = ("fast_ref", "hook", "keep", "key_id", "origin", "registry_ref", "value")

    key_id: int
    #: the registry, weakly: the end hooks and ``_collected`` find it through this
    registry_ref: Callable[[], Optional[WeakScopeRegistry[Any]]]
    #: The registry, strongly, while an end hook is on the key: a greenlet, task or scope that
    #: will call back keeps its registry alive until it ends, so a registry its user dropped
    #: still closes what it holds. ``kill()`` lets go.
    keep: Optional[WeakScopeRegistry[Any]]
    #: where the value was created, with ``GREENSCOPE_TRACE=1`` (for diagnostics)
    origin: Optional[str]
    value: Any
    #: Weak: a ``_Fast`` holds its owner strongly and must live only as long as the contexts
    #: that cache it, or ``_entries`` would keep every greenlet alive through it.
    fast_ref: Callable[[], Optional[_Fast]]
    #: The end hook added to the key (done-callback, rawlink, scope end), so that clear() can
    #: take it off again; kill() drops it, which breaks the entry -> hook -> entry cycle.
    hook: Optional[Callable[..., object]]

    def task_ended(self, task: asyncio.Future[Any]) -> None:
        """The end hook of an asyncio Task (a done-callback, on its loop)."""
        registry = self.registry_ref()
        if registry is not None:
            registry._end(self, task.get_loop())

    def scope_ended(self) -> Any:
        """The end hook of an explicit scope: drop the entry, return the value to close."""
        registry = self.registry_ref()
        return None if registry is None else registry._drop(self)

    def greenlet_ended(self, _glet: object) -> None:
        """The end hook of a gevent Greenlet (``rawlink``): runs in the hub, once for every
        greenlet that used a session and ended, so ``_end`` is inlined here."""
        registry = self.registry_ref()
        if registry is not None and registry._entries.get(self.key_id) is self:
            del registry._entries[self.key_id]
            origin = self.origin
            value = self.kill()
            if value is not None:
                registry._note_unremoved(value, origin)
                _closing.close_in_greenlet(value)

    def fast(self, owner: object) -> _Fast:
        """The ``_Fast`` for ``owner``, reused while some context still caches it."""
        fast = self.fast_ref()
        if fast is None or fast.owner is not owner:
            fast = _Fast(owner, self.value)
            self.fast_ref = weakref.ref(fast)
        return fast

    def set_value(self, value: Any) -> None:
        self.value = value
        fast = self.fast_ref()
        if fast is not None:
            fast.value = value

    def kill(self) -> Any:
        """Empty the entry (and its cached ``_Fast``); return the value it held."""
        value, self.value = self.value, None
        self.hook = self.keep = None
        fast, self.fast_ref = self.fast_ref(), _nothing
        if fast is not None:
            fast.owner = _DEAD
            fast.value = None
        return value


def _nothing() -> None:
    return None


_TRACE = os.environ.get("GREENSCOPE_TRACE", "") not in ("", "0")


def _origin() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-3] if "/greenscope/" not in f.filename]
    return "".join(traceback.format_list(frames[-4:]))


#: Every live registry, for ``os.fork()`` and explicit scopes (which reset the fast caches).
class _RegistrySet(weakref.WeakSet["WeakScopeRegistry[Any]"]):
    """A WeakSet whose iteration is a snapshot list: explicit scopes and WSGI requests walk it on
    entry and exit, and the stock generator (with its iteration guard) cost more than the rest
    of an empty scope. The snapshot is safe against registries created or collected meanwhile.
    """

    def __iter__(self) -> Iterator[WeakScopeRegistry[Any]]:
        live = [ref() for ref in self.data.copy()]  # type: ignore[attr-defined]
        return iter([registry for registry in live if registry is not None])


_all_registries: weakref.WeakSet[WeakScopeRegistry[Any]] = _RegistrySet()


class WeakScopeRegistry(ScopedRegistry[_T], Generic[_T]):
    """A :class:`sqlalchemy.util.ScopedRegistry` whose entries end with their scope.

    Same protocol as the stock class - ``__call__``, ``has``, ``set``, ``clear`` - plus
    ``len()``, the number of live entries. Keys are held weakly and verified by identity; when a
    greenlet, task or explicit scope ends, its entry disappears and its value's ``close()`` is
    called promptly (never inside a hub callback, weakref callback or the GC). Keys that cannot be
    weakly referenced (ints, strings) are kept strongly in ``self.registry``, exactly like
    ``ScopedRegistry``, so any ``scopefunc`` works.

    :param createfunc: creates the value for a scope that has none (a ``sessionmaker``).
    :param scopefunc: returns the current scope key; default :func:`greenscope.current_scope`.

    Example::

        >>> import gevent
        >>> from sqlalchemy.orm import Session
        >>> registry = WeakScopeRegistry(Session)
        >>> job = gevent.spawn(lambda: registry())
        >>> session = job.get()
        >>> gevent.sleep(0)  # the hub runs the finished greenlet's links
        >>> len(registry)
        0
    """

    __slots__ = (
        "__weakref__",
        "_entries",
        "_hot_var",
        "_pending",
        "_requires_task",
        "_self_ref",
        "_var",
        "ended_without_remove",
    )

    _entries: Dict[int, _Entry]
    _pending: List[Any]
    _var: Any
    #: what the hot path reads: ``_var``, or None while values are parked in ``_pending`` (so a
    #: hit never pays for a ``_pending`` check; ``_lookup`` closes them and re-arms it)
    _hot_var: Any
    #: values greenscope closed because their greenlet or task ended, or their key was
    #: collected, while still registered (``remove()`` was never called); explicit scope exits
    #: are by design and not counted
    ended_without_remove: int

    def __init__(
        self,
        createfunc: Callable[[], _T],
        scopefunc: Optional[Callable[[], Any]] = None,
    ) -> None:
        super().__init__(createfunc, scopefunc or current_scope)
        self._entries = {}
        self._pending = []
        self._requires_task = False
        self.ended_without_remove = 0
        if self.scopefunc is current_scope:
            self._var = contextvars.ContextVar(f"greenscope.registry.{id(self):#x}", default=None)
        else:
            self._var = None
        self._hot_var = self._var
        self._self_ref = weakref.ref(self)  # shared by every entry
        _all_registries.add(self)
        weakref.finalize(self, _abandon, self._entries)

    # -- the protocol -------------------------------------------------------------------

    def __call__(self) -> _T:
        # The hot path (DESIGN rule 6; bench/micro.py measures it): this context's ``_Fast``,
        # trusted only when its owner is the caller - the current greenlet while no loop runs,
        # else the running task. ``_hot_var`` is None for a custom scopefunc and while values
        # are parked. Every other case takes ``_lookup``. (Keep it flat: each extra attribute
        # load or test here costs a few percent of the whole call.)
        var = self._hot_var
        if var is not None:
            fast = var.get()
            if fast is not None:
                if fast.owner is getcurrent():
                    if _get_running_loop() is None:
                        return fast.value  # type: ignore[no-any-return]
                else:
                    loop = _get_running_loop()
                    if loop is not None and fast.owner is _current_task(loop):
                        return fast.value  # type: ignore[no-any-return]
        return self._lookup()

    def _lookup(self) -> _T:
        """The slow path: resolve the scope, find or create its entry, cache it for the hot path."""
        if self._pending or self._hot_var is not self._var:
            self._close_pending()
        key = self.scopefunc()
        entry = self._entries.get(id(key))
        if entry is not None and entry() is key:
            self._cache(key, entry)
            return entry.value  # type: ignore[no-any-return]
        strong = self.registry
        if strong:  # keys that cannot be weakly referenced: rare, so no KeyError raised otherwise
            try:
                return strong[key]  # type: ignore[no-any-return]
            except KeyError:
                pass
            except TypeError:
                self._check_key(key)
        if self._check_key(key):
            return strong.setdefault(key, self.createfunc())  # type: ignore[no-any-return]
        value = self.createfunc()
        self._store(key, value)
        return value

    def has(self) -> bool:
        """Return True if a value is present in the current scope."""
        key = self.scopefunc()
        if self._find(key) is not None:
            return True
        return self._check_key(key) and key in self.registry

    def set(self, obj: _T) -> None:
        """Set the value for the current scope (the previous one is replaced, not closed)."""
        key = self.scopefunc()
        entry = self._find(key)
        if entry is not None:
            entry.set_value(obj)
        elif self._check_key(key):
            self.registry[key] = obj
        else:
            self._store(key, obj)

    def clear(self) -> None:
        """Clear the current scope, if any (the value is not closed, as in SQLAlchemy)."""
        key = self.scopefunc()
        entry = self._find(key)
        if entry is not None:
            hook = entry.hook
            self._drop(entry)
            _unhook(key, hook)
        elif self._check_key(key):
            self.registry.pop(key, None)

    def __len__(self) -> int:
        """The number of live entries (scopes that currently hold a value)."""
        return len(self._entries) + len(self.registry)

    # -- lookups ------------------------------------------------------------------------

    def _find(self, key: Any) -> Optional[_Entry]:
        entry = self._entries.get(id(key))
        if entry is not None and entry() is key:
            return entry
        return None

    def _check_key(self, key: Any) -> bool:
        """Validate ``key``; True when it cannot be weakly referenced (kept like ScopedRegistry)."""
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"greenscope: the scopefunc {self.scopefunc!r} returned an unhashable scope key "
                f"{key!r} ({type(key).__name__}); a scope key must be hashable, like a greenlet, "
                "a task, an int or a string"
            ) from None
        if self._requires_task and not isinstance(key, (asyncio.Future, ScopeKey)):
            raise RuntimeError(
                "greenscope.asyncio.async_scoped_session was used outside a running asyncio task "
                "and outside any greenscope.scope(): there is no scope to put an AsyncSession in. "
                "Call it from a coroutine running on an event loop, or open "
                "`async with greenscope.scope():` first."
            )
        if type(key).__weakrefoffset__:  # the type supports weak references: the common case
            return False
        try:
            weakref.ref(key)
        except TypeError:
            return True
        return False

    def _cache(self, key: Any, entry: _Entry) -> None:
        """Publish ``entry`` to this context's fast path (default scope only).

        ``key`` came from ``current_scope()`` in this context, so its owner is the caller; and
        even a stale or foreign owner could never hit, since every hit verifies the owner.
        """
        var = self._var
        if var is not None:
            var.set(entry.fast(key.owner if type(key) is ScopeKey else key))

    # -- storing and ending -------------------------------------------------------------

    def _store(self, key: Any, value: Any) -> None:
        key_id = id(key)
        old = self._entries.get(key_id)
        if old is not None:  # its key is dead (same id, not the same object); callback pending
            self._park(self._drop(old))
        entry = _new_entry(key, self._self_ref, key_id, value)
        self._entries[key_id] = entry
        rawlink = getattr(key, "rawlink", None)
        if rawlink is not None:  # a gevent Greenlet (the churn case: checked first)
            entry.hook, entry.keep = entry.greenlet_ended, self
            rawlink(entry.hook)
        elif isinstance(key, asyncio.Future):
            entry.hook, entry.keep = entry.task_ended, self
            key.add_done_callback(entry.hook)
        elif isinstance(key, ScopeKey):
            entry.hook, entry.keep = entry.scope_ended, self
            if not key.handoff:  # the common case, kept as cheap as a list append
                key._ends.append(entry.hook)
            elif not key.add_end(entry.hook):  # a handed-off key that ended meanwhile
                del self._entries[key_id]
                entry.kill()
                self._store(current_owner(), value)  # the thread's own scope, not the dead one
                return
        var = self._var
        if var is not None:  # as ``_cache``, inlined: a new entry has no ``_Fast`` yet
            fast = _Fast(key.owner if type(key) is ScopeKey else key, value)
            entry.fast_ref = weakref.ref(fast)
            var.set(fast)

    def _drop(self, entry: _Entry) -> Any:
        """Remove ``entry`` if it is still live; return the value it held (None if it was not)."""
        if self._entries.get(entry.key_id) is not entry:
            return None
        del self._entries[entry.key_id]
        return entry.kill()

    def _end(self, entry: _Entry, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        """A greenlet or task finished: drop the entry now, close the value elsewhere."""
        origin = entry.origin
        value = self._drop(entry)
        if value is None:
            return
        self._note_unremoved(value, origin)
        if loop is not None:
            _closing.close_on_loop(value, loop)
        elif _closing.gevent_hub_running():
            _closing.close_in_greenlet(value)
        else:
            self._park(value)

    def _park(self, value: Any) -> None:
        if value is not None:
            self._pending.append(value)
            self._hot_var = None  # the next call takes ``_lookup``, which closes it

    def _note_unremoved(self, value: Any, origin: Optional[str]) -> None:
        self.ended_without_remove += 1
        if origin is not None:
            _closing.log.warning(
                "greenscope: closing %r, whose scope ended without remove(); created at:\n%s",
                value,
                origin,
            )

    def _close_pending(self) -> None:
        self._hot_var = self._var  # first: a value parked while closing disarms it again
        pending = self._pending
        while pending:
            value = pending.pop()
            awaitable = _closing.close_now(value)
            if awaitable is not None:  # close() already started: finish it, never call it twice
                _closing.close_on_loop_awaitable(value, awaitable, _get_running_loop())


def _unhook(key: Any, hook: Optional[Callable[..., object]]) -> None:
    """Take a cleared entry's end hook off its key: a long-lived task or greenlet that calls
    ``remove()`` once per job must not collect one callback per job."""
    if hook is None:
        return
    if isinstance(key, ScopeKey):
        if hook in key._ends:
            key._ends.remove(hook)
    elif isinstance(key, asyncio.Future):
        key.remove_done_callback(hook)
    else:
        unlink = getattr(key, "unlink", None)  # a gevent Greenlet
        if unlink is not None:
            unlink(hook)


def _new_entry(
    key: Any,
    registry_ref: Callable[[], Optional[WeakScopeRegistry[Any]]],
    key_id: int,
    value: Any,
) -> _Entry:
    # ``weakref.ref``'s own constructor (no Python ``__init__`` on the hot store path). The
    # callback gets the entry itself; it must hold nothing else, or the entry would be cyclic.
    entry = _Entry(key, _collected)
    entry.key_id = key_id
    entry.registry_ref = registry_ref
    entry.keep = None
    entry.origin = _origin() if _TRACE else None
    entry.value = value
    entry.fast_ref = _nothing
    entry.hook = None
    return entry


def _collected(entry: _Entry) -> None:
    """An entry's key was garbage collected. Runs inside the GC: no I/O, only park the value."""
    registry = entry.registry_ref()
    if registry is not None and registry._entries.get(entry.key_id) is entry:  # else dropped
        origin = entry.origin
        value = registry._drop(entry)
        if value is not None:
            registry._note_unremoved(value, origin)
            registry._park(value)


def _abandon(entries: Dict[int, _Entry]) -> None:
    """The registry was collected: empty what it cached in contexts that outlive it."""
    for entry in list(entries.values()):
        entry.kill()
    entries.clear()


def _after_fork_in_child() -> None:
    for registry in list(_all_registries):
        for entry in list(registry._entries.values()):
            _closing.fork_orphans.append(entry.kill())
        registry._entries.clear()
        _closing.fork_orphans.extend(registry.registry.values())
        registry.registry.clear()
        _closing.fork_orphans.extend(registry._pending)
        registry._pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _load_speedups() -> Any:
    """The compiled hit path (greenscope/_speedups.c), unless it was not built or
    ``GREENSCOPE_PURE=1``. It takes the same decision as ``WeakScopeRegistry.__call__`` above,
    without a Python frame (docs/performance.md has the figures of both)."""
    if os.environ.get("GREENSCOPE_PURE", "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    _speedups.setup(WeakScopeRegistry, getcurrent, _get_running_loop, _current_task)
    return _speedups


#: the compiled module, or None when the pure-Python hit paths run
speedups = _load_speedups()


def compile_hit_path(cls: type, name: str, slow_path: Callable[..., Any], kind: int) -> None:
    """Swap ``cls.<name>``, a pure-Python hit path (a method or a property), for its compiled
    twin: the same decision in C, and on a miss straight to ``slow_path`` (the pure check would
    only miss again). The pure function stays reachable as ``__wrapped__`` (bench/micro.py)."""
    assert speedups is not None
    pure = cls.__dict__[name]
    if isinstance(pure, property):
        setattr(cls, name, speedups.HotProperty(slow_path, kind, pure.fget))
    else:
        setattr(cls, name, speedups.HotCall(slow_path, kind, pure))


if speedups is not None:
    _Fast = speedups.Fast  # type: ignore[misc]
    compile_hit_path(WeakScopeRegistry, "__call__", WeakScopeRegistry._lookup, 0)
