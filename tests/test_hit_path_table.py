"""Every inlined copy of the session-lookup hit path, against every case: one table.

The lookup is inlined five times for speed (DESIGN rule 6): ``WeakScopeRegistry.__call__``,
``scoped_session.__call__`` and ``._proxied``, ``async_scoped_session.__call__`` and
``._proxied``. Each copy trusts the per-context cache (``registry._var``) only when its owner is
the caller, and must give exactly the answer of the slow path - ``registry._lookup()``, which
resolves ``current_scope()`` (or the custom scopefunc) - everywhere. This file is the table that
keeps them from drifting apart (STYLE rule 10)::

    rows (ROWS)            x  columns (COLUMNS: the copies, sync and async)
    main greenlet             WeakScopeRegistry.__call__         (scoped.registry())
    gevent / raw greenlet     scoped_session.__call__            (Session())
    thread, copied context    scoped_session._proxied            (Session.execute, ...)
    task, child task, ...     async WeakScopeRegistry.__call__   (AsyncSession.registry())
    run_sync, to_thread       async_scoped_session.__call__      (AsyncSession())
    explicit scopes           async_scoped_session._proxied      (AsyncSession.execute, ...)
    custom scopefuncs, subclasses, an MRO mixin, the hub's bystanders (subprocess)

Every cell runs the column's copy where the row says and checks, in the parent after joining:

- the copy's answer is the slow path's (``registry._lookup()``) and the value stored for the
  scope key the slow path resolves, and every other copy agrees (a ``probe``);
- the same object on repeated calls in one scope (the first call is the copy's miss, the next
  ones its hit), a distinct one in every other scope;
- the cached value of the enclosing context (the parent greenlet's, the parent task's, the outer
  scope's) is never returned where it does not belong: tasks, ``asyncio.to_thread`` and
  ``contextvars`` users run in *copies* of a context holding that cache;
- an async copy used with no task and no explicit scope raises the documented ``RuntimeError``,
  as the slow path does, and stores nothing;
- custom scopefuncs, registry and session subclasses and a mixin between greenscope's class and
  the stock one give what the same classes give on stock SQLAlchemy (``StockEquivalent``), and
  their overrides run on every miss exactly as there. (On a *hit*, the ``scoped_session``
  copies return before reaching the miss path - which is the point of inlining: a mixin's or
  registry subclass's ``__call__`` runs there once per scope, not once per call. The cells pin
  that it never runs *more* often than stock and always on a miss.)

The row "a gevent greenlet the hub runs while a task is suspended in a gevent-cooperative call"
needs ``monkey.patch_all()``: it runs every column in one subprocess (``run_python``), next to
tests/test_runtimes.py::test_greenlets_the_hub_runs_while_a_task_waits_never_see_the_tasks_session.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import greenlet
import pytest
from conftest import run_python
from sqlalchemy.ext.asyncio import async_scoped_session as stock_async_scoped_session
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.util import ScopedRegistry, greenlet_spawn

import greenscope
from greenscope.asyncio import async_scoped_session
from greenscope.registry import WeakScopeRegistry

# -- the columns: every inlined copy of the hit path ---------------------------------------


@dataclass(frozen=True)
class Column:
    kind: str  # "sync" (scoped_session) or "async" (async_scoped_session)
    call: Callable[[Any], Any]


COLUMNS: Dict[str, Column] = {
    "WeakScopeRegistry.__call__": Column("sync", lambda scoped: scoped.registry()),
    "scoped_session.__call__": Column("sync", lambda scoped: scoped()),
    "scoped_session._proxied": Column("sync", lambda scoped: scoped._proxied),
    "async WeakScopeRegistry.__call__": Column("async", lambda scoped: scoped.registry()),
    "async_scoped_session.__call__": Column("async", lambda scoped: scoped()),
    "async_scoped_session._proxied": Column("async", lambda scoped: scoped._proxied),
}

OUTSIDE_A_TASK = "outside a running asyncio task"


def new_scoped(kind: str, cls: Optional[type] = None, **kw: Any) -> Any:
    """A greenscope scoped session of ``kind`` on an unbound factory (nothing connects)."""
    if kind == "sync":
        return (cls or greenscope.scoped_session)(sessionmaker(), **kw)
    return (cls or async_scoped_session)(async_sessionmaker(), **kw)


# -- what one call site saw ----------------------------------------------------------------

_MISSING = object()


@dataclass
class Seen:
    """What a probe saw where it ran: the key the slow path resolves, every answer."""

    key: Any
    values: List[Any] = field(default_factory=list)
    slow: Any = _MISSING
    stored: Any = _MISSING
    error: Optional[BaseException] = None
    slow_error: Optional[BaseException] = None
    stored_count: int = -1  # entries added by a call that raised

    @property
    def session(self) -> Any:
        assert self.error is None, f"the copy raised {self.error!r}"
        return self.values[0]


def stored_for(registry: Any, key: Any) -> Any:
    """The value the registry holds for ``key``, read without touching any cache."""
    entry = registry._find(key)
    if entry is not None:
        return entry.value
    return registry.registry.get(key, _MISSING)


def probe(scoped: Any, column: str) -> Seen:
    """Run ``column``'s copy here: its miss (first call), its hits, the slow path in between,
    then every other copy of the same kind."""
    copy = COLUMNS[column]
    registry = scoped.registry
    seen = Seen(key=registry.scopefunc())
    before = len(registry)
    try:
        first = copy.call(scoped)
    except RuntimeError as error:
        seen.error = error
        try:
            registry._lookup()
        except RuntimeError as slow_error:
            seen.slow_error = slow_error
        seen.stored_count = len(registry) - before  # nothing stored by the error
        seen.stored = stored_for(registry, seen.key)
        return seen
    seen.stored = stored_for(registry, seen.key)
    hit = copy.call(scoped)
    seen.slow = registry._lookup()
    seen.values = [first, hit, copy.call(scoped)]
    seen.values += [other.call(scoped) for other in COLUMNS.values() if other.kind == copy.kind]
    return seen


def check(
    seen: Seen,
    key: Any = _MISSING,
    *,
    same_as: Any = _MISSING,
    not_any_of: Tuple[Any, ...] = (),
) -> Any:
    """Assert (in the parent) that every answer is the slow path's; return the session."""
    session = seen.session
    assert all(value is session for value in seen.values), seen.values
    assert seen.slow is session, "the hit path and registry._lookup() disagree"
    assert seen.stored is session, "the hit path returned a value not stored for this scope"
    if key is not _MISSING:
        assert seen.key is key, f"resolved {seen.key!r}, expected {key!r}"
    if same_as is not _MISSING:
        assert session is same_as
    for other in not_any_of:
        assert session is not other, "a value cached for another scope was returned here"
    return session


def check_raises_outside_a_task(seen: Seen) -> None:
    """The documented RuntimeError, from the copy and from the slow path; nothing stored."""
    assert isinstance(seen.error, RuntimeError), f"expected RuntimeError, got {seen.values}"
    assert OUTSIDE_A_TASK in str(seen.error)
    assert isinstance(seen.slow_error, RuntimeError) and OUTSIDE_A_TASK in str(seen.slow_error)
    assert seen.stored_count == 0 and seen.stored is _MISSING


# -- places to run a probe in (each returns what the probe returned) ----------------------


def in_gevent_greenlet(fn: Callable[[], Any]) -> Tuple[Any, Any]:
    job = gevent.spawn(fn)
    return job.get(), job


def in_raw_greenlet(fn: Callable[[], Any], context: Any = None) -> Tuple[Any, Any]:
    glet = greenlet.greenlet(fn)
    if context is not None:
        glet.gr_context = context  # as SQLAlchemy's greenlet_spawn shares its caller's
    return glet.switch(), glet


def in_thread(fn: Callable[[], Any]) -> Tuple[Any, Any]:
    out: List[Any] = []
    thread = threading.Thread(target=lambda: out.append((fn(), greenlet.getcurrent())))
    thread.start()
    thread.join()
    assert out, "the thread raised"
    return out[0][0], out[0][1]


async def in_task(fn: Callable[[], Any]) -> Tuple[Any, Any]:
    async def run() -> Tuple[Any, Any]:
        return fn(), asyncio.current_task()

    return await asyncio.create_task(run())


# -- the rows ------------------------------------------------------------------------------
# Each row is ``row(column)``: it runs the column's copy in its place(s) and asserts in the
# parent. ``kinds`` says which columns apply (all do, unless a row is sync- or async-only).


def row_main_greenlet(column: str) -> None:
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)
    seen = probe(scoped, column)
    if kind == "async":
        check_raises_outside_a_task(seen)
        return
    session = check(seen, greenlet.getcurrent())
    check(probe(scoped, column), greenlet.getcurrent(), same_as=session)
    scoped.remove()


def _row_child_greenlet(column: str, place: Callable[..., Tuple[Any, Any]]) -> None:
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)
    outer = COLUMNS[column].call(scoped) if kind == "sync" else None  # cached in this context
    first, glet = place(functools.partial(probe, scoped, column))
    second, glet2 = place(functools.partial(probe, scoped, column))
    if kind == "async":
        check_raises_outside_a_task(first)
        check_raises_outside_a_task(second)
        return
    one = check(first, glet, not_any_of=(outer,))
    check(second, glet2, not_any_of=(outer, one))
    check(probe(scoped, column), greenlet.getcurrent(), same_as=outer)
    scoped.remove()


def row_gevent_greenlet(column: str) -> None:
    _row_child_greenlet(column, in_gevent_greenlet)


def row_raw_greenlet(column: str) -> None:
    _row_child_greenlet(column, in_raw_greenlet)


def row_raw_greenlet_sharing_the_parents_context(column: str) -> None:
    """The same Context object as the parent greenlet (holding its cache), as greenlet_spawn
    does outside a task: the greenlet is still its own scope."""
    here = greenlet.getcurrent()
    _row_child_greenlet(column, lambda fn: in_raw_greenlet(fn, here.gr_context))


def row_thread(column: str) -> None:
    _row_child_greenlet(column, in_thread)


def row_thread_running_a_copy_of_the_context(column: str) -> None:
    def place(fn: Callable[[], Any]) -> Tuple[Any, Any]:
        context = contextvars.copy_context()  # holds the parent's cached entry
        return in_thread(lambda: context.run(fn))

    _row_child_greenlet(column, place)


def row_asyncio_task(column: str) -> None:
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)
    outer = COLUMNS[column].call(scoped) if kind == "sync" else None

    async def main() -> Tuple[Seen, Seen, Any]:
        # asyncio.run's task runs in a copy of this greenlet's context, cache included
        return probe(scoped, column), probe(scoped, column), asyncio.current_task()

    first, again, task = asyncio.run(main())
    session = check(first, task, not_any_of=(outer,))
    check(again, task, same_as=session)
    if kind == "sync":
        check(probe(scoped, column), greenlet.getcurrent(), same_as=outer)
        scoped.remove()


def row_child_task(column: str) -> None:
    """create_task and gather: children run in copies of the parent task's context."""
    scoped = new_scoped(COLUMNS[column].kind)

    async def child() -> Tuple[Seen, Any]:
        return probe(scoped, column), asyncio.current_task()

    async def main() -> Dict[str, Any]:
        parent = probe(scoped, column)
        created = await asyncio.create_task(child())
        gathered = await asyncio.gather(child(), child())
        return {
            "task": asyncio.current_task(),
            "parent": parent,
            "created": created,
            "gathered": gathered,
            "parent_after": probe(scoped, column),
        }

    out = asyncio.run(main())
    parent = check(out["parent"], out["task"])
    created = check(out["created"][0], out["created"][1], not_any_of=(parent,))
    a = check(out["gathered"][0][0], out["gathered"][0][1], not_any_of=(parent, created))
    check(out["gathered"][1][0], out["gathered"][1][1], not_any_of=(parent, created, a))
    check(out["parent_after"], out["task"], same_as=parent)


def _row_run_sync(column: str, first_in_run_sync: bool) -> None:
    """SQLAlchemy's run_sync / greenlet_spawn greenlet runs for the task: the task's session."""
    scoped = new_scoped(COLUMNS[column].kind)
    plain = async_sessionmaker()

    async def main() -> Dict[str, Any]:
        out: Dict[str, Any] = {"task": asyncio.current_task()}
        if not first_in_run_sync:
            out["before"] = probe(scoped, column)
        out["run_sync"] = await plain().run_sync(lambda _sync: probe(scoped, column))
        out["greenlet_spawn"] = await greenlet_spawn(probe, scoped, column)
        out["after"] = probe(scoped, column)
        return out

    out = asyncio.run(main())
    session = check(out["after"], out["task"])
    for name in ("before", "run_sync", "greenlet_spawn"):
        if name in out:
            check(out[name], out["task"], same_as=session)


def row_run_sync_after_the_task_used_it(column: str) -> None:
    _row_run_sync(column, first_in_run_sync=False)


def row_run_sync_first_use(column: str) -> None:
    _row_run_sync(column, first_in_run_sync=True)


def _nested_scopes(scoped: Any, column: str, outer: Any, owner_key: Any) -> None:
    """Enter a scope, a nested one, leave both: each its own session, the outer's back."""
    with greenscope.scope() as first_key:
        first = check(probe(scoped, column), first_key, not_any_of=(outer,))
        with greenscope.scope() as second_key:
            second = check(probe(scoped, column), second_key, not_any_of=(outer, first))
            check(probe(scoped, column), second_key, same_as=second)
        check(probe(scoped, column), first_key, same_as=first)
    check(probe(scoped, column), owner_key, same_as=outer)


def row_explicit_scopes_nested_and_left(column: str) -> None:
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)
    if kind == "sync":
        outer = COLUMNS[column].call(scoped)
        _nested_scopes(scoped, column, outer, greenlet.getcurrent())
        scoped.remove()

    async def main() -> None:
        task_session = COLUMNS[column].call(scoped)
        _nested_scopes(scoped, column, task_session, asyncio.current_task())
        async with greenscope.scope() as key:  # the async form
            inner = check(probe(scoped, column), key, not_any_of=(task_session,))
        check(probe(scoped, column), asyncio.current_task(), same_as=task_session)
        assert inner is not task_session

    asyncio.run(main())  # in a task, for both kinds


def row_explicit_scope_seen_from_a_child(column: str) -> None:
    """A scope belongs to whoever opened it: a child running in its context gets its own."""
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)
    if kind == "sync":
        here = greenlet.getcurrent()
        with greenscope.scope() as key:
            inner = check(probe(scoped, column), key)
            seen, glet = in_raw_greenlet(functools.partial(probe, scoped, column), here.gr_context)
            check(seen, glet, not_any_of=(inner,))

    async def main() -> Tuple[Seen, Seen, Any, Any]:
        async with greenscope.scope() as key:
            inner = probe(scoped, column)
            child, task = await in_task(functools.partial(probe, scoped, column))
            return inner, child, task, key

    inner_seen, child_seen, child_task, key = asyncio.run(main())
    inner = check(inner_seen, key)
    check(child_seen, child_task, not_any_of=(inner,))


def row_to_thread_running_a_copy_of_the_tasks_context(column: str) -> None:
    kind = COLUMNS[column].kind
    scoped = new_scoped(kind)

    def in_worker() -> Tuple[Seen, Any]:
        return probe(scoped, column), greenlet.getcurrent()

    async def main() -> Tuple[Seen, Tuple[Seen, Any], Seen, Any]:
        task_seen = probe(scoped, column)  # the task's cache is in the context to_thread copies
        worker = await asyncio.to_thread(in_worker)
        return task_seen, worker, probe(scoped, column), asyncio.current_task()

    task_seen, (worker_seen, worker_glet), after, task = asyncio.run(main())
    task_session = check(task_seen, task)
    check(after, task, same_as=task_session)
    if kind == "async":
        check_raises_outside_a_task(worker_seen)  # even with the task's cache in its context
    else:
        check(worker_seen, worker_glet, not_any_of=(task_session,))


# -- custom scopefuncs: stock semantics, compared with the stock class side by side --------


class IdentityKey:
    """A scope key without an ``__eq__`` of its own: found by identity."""


def _stock_for(kind: str, scopefunc: Callable[[], Any]) -> Any:
    if kind == "sync":
        return stock_scoped_session(sessionmaker(), scopefunc=scopefunc)
    return stock_async_scoped_session(async_sessionmaker(), scopefunc=scopefunc)


def pattern(values: List[Any]) -> List[int]:
    """Which values are the same object: the index of each value's first occurrence."""
    return [next(i for i, seen in enumerate(values) if seen is value) for value in values]


def _row_custom_scopefunc(column: str, keys: List[Any], expected: List[int]) -> None:
    kind = COLUMNS[column].kind
    current: List[Any] = [None]
    scoped = new_scoped(kind, scopefunc=lambda: current[0])
    stock = _stock_for(kind, lambda: current[0])
    ours, theirs = [], []
    for key in keys:
        current[0] = key
        ours.append(check(probe(scoped, column), key))
        theirs.append(COLUMNS[column].call(stock))
        assert COLUMNS[column].call(stock) is theirs[-1]
    assert pattern(ours) == pattern(theirs) == expected
    current[0] = keys[0]  # value keys do not depend on the caller's greenlet, as in stock
    seen, _ = in_gevent_greenlet(functools.partial(probe, scoped, column))
    check(seen, keys[0], same_as=ours[0])
    assert COLUMNS[column].call(stock) is theirs[0]


def row_custom_scopefunc_value_keys(column: str) -> None:
    """Equal int and UUID keys that are distinct objects share a session, as in stock."""
    u = uuid.uuid4()
    keys = [int("1000001"), int("1000001"), u, uuid.UUID(str(u)), ("t", 1), int("1000001")]
    assert keys[0] is not keys[1] and keys[2] is not keys[3]
    _row_custom_scopefunc(column, keys, [0, 0, 2, 2, 4, 0])


def row_custom_scopefunc_identity_keys(column: str) -> None:
    a, b = IdentityKey(), IdentityKey()
    _row_custom_scopefunc(column, [a, b, a, b], [0, 1, 0, 1])


# -- subclasses and an MRO mixin: their overrides run on every miss, as in stock -----------
#
# Each such row visits the same places with a greenscope object and its stock equivalent
# (the same class on stock SQLAlchemy, scoped by ``greenscope.current_scope``): in each place
# the first call is the greenscope copy's miss, the second its hit. ``log`` is what the
# overrides recorded.


@dataclass
class Pair:
    ours: Any
    stock: Any
    our_log: List[Any]
    stock_log: List[Any]


def _visit(pair: Pair, column: str) -> List[Tuple[Any, Any, List[Any], List[Any]]]:
    """Two calls (a miss then a hit) on both objects here: what they returned and logged."""
    call = COLUMNS[column].call
    steps = []
    for _ in range(2):
        ours_at, stock_at = len(pair.our_log), len(pair.stock_log)
        our_value, stock_value = call(pair.ours), call(pair.stock)
        steps.append((our_value, stock_value, pair.our_log[ours_at:], pair.stock_log[stock_at:]))
    return steps


def _visit_every_place(pair: Pair, column: str) -> List[Tuple[bool, List[Tuple[Any, ...]]]]:
    """Visit every place; each visit says whether it is a fresh scope (its first call a miss)."""
    visit = functools.partial(_visit, pair, column)
    visits = []
    if COLUMNS[column].kind == "sync":
        visits.append((True, visit()))  # the main greenlet
        with greenscope.scope():
            visits.append((True, visit()))
        visits.append((True, in_gevent_greenlet(visit)[0]))
        visits.append((True, in_thread(visit)[0]))

    async def main() -> None:
        visits.append((True, visit()))  # a task
        async with greenscope.scope():
            visits.append((True, visit()))
        visits.append((True, (await in_task(visit))[0]))  # a child task
        # run_sync: the task's own scope again, so both calls are hits for greenscope
        visits.append((False, await async_sessionmaker()().run_sync(lambda _s: visit())))

    asyncio.run(main())
    return visits


def _check_visits(
    visits: List[Tuple[bool, List[Tuple[Any, ...]]]], miss_rule: Callable[[Any, Any], bool]
) -> None:
    """On a miss ``miss_rule(our_log, stock_log)``; on a hit, greenscope's overrides run no more
    often than stock's; the same sessions for the same scopes as the stock twin."""
    ours, theirs = [], []
    for index, (fresh, steps) in enumerate(visits):
        (miss, miss_stock, log, stock_log), (hit, hit_stock, hit_log, stock_hit_log) = steps
        ours.append(miss)
        theirs.append(miss_stock)
        if fresh:
            assert miss_rule(log, stock_log), (
                f"visit {index}: a miss logged {log}, stock {stock_log}"
            )
        assert hit is miss and hit_stock is miss_stock
        for got, stock_got in ((hit_log, stock_hit_log),) + (() if fresh else ((log, stock_log),)):
            assert len(got) <= len(stock_got), (
                f"visit {index}: a hit logged {got}, stock {stock_got}"
            )
            assert all(entry in stock_got for entry in got)
    assert pattern(ours) == pattern(theirs)


def _stock_twin(kind: str, cls: type, log: List[Any]) -> Any:
    scoped = cls(
        sessionmaker() if kind == "sync" else async_sessionmaker(), greenscope.current_scope
    )
    scoped.log = log
    return scoped


def row_registry_subclass_overriding_lookup(column: str) -> None:
    """``_lookup`` is greenscope's miss path: a subclass's override runs once per miss."""
    kind = COLUMNS[column].kind
    log: List[Any] = []

    class Counting(WeakScopeRegistry[Any]):
        def _lookup(self) -> Any:
            value = super()._lookup()
            log.append(value)
            return value

    scoped = new_scoped(kind)
    scoped.registry = Counting(scoped.session_factory)
    scoped.registry._requires_task = kind == "async"
    stock = _stock_twin(
        kind, stock_scoped_session if kind == "sync" else stock_async_scoped_session, []
    )
    visits = _visit_every_place(Pair(scoped, stock, log, stock.log), column)
    for fresh, steps in visits:  # the stock class has no _lookup: check it ran on each miss
        (miss, _, miss_log, _), (_, _, hit_log, _) = steps
        assert miss_log == [miss] if fresh else miss_log in ([], [miss])
        assert hit_log in ([], [miss])
    _check_visits(visits, lambda ours, _stock: True)


def row_registry_subclass_overriding_call(column: str) -> None:
    """A registry subclass whose ``__call__`` calls super: runs on every miss, as in stock."""
    kind = COLUMNS[column].kind
    log: List[Any] = []
    stock_log: List[Any] = []

    class Logged(WeakScopeRegistry[Any]):
        def __call__(self) -> Any:
            log.append("registry()")
            return super().__call__()

    class StockLogged(ScopedRegistry[Any]):
        def __call__(self) -> Any:
            stock_log.append("registry()")
            return super().__call__()

    scoped = new_scoped(kind)
    scoped.registry = Logged(scoped.session_factory)
    scoped.registry._requires_task = kind == "async"
    stock = _stock_for(kind, greenscope.current_scope)
    stock.registry = StockLogged(stock.session_factory, greenscope.current_scope)
    visits = _visit_every_place(Pair(scoped, stock, log, stock_log), column)
    _check_visits(visits, lambda ours, theirs: len(ours) == len(theirs) == 1)


def _logging_subclass(base: type) -> type:
    """``base`` with ``__call__`` and ``_proxied`` overridden, both calling super."""

    class Logged(base):  # type: ignore[misc, valid-type]
        log: List[str]

        def __call__(self, **kw: Any) -> Any:
            self.log.append("__call__")
            return super().__call__(**kw)

        @property
        def _proxied(self) -> Any:
            self.log.append("_proxied")
            return super()._proxied

    return Logged


def row_session_subclass_overriding_call_and_proxied(column: str) -> None:
    """A subclass of greenscope's class: its overrides run on every call, as in stock."""
    kind = COLUMNS[column].kind
    ours_cls = _logging_subclass(
        greenscope.scoped_session if kind == "sync" else async_scoped_session
    )
    stock_cls = _logging_subclass(
        stock_scoped_session if kind == "sync" else stock_async_scoped_session
    )
    scoped = new_scoped(kind, ours_cls)
    scoped.log = []
    stock = _stock_twin(kind, stock_cls, [])
    visits = _visit_every_place(Pair(scoped, stock, scoped.log, stock.log), column)
    _check_visits(visits, lambda ours, theirs: ours == theirs)
    for _fresh, steps in visits:  # hits too: a subclass's own method is always called
        for step in steps:
            assert step[2] == step[3]


def row_mixin_between_greenscope_and_the_stock_class(column: str) -> None:
    """``class Mine(greenscope.scoped_session, Mixin)`` with ``Mixin(stock scoped_session)``:
    the MRO is Mine, greenscope's class, Mixin, the stock class. On a miss greenscope goes on
    through ``super()``, so the mixin runs exactly as in ``class StockMine(Mixin)``."""
    kind = COLUMNS[column].kind
    stock_base = stock_scoped_session if kind == "sync" else stock_async_scoped_session
    ours_base = greenscope.scoped_session if kind == "sync" else async_scoped_session
    mixin = _logging_subclass(stock_base)
    mine = type("Mine", (ours_base, mixin), {})
    stock_mine = type("StockMine", (mixin,), {})
    mro = mine.__mro__
    assert mro.index(ours_base) < mro.index(mixin) < mro.index(stock_base)
    scoped = new_scoped(kind, mine)
    scoped.log = []
    stock = _stock_twin(kind, stock_mine, [])
    visits = _visit_every_place(Pair(scoped, stock, scoped.log, stock.log), column)
    _check_visits(visits, lambda ours, theirs: ours == theirs)


# -- a gevent greenlet the hub runs while a task waits (monkeypatched: a subprocess) -------

_BYSTANDER_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import asyncio, contextvars, json, time
import gevent
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker
import greenscope
from greenscope.asyncio import async_scoped_session

COLUMNS = {
    "WeakScopeRegistry.__call__": ("sync", lambda s: s.registry()),
    "scoped_session.__call__": ("sync", lambda s: s()),
    "scoped_session._proxied": ("sync", lambda s: s._proxied),
    "async WeakScopeRegistry.__call__": ("async", lambda s: s.registry()),
    "async_scoped_session.__call__": ("async", lambda s: s()),
    "async_scoped_session._proxied": ("async", lambda s: s._proxied),
}

def probe(scoped, call):
    registry = scoped.registry
    key = registry.scopefunc()
    try:
        first = call(scoped)
    except RuntimeError as error:
        try:
            registry._lookup()
            slow = "no error"
        except RuntimeError as slow_error:
            slow = str(slow_error)
        return {"error": str(error), "slow_error": slow}
    entry = registry._find(key)
    stored = entry.value if entry is not None else None
    values = [first, call(scoped), registry._lookup(), call(scoped)]
    return {"session": id(first), "consistent": all(v is first for v in values + [stored]),
            "own_greenlet": key is gevent.getcurrent()}

out = {}
for name, (kind, call) in COLUMNS.items():
    if kind == "sync":
        scoped = greenscope.scoped_session(sessionmaker())
    else:
        scoped = async_scoped_session(async_sessionmaker())
    seen = {}

    async def main():
        mine = call(scoped)  # cached in the task's context
        context = contextvars.copy_context()
        jobs = [gevent.spawn(lambda: seen.setdefault("fresh", probe(scoped, call))),
                gevent.spawn(context.run, lambda: seen.setdefault("copy", probe(scoped, call)))]
        time.sleep(0.05)  # patched: gevent-cooperative; the hub runs the bystanders meanwhile
        gevent.joinall(jobs)
        return {"task": id(mine), "again": call(scoped) is mine,
                "key_is_task": greenscope.current_scope() is asyncio.current_task()}

    result = gevent.spawn(asyncio.run, main()).get()
    result.update(seen)
    out[name] = result
print(json.dumps(out))
"""


@functools.cache
def _bystanders() -> Dict[str, Any]:
    return run_python(_BYSTANDER_SCRIPT, timeout=60)  # type: ignore[no-any-return]


def _check_bystander(column: str, context: str) -> None:
    out = _bystanders()[column]
    assert out["again"] and out["key_is_task"]
    seen = out[context]
    if COLUMNS[column].kind == "async":
        assert OUTSIDE_A_TASK in seen.get("error", ""), seen
        assert OUTSIDE_A_TASK in seen["slow_error"], seen
    else:
        assert seen.get("consistent"), seen  # the copy agrees with the slow path
        assert seen["own_greenlet"], seen  # ... and that is the greenlet's own scope
        assert seen["session"] != out["task"], seen


def row_gevent_greenlet_run_by_the_hub_while_a_task_waits(column: str) -> None:
    """Rule 4b: the running loop is per thread; the hub's other greenlets are not the task's."""
    _check_bystander(column, "fresh")


def row_same_in_a_copy_of_the_tasks_context(column: str) -> None:
    """As above, the bystander running in a copy of the suspended task's context (which holds
    the task's cache): ``gevent.spawn(contextvars.copy_context().run, fn)``."""
    _check_bystander(column, "copy")


# -- the table -----------------------------------------------------------------------------

ROWS: Dict[str, Callable[[str], None]] = {
    "main greenlet": row_main_greenlet,
    "gevent Greenlet": row_gevent_greenlet,
    "raw greenlet": row_raw_greenlet,
    "raw greenlet sharing the parent's context": row_raw_greenlet_sharing_the_parents_context,
    "thread": row_thread,
    "thread running a copy of the context": row_thread_running_a_copy_of_the_context,
    "asyncio task": row_asyncio_task,
    "child task (create_task, gather)": row_child_task,
    "run_sync after the task used it": row_run_sync_after_the_task_used_it,
    "run_sync first use": row_run_sync_first_use,
    "explicit scopes, nested and left": row_explicit_scopes_nested_and_left,
    "explicit scope seen from a child": row_explicit_scope_seen_from_a_child,
    "to_thread in a copy of the task's context": row_to_thread_running_a_copy_of_the_tasks_context,
    "custom scopefunc, value keys": row_custom_scopefunc_value_keys,
    "custom scopefunc, identity keys": row_custom_scopefunc_identity_keys,
    "registry subclass overriding _lookup": row_registry_subclass_overriding_lookup,
    "registry subclass overriding __call__": row_registry_subclass_overriding_call,
    "session subclass overriding __call__/_proxied": (
        row_session_subclass_overriding_call_and_proxied
    ),
    "mixin between greenscope's and the stock class": (
        row_mixin_between_greenscope_and_the_stock_class
    ),
    "gevent greenlet the hub runs while a task waits": (
        row_gevent_greenlet_run_by_the_hub_while_a_task_waits
    ),
    "same, in a copy of the task's context": row_same_in_a_copy_of_the_tasks_context,
}


@pytest.mark.parametrize("column", list(COLUMNS))
@pytest.mark.parametrize("row", list(ROWS))
def test_every_hit_path_copy_gives_the_slow_paths_answer(row: str, column: str) -> None:
    ROWS[row](column)
