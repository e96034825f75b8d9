"""The inlined hit paths (``WeakScopeRegistry.__call__``, ``scoped_session.__call__``/``_proxied``,
``async_scoped_session.__call__``/``_proxied``) keep every check of the slow path.

Each test pins a case where a cache hit would be wrong if one check were dropped for speed
(bench/micro.py measures the speed; docs/performance.md explains the checks).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
from typing import Any, Dict, List

import gevent
import greenlet
import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import greenscope
from greenscope.asyncio import async_scoped_session
from greenscope.registry import WeakScopeRegistry, _all_registries


class Value:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


ENTRY_POINTS = {
    "call": lambda scoped: scoped().info,
    "proxied": lambda scoped: scoped.info,
    "registry": lambda scoped: scoped.registry().info,
}


@pytest.fixture
def scoped() -> Any:
    scoped = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    yield scoped
    scoped.remove()


def test_value_of_a_collected_key_is_closed_while_the_callers_session_stays_cached() -> None:
    """The hot path no longer pays for values waiting to be closed: they go to their home's
    closer (here this thread's hub), never to "the registry's next use"."""
    registry = WeakScopeRegistry(Value)
    mine = registry()  # cached for this context: the next call is a hit
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        glet = greenlet.greenlet(registry)
        ended = glet.switch()
        del glet
    finally:
        if was_enabled:
            gc.enable()
    gc.collect()  # the raw greenlet's key is collected: its value is queued, not closed here
    assert ended.closed == 0
    gevent.sleep(0)  # the hub's closer greenlet
    assert ended.closed == 1
    assert registry() is mine and mine.closed == 0
    registry.clear()


@pytest.mark.parametrize("entry", ["call", "proxied", "registry"])
def test_session_cached_in_a_greenlet_is_not_returned_inside_a_task_it_starts(
    scoped: Any, entry: str
) -> None:
    outer = scoped()
    seen: List[Any] = []

    async def task() -> None:
        seen.append(ENTRY_POINTS[entry](scoped))  # the task's first use
        seen.append(scoped().info)

    asyncio.run(task())  # the task runs in a copy of this context, in this greenlet
    assert seen[0] is not outer.info
    assert seen[0] is seen[1]
    assert scoped() is outer


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_session_cached_in_a_context_is_not_returned_in_a_thread_running_a_copy(
    scoped: Any, entry: str
) -> None:
    outer = scoped()
    context = contextvars.copy_context()  # holds this greenlet's cached entry
    seen: List[Any] = []

    def in_thread() -> None:
        seen.append(context.run(ENTRY_POINTS[entry], scoped))  # the first use in the thread
        context.run(scoped.remove)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen[0] is not outer.info


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_greenlet_sharing_a_context_object_gets_its_own_session(scoped: Any, entry: str) -> None:
    outer = scoped()
    here = greenlet.getcurrent()
    glet = greenlet.greenlet(lambda: ENTRY_POINTS[entry](scoped))
    glet.gr_context = here.gr_context  # the same Context object, as greenlet_spawn does
    assert glet.switch() is not outer.info


def test_explicit_scope_hides_the_cached_session_from_every_entry_point(scoped: Any) -> None:
    outer = scoped()
    with greenscope.scope():
        inner = scoped()
        assert inner is not outer
        assert scoped.info is inner.info
        assert scoped.registry() is inner
    assert scoped() is outer
    assert scoped.info is outer.info


def test_session_call_with_arguments_keeps_the_stock_rules(scoped: Any) -> None:
    first = scoped(autoflush=False)
    assert first.autoflush is False
    with pytest.raises(InvalidRequestError, match="already present"):
        scoped(autoflush=True)
    assert scoped() is first


def test_registry_swapped_in_by_hand_is_still_used_by_every_entry_point() -> None:
    from sqlalchemy.util import ScopedRegistry

    scoped = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    scoped.registry = ScopedRegistry(Session, greenlet.getcurrent)  # type: ignore[assignment]
    session = scoped()
    assert scoped() is session
    assert scoped.info is session.info
    scoped.remove()


def test_custom_int_and_unhashable_scope_keys_behave_as_in_scoped_registry() -> None:
    registry = WeakScopeRegistry(Value, scopefunc=lambda: 7)
    value = registry()
    assert registry() is value
    assert len(registry) == 1
    registry.clear()
    unhashable = WeakScopeRegistry(Value, scopefunc=lambda: [1])
    with pytest.raises(TypeError, match="unhashable scope key"):
        unhashable()


def test_each_gevent_greenlet_gets_its_own_session_through_every_entry_point(
    scoped: Any,
) -> None:
    outer = scoped()

    def work() -> List[Any]:
        return [scoped(), scoped(), scoped.info, scoped.registry()]

    results = [job.get() for job in [gevent.spawn(work) for _ in range(5)]]
    sessions = [r[0] for r in results]
    assert len({id(s) for s in sessions}) == 5
    assert outer not in sessions
    for session, again, info, registered in results:
        assert again is session and registered is session and info is session.info


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_async_session_of_a_task_is_not_its_child_tasks(entry: str) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    scoped = async_scoped_session(async_sessionmaker(engine))

    async def child() -> Any:
        first = ENTRY_POINTS[entry](scoped)  # the child's first use, in a copy of the context
        return first, scoped().info

    async def main() -> Dict[str, Any]:
        parent = scoped()
        first, child_info = await asyncio.create_task(child())
        out = {"parent": parent.info, "again": scoped().info, "first": first, "child": child_info}
        await scoped.remove()
        await engine.dispose()
        return out

    seen = asyncio.run(main())
    assert seen["first"] is not seen["parent"]
    assert seen["first"] is seen["child"]
    assert seen["again"] is seen["parent"]


def test_registry_set_iterates_as_a_snapshot_while_registries_come_and_go() -> None:
    keep = [WeakScopeRegistry(Value) for _ in range(3)]
    seen = []
    for registry in _all_registries:  # a registry collected or created meanwhile is harmless
        seen.append(registry)
        WeakScopeRegistry(Value)  # created and dropped during the iteration
        gc.collect()
    assert all(r in seen for r in keep)
    assert all(isinstance(r, WeakScopeRegistry) for r in seen)
