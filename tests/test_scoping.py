"""``greenscope.current_scope()``: the right scope key in threads, raw greenlets, gevent greenlets
(unpatched here; patched in test_gevent_patching.py), asyncio tasks and explicit scopes.

Each thread/greenlet/task records what it saw; the assertions run in the test itself.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Tuple

import gevent
import greenlet

import greenscope
from greenscope import current_scope


def test_current_scope_is_the_current_greenlet_outside_any_scope() -> None:
    assert current_scope() is greenlet.getcurrent()
    assert current_scope() is current_scope()


def test_current_scope_in_plain_threads_is_each_threads_main_greenlet() -> None:
    seen: List[Tuple[Any, Any]] = []

    def work() -> None:
        seen.append((current_scope(), greenlet.getcurrent()))

    threads = [threading.Thread(target=work) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 5
    assert all(scope is glet for scope, glet in seen)
    scopes = [scope for scope, _ in seen] + [current_scope()]
    assert len({id(s) for s in scopes}) == 6  # all still referenced by `seen`: ids are distinct


def test_current_scope_in_raw_greenlets_is_that_greenlet() -> None:
    seen: List[Tuple[Any, Any]] = []
    main = greenlet.getcurrent()

    def child() -> None:
        seen.append((current_scope(), greenlet.getcurrent()))
        main.switch()  # suspend, come back later
        seen.append((current_scope(), greenlet.getcurrent()))

    children = [greenlet.greenlet(child) for _ in range(3)]
    for glet in children:
        glet.switch()
    for glet in children:
        glet.switch()
    assert [scope for scope, _ in seen] == children + children
    assert all(scope is glet for scope, glet in seen)


def test_current_scope_in_unpatched_gevent_greenlets_is_that_greenlet() -> None:
    def child() -> Tuple[Any, Any]:
        first = current_scope()
        gevent.sleep(0.001)
        return first, current_scope()

    jobs = [gevent.spawn(child) for _ in range(20)]
    gevent.joinall(jobs, raise_error=True)
    for job in jobs:
        first, later = job.value
        assert first is job
        assert later is job


def test_current_scope_inside_explicit_scope_is_the_scope_key_and_restored_after() -> None:
    with greenscope.scope() as outer:
        assert current_scope() is outer
        with greenscope.scope() as inner:
            assert current_scope() is inner
            assert inner is not outer
        assert current_scope() is outer
    assert current_scope() is greenlet.getcurrent()


def test_child_greenlet_does_not_inherit_its_parents_explicit_scope() -> None:
    seen: List[Any] = []
    with greenscope.scope() as key:
        glet = greenlet.greenlet(lambda: seen.append(current_scope()))
        glet.switch()
        job = gevent.spawn(current_scope)
        job.join()
    assert seen[0] is glet
    assert job.value is job
    assert key not in (seen[0], job.value)


def test_current_scope_in_asyncio_task_is_the_task_and_children_get_their_own() -> None:
    async def child() -> Any:
        return current_scope(), asyncio.current_task()

    async def main() -> Tuple[Any, Any, List[Tuple[Any, Any]]]:
        with greenscope.scope() as key:
            inside = current_scope()
            children = await asyncio.gather(*(asyncio.ensure_future(child()) for _ in range(3)))
        return key, inside, list(children)

    key, inside, children = asyncio.run(main())
    assert inside is key
    for scope, task in children:
        assert scope is task  # copied context, but the parent's scope is not theirs
        assert scope is not key
    assert len({id(task) for _, task in children}) == 3
