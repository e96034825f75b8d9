"""``WeakScopeRegistry``: SQLAlchemy's ``ScopedRegistry`` with weak keys and end hooks.

The data structure, for one registry::

    registry._entries : id(key) -> _Entry: a weakref(key) holding value, home and fast_ref
    registry.registry : key -> value            (value keys, found by equality, as in stock)
    registry._var     : ContextVar -> _Fast(owner, glet, value)   (default scope only)

``_entries`` holds the identity-hashed keys (greenlets, tasks, scope keys, any object without an
``__eq__`` of its own): one entry per live scope, found by ``id(key)`` and then verified by
identity through the weak reference (rule 1: an id alone is only a hint, ids are reused). Nothing
in it holds a key strongly, so a key that dies takes its entry with it. A custom scopefunc's value
keys (a UUID, a frozen dataclass, a tuple, an int) are found by equality in ``registry.registry``,
held strongly, exactly as stock ``ScopedRegistry`` holds them: the drop-in promise comes first.

``_var`` is a per-context cache for the hot path. Every greenlet and task has its own
contextvars context, so ``var.get()`` (a few nanoseconds) finds this context's ``_Fast``;
it is trusted only if its ``owner`` is the greenlet (no loop running) or the task (loop
running) asking, because asyncio child tasks and ``asyncio.to_thread`` run in *copies* of
their creator's context. Explicit scopes reset every registry's ``_var`` on entry and
restore it on exit, so an outer scope's ``_Fast`` is never visible inside an inner one.

End hooks, in both directions:

- scope ends -> entry goes: :func:`greenscope.runtimes.attach` hooks the key's end (``rawlink``,
  ``link()``, a done-callback, the scope's exit, the thread's end, else the weakref callback) to
  the entry. The entry is dropped synchronously, there; its value is handed to the *home* it was
  stored with (its hub, loop or thread), which closes it where its owner may block.
- registry dies -> every ``_Fast`` it left in other contexts is emptied, so nothing it stored
  outlives it.
- ``os.fork()`` -> the child's registries start empty and never close the parent's sessions.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import weakref
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

from greenlet import getcurrent
from sqlalchemy.util import ScopedRegistry

from . import _closing, runtimes
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
    """What a context caches for the hot path: the owner to verify, the greenlet that cached it
    (for a task owner: a greenlet running a copy of the task's context must not hit, while
    SQLAlchemy's ``run_sync`` greenlets, children of that greenlet, must) and the value."""

    __slots__ = ("__weakref__", "glet", "owner", "value")

    def __init__(self, owner: object, glet: object, value: Any) -> None:
        self.owner = owner
        self.glet = glet
        self.value = value


class _Entry(weakref.ref):  # type: ignore[type-arg]
    """One live scope in one registry, stored at ``registry._entries[key_id]``.

    The entry *is* the weak reference to its key (``entry()`` is the key while it lives; its
    callback is :meth:`ended` itself), so a scope costs one object here. Made only by
    :func:`_new_entry`.
    """

    __slots__ = ("fast_ref", "home", "keep", "key_id", "origin", "registry_ref", "unhook", "value")

    key_id: int
    #: the registry, weakly: the end hooks find it through this
    registry_ref: Callable[[], Optional[WeakScopeRegistry[Any]]]
    #: The registry, strongly, while an end hook is on the key: a greenlet, task, thread or scope
    #: that will call back keeps its registry alive until it ends, so a registry its user dropped
    #: still closes what it holds. ``kill()`` lets go.
    keep: Optional[WeakScopeRegistry[Any]]
    #: where the value is closed if its scope ends by itself (see greenscope.runtimes)
    home: Optional[runtimes.Home]
    #: where the value was created, with ``GREENSCOPE_TRACE=1`` (for diagnostics)
    origin: Optional[str]
    value: Any
    #: Weak: a ``_Fast`` holds its owner strongly and must live only as long as the contexts
    #: that cache it, or ``_entries`` would keep every greenlet alive through it.
    fast_ref: Callable[[], Optional[_Fast]]
    #: takes the end hook off the key again (for clear(): ``unhook(key, entry)``)
    unhook: Optional[Callable[[Any, Any], None]]

    def ended(self, *args: Any) -> None:
        """The scope ended by itself: a gevent ``rawlink`` or eventlet ``link()`` (the greenlet),
        a task's done-callback (the task), the weakref callback (this entry). Runs in a hub,
        loop or GC callback: drop the entry and hand the value to its home. Only a close that
        can do no I/O (:func:`greenscope._closing.closed_if_idle`) runs here, and only in an end
        hook (it passes its greenlet or task), which runs in the owner's thread: the weakref
        callback passes nothing, and the GC may run it in any thread."""
        registry = self.registry_ref()
        if registry is not None and registry._entries.get(self.key_id) is self:
            del registry._entries[self.key_id]
            home, origin = self.home, self.origin
            value = self.kill()
            registry.ended_without_remove += 1
            if value is None:
                return
            if origin is None and args and _closing.closed_if_idle(value):
                return
            (home or runtimes.home_here()).close_soon(value, origin)

    def taken(self) -> Any:
        """The end hook of a thread: drop the entry, return ``(value, origin)`` for the ending
        thread to close itself (None when nothing is left)."""
        registry = self.registry_ref()
        if registry is None or registry._entries.get(self.key_id) is not self:
            return None
        del registry._entries[self.key_id]
        origin = self.origin
        value = self.kill()
        registry.ended_without_remove += 1
        return None if value is None else (value, origin)

    def scope_ended(self) -> Any:
        """The end hook of an explicit scope: drop the entry, return the value to close."""
        registry = self.registry_ref()
        return None if registry is None else registry._drop(self)

    def fast(self, owner: object, glet: object) -> _Fast:
        """The ``_Fast`` for ``owner`` seen from ``glet``, reused while a context caches it."""
        fast = self.fast_ref()
        if fast is None or fast.owner is not owner or fast.glet is not glet:
            fast = _Fast(owner, glet, self.value)
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
        self.unhook = self.keep = self.home = None
        fast, self.fast_ref = self.fast_ref(), _nothing
        if fast is not None:
            fast.owner = fast.glet = _DEAD
            fast.value = None
        return value


def _nothing() -> None:
    return None


_TRACE = os.environ.get("GREENSCOPE_TRACE", "") not in ("", "0")


def _origin() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-3] if "/greenscope/" not in f.filename]
    return "".join(traceback.format_list(frames[-4:]))


#: type -> True when its instances are identity keys (weakly referenceable, identity-hashed)
_identity_types: Dict[type, bool] = {}


_OBJECT_EQ: Any = object.__eq__
_OBJECT_HASH: Any = object.__hash__


def _is_identity_key(key: Any) -> bool:
    cls: Any = type(key)
    identity = _identity_types.get(cls)
    if identity is None:
        identity = _identity_types[cls] = bool(
            cls.__weakrefoffset__ and cls.__eq__ is _OBJECT_EQ and cls.__hash__ is _OBJECT_HASH
        )
    return identity


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
    ``len()``, the number of live entries. Identity keys (greenlets, tasks, explicit scopes, any
    object without an ``__eq__`` of its own) are held weakly and verified by identity; when such
    a scope ends, its entry disappears and its value's ``close()`` is called promptly, in the
    place its runtime allows (never inside a hub callback, weakref callback or the GC). Value keys
    from a custom ``scopefunc`` (ints, strings, UUIDs, tuples, frozen dataclasses) are found by
    equality and kept strongly in ``self.registry``, exactly like ``ScopedRegistry``.

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
        "_requires_task",
        "_self_ref",
        "_var",
        "ended_without_remove",
    )

    _entries: Dict[int, _Entry]
    _var: Any
    #: values greenscope closed because their greenlet, task or thread ended, or their key was
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
        self._requires_task = False
        self.ended_without_remove = 0
        if self.scopefunc is current_scope:
            self._var = contextvars.ContextVar(f"greenscope.registry.{id(self):#x}", default=None)
        else:
            self._var = None
        self._self_ref = weakref.ref(self)  # shared by every entry
        _all_registries.add(self)
        weakref.finalize(self, _abandon, self._entries)

    # -- the protocol -------------------------------------------------------------------

    def __call__(self) -> _T:
        # The hot path (DESIGN rule 6; bench/micro.py measures it): this context's ``_Fast``,
        # trusted only when its owner is the caller - the current greenlet while no loop runs,
        # else the running task. ``_var`` is None for a custom scopefunc. Every other case takes
        # ``_lookup``. (Keep it flat: each extra attribute load or test here costs a few percent
        # of the whole call. tests/test_hot_path.py runs every copy of it against every case.)
        var = self._var
        if var is not None:
            fast = var.get()
            if fast is not None:
                current = getcurrent()
                if fast.owner is current:
                    if _get_running_loop() is None:
                        return fast.value  # type: ignore[no-any-return]
                else:
                    loop = _get_running_loop()
                    if loop is not None and fast.owner is _current_task(loop):
                        glet = fast.glet
                        if glet is current or current.parent is glet:  # the task's greenlet
                            return fast.value  # type: ignore[no-any-return]
        return self._lookup()

    def _lookup(self) -> _T:
        """The slow path: resolve the scope, find or create its entry, cache it for the hot path."""
        key = self.scopefunc()
        entry = self._entries.get(id(key))
        if entry is not None and entry() is key:
            self._cache(key, entry)
            return entry.value  # type: ignore[no-any-return]
        if not self._check_key(key):  # a value key: stock semantics
            strong = self.registry
            try:
                return strong[key]  # type: ignore[no-any-return]
            except KeyError:
                return strong.setdefault(key, self.createfunc())  # type: ignore[no-any-return]
        value = self.createfunc()
        self._store(key, value, made_here=True)
        return value

    def has(self) -> bool:
        """Return True if a value is present in the current scope."""
        key = self.scopefunc()
        if self._find(key) is not None:
            return True
        return not self._check_key(key) and key in self.registry

    def set(self, obj: _T) -> None:
        """Set the value for the current scope (the previous one is replaced, not closed)."""
        key = self.scopefunc()
        entry = self._find(key)
        if entry is not None:
            entry.set_value(obj)
        elif not self._check_key(key):
            self.registry[key] = obj
        else:
            self._store(key, obj, made_here=False)

    def clear(self) -> None:
        """Clear the current scope, if any (the value is not closed, as in SQLAlchemy)."""
        key = self.scopefunc()
        entry = self._find(key)
        if entry is not None:
            unhook = entry.unhook
            self._drop(entry)
            if unhook is not None:  # a long-lived task or greenlet that calls remove() once per
                unhook(key, entry)  # job must not collect one end hook per job
        elif not self._check_key(key):
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
        """Validate ``key``; True for an identity key (held weakly), False for a value key."""
        if self._requires_task and not isinstance(key, (asyncio.Future, ScopeKey)):
            raise RuntimeError(
                "greenscope.asyncio.async_scoped_session was used outside a running asyncio task "
                "and outside any greenscope.scope(): there is no scope to put an AsyncSession in. "
                "Call it from a coroutine running on an event loop, or open "
                "`async with greenscope.scope():` first."
            )
        if _identity_types.get(type(key)) or _is_identity_key(key):  # the first: a known type
            return True
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"greenscope: the scopefunc {self.scopefunc!r} returned an unhashable scope key "
                f"{key!r} ({type(key).__name__}); a scope key must be hashable, like a greenlet, "
                "a task, an int or a string"
            ) from None
        return False

    def _cache(self, key: Any, entry: _Entry) -> None:
        """Publish ``entry`` to this context's fast path (default scope only).

        ``key`` came from ``current_scope()`` in this context, so its owner is the caller; and
        even a stale or foreign owner could never hit, since every hit verifies the owner.
        """
        var = self._var
        if var is not None:
            var.set(entry.fast(key.owner if type(key) is ScopeKey else key, getcurrent()))

    # -- storing and ending -------------------------------------------------------------

    def _store(self, key: Any, value: Any, made_here: bool) -> None:
        """Store ``value`` for the identity key ``key``, hooked to the key's end. If hooking
        fails, nothing is stored, and a value made for this call is closed."""
        key_id = id(key)
        entry = _new_entry(key, self._self_ref, key_id, value)
        try:
            entry.unhook, entry.home, keep = runtimes.attach(key, entry)
        except runtimes.ScopeEnded:  # a handed-off scope ended meanwhile: the thread's own scope
            entry.value = None
            self._store(current_owner(), value, made_here)
            return
        except BaseException:
            entry.value = None
            if made_here:
                awaitable = _closing.close_now(value)
                if awaitable is not None:
                    _closing.discard(awaitable, value)
            raise
        if keep:
            entry.keep = self
        old = self._entries.get(key_id)
        if old is not None:  # its key is dead (same id, not the same object); callback pending
            old.ended()
        self._entries[key_id] = entry
        var = self._var
        if var is not None:  # as ``_cache``, inlined: a new entry has no ``_Fast`` yet
            fast = _Fast(key.owner if type(key) is ScopeKey else key, getcurrent(), value)
            entry.fast_ref = weakref.ref(fast)
            var.set(fast)

    def _drop(self, entry: _Entry) -> Any:
        """Remove ``entry`` if it is still live; return the value it held (None if it was not)."""
        if self._entries.get(entry.key_id) is not entry:
            return None
        del self._entries[entry.key_id]
        return entry.kill()


def _new_entry(
    key: Any,
    registry_ref: Callable[[], Optional[WeakScopeRegistry[Any]]],
    key_id: int,
    value: Any,
) -> _Entry:
    # ``weakref.ref``'s own constructor (no Python ``__init__`` on the hot store path). The
    # callback gets the entry itself, and is the entry's own ``ended``.
    entry = _Entry(key, _Entry.ended)
    entry.key_id = key_id
    entry.registry_ref = registry_ref
    entry.keep = None
    entry.home = None
    entry.origin = _origin() if _TRACE else None
    entry.value = value
    entry.fast_ref = _nothing
    entry.unhook = None
    return entry


def _abandon(entries: Dict[int, _Entry]) -> None:
    """The registry was collected: empty what it cached in contexts that outlive it."""
    for entry in list(entries.values()):
        entry.kill()
    entries.clear()


def _take_entries_homed_at(home: Any) -> List[Tuple[Any, Optional[str]]]:
    """Drop every live entry whose home is ``home``; return their ``(value, origin)`` pairs."""
    owed: List[Tuple[Any, Optional[str]]] = []
    for registry in list(_all_registries):
        for entry in list(registry._entries.values()):
            if entry.home is home:
                taken = entry.taken()
                if taken is not None:
                    owed.append(taken)
    return owed


runtimes.green.take_entries = _take_entries_homed_at


def _after_fork_in_child() -> None:
    for registry in list(_all_registries):
        for entry in list(registry._entries.values()):
            _closing.fork_orphans.append(entry.kill())
        registry._entries.clear()
        _closing.fork_orphans.extend(registry.registry.values())
        registry.registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
