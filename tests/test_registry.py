"""``WeakScopeRegistry``: the ``ScopedRegistry`` protocol, weak identity-verified keys, end hooks.

No monkeypatching here (see test_gevent_patching.py); nothing needs a database server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import time
import uuid
import weakref
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Tuple

import gevent
import greenlet
import pytest
from conftest import CountingSession, collect
from greenlet._greenlet import get_pending_cleanup_count, get_total_main_greenlets
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry

import greenscope
from greenscope import WeakScopeRegistry


class Value:
    """A registry value whose ``close()`` calls are counted."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


def wait_for_thread_greenlet_cleanup(main_greenlets_before: int) -> None:
    """Wait (bounded) until greenlet has freed the main greenlets of threads that ended.

    greenlet frees a dead thread's main greenlet lazily, from a pending call in another thread
    (as greenlet's own tests do, poll its counters; this is a wait, not a timed assertion).
    """
    for _ in range(2000):
        collect()
        if get_pending_cleanup_count() == 0 and get_total_main_greenlets() <= main_greenlets_before:
            return
        time.sleep(0.001)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic collection: a dead raw greenlet is then not collected behind our back."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _in_raw_greenlet(fn: Callable[[], Any]) -> Any:
    return greenlet.greenlet(fn).switch()


# -- the ScopedRegistry protocol ------------------------------------------------------------


def test_weak_scope_registry_is_a_scoped_registry_subclass() -> None:
    assert issubclass(WeakScopeRegistry, ScopedRegistry)
    assert isinstance(WeakScopeRegistry(Value), ScopedRegistry)


@pytest.mark.parametrize("scopefunc", [None, greenlet.getcurrent], ids=["default", "getcurrent"])
def test_has_set_clear_len_with_greenlet_scopes(scopefunc: Any) -> None:
    registry = WeakScopeRegistry(Value, scopefunc)
    assert not registry.has()
    assert len(registry) == 0

    first = registry()
    assert registry() is first
    assert registry.has()
    assert len(registry) == 1

    replacement = Value()
    registry.set(replacement)
    assert registry() is replacement
    assert first.closed == 0  # set() replaces, it does not close (as in ScopedRegistry)
    assert len(registry) == 1

    registry.clear()
    assert not registry.has()
    assert len(registry) == 0
    assert replacement.closed == 0  # clear() forgets, it does not close (as in ScopedRegistry)

    registry.clear()  # clearing an empty scope is fine
    assert registry() is not replacement


def test_set_before_any_call_stores_the_value() -> None:
    registry = WeakScopeRegistry(Value)
    value = Value()
    registry.set(value)
    assert registry.has()
    assert registry() is value
    registry.clear()


@pytest.mark.parametrize("keys", [[1, 2, 3], ["a", "b", "c"]], ids=["ints", "strings"])
def test_custom_scopefunc_returning_non_weakrefable_keys_kept_strongly(keys: List[Any]) -> None:
    current: List[Any] = [keys[0]]
    registry = WeakScopeRegistry(Value, lambda: current[0])
    values = {}
    for key in keys:
        current[0] = key
        assert not registry.has()
        values[key] = registry()
    assert len(registry) == len(keys)
    assert len({id(v) for v in values.values()}) == len(keys)

    collect()
    for key in keys:  # kept strongly, exactly like ScopedRegistry
        current[0] = key
        assert registry.has()
        assert registry() is values[key]

    current[0] = keys[1]
    registry.clear()
    assert len(registry) == len(keys) - 1
    registry.set(values[keys[1]])
    assert registry() is values[keys[1]]


def test_scopefunc_getcurrent_gives_each_greenlet_its_own_value() -> None:
    registry = WeakScopeRegistry(Value, greenlet.getcurrent)
    mine = registry()
    seen: List[Any] = []

    def child() -> None:
        seen.append((registry.has(), registry(), registry()))

    greenlet.greenlet(child).switch()
    has_before, theirs, again = seen[0]
    assert has_before is False
    assert theirs is again
    assert theirs is not mine
    assert registry() is mine


def test_default_scope_is_current_scope() -> None:
    registry = WeakScopeRegistry(Value)
    assert registry.scopefunc is greenscope.current_scope


def test_key_with_reused_id_never_returns_the_dead_keys_value() -> None:
    """A new key object with the id of a dead one must not get the dead key's value."""

    class Key:
        pass

    holder: List[Any] = [Key()]
    registry = WeakScopeRegistry(Value, lambda: holder[0])
    tagged: List[Value] = []
    inherited = 0
    for _ in range(2000):
        value = registry()
        if getattr(value, "owner", None) is not None:
            inherited += 1
        value.owner = object()  # type: ignore[attr-defined]
        tagged.append(value)  # keep every value alive: their ids are never reused
        holder[0] = None  # the old key dies first, so the new one can take its address at once
        holder[0] = Key()
    assert inherited == 0
    # the test is only meaningful if ids really were reused
    assert len(registry) <= 1


def test_reused_id_check_is_meaningful_stock_id_keyed_registry_inherits() -> None:
    """The same loop on a stock ScopedRegistry keyed on id(): dead keys' values are inherited."""

    class Key:
        pass

    holder: List[Any] = [Key()]
    registry: ScopedRegistry[Value] = ScopedRegistry(Value, lambda: id(holder[0]))
    inherited = 0
    for _ in range(2000):
        value = registry()
        if getattr(value, "owner", None) is not None:
            inherited += 1
        value.owner = object()  # type: ignore[attr-defined]
        holder[0] = None  # free the old key first: the new one takes its address (on 3.9 too)
        holder[0] = Key()
    assert inherited > 1000


def test_registry_garbage_collected_does_not_keep_values_alive() -> None:
    registry = WeakScopeRegistry(Value)
    value_ref = weakref.ref(registry())
    registry_ref = weakref.ref(registry)
    del registry
    collect()
    assert registry_ref() is None
    assert value_ref() is None


def test_registry_garbage_collected_with_getcurrent_scopefunc_does_not_keep_values_alive() -> None:
    registry = WeakScopeRegistry(Value, greenlet.getcurrent)
    value_ref = weakref.ref(registry())
    del registry
    collect()
    assert value_ref() is None


def test_registry_garbage_collected_does_not_keep_sessions_alive(sqlite_engine: Engine) -> None:
    registry = WeakScopeRegistry(sessionmaker(sqlite_engine))
    session = registry()
    session.execute(text("select 1"))
    session_ref = weakref.ref(session)
    del session, registry
    collect()
    assert session_ref() is None
    assert sqlite_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_nested_explicit_scope_gets_its_own_value_and_outer_is_kept() -> None:
    registry = WeakScopeRegistry(Value)
    outer = registry()
    with greenscope.scope():
        inner = registry()
        assert inner is not outer
        assert registry() is inner
        with greenscope.scope():
            innermost = registry()
            assert innermost is not inner
        assert innermost.closed == 1
        assert registry() is inner
        assert inner.closed == 0
    assert inner.closed == 1
    assert registry() is outer
    assert outer.closed == 0
    assert len(registry) == 1
    registry.clear()


# -- end hooks: raw greenlets, gevent greenlets, threads -------------------------------------


def test_entries_of_dead_raw_greenlets_gone_after_gc_collect_and_closed_by_the_hub() -> None:
    gevent.get_hub()  # this thread has a hub: it is the raw greenlets' home
    registry = WeakScopeRegistry(Value)
    with gc_paused():  # no automatic collection (and closing) before we look
        values = [_in_raw_greenlet(registry) for _ in range(20)]
        assert all(v.closed == 0 for v in values)
    collect()
    assert len(registry) == 0
    assert registry.ended_without_remove == 20
    assert all(v.closed == 0 for v in values)  # queued: never closed inside the GC
    gevent.sleep(0)  # this thread has a hub: its closer greenlet closes them, no registry use
    assert [v.closed for v in values] == [1] * 20


def test_sessions_of_dead_raw_greenlets_closed_without_any_later_registry_use(
    sqlite_engine: Engine,
) -> None:
    gevent.get_hub()  # this thread has a hub: it is the raw greenlets' home
    registry = WeakScopeRegistry(sessionmaker(sqlite_engine, class_=CountingSession))

    def work() -> CountingSession:
        session = registry()
        session.execute(text("select 1"))  # holds a pooled connection
        assert session.in_transaction()
        return session

    with gc_paused():
        sessions = [_in_raw_greenlet(work) for _ in range(5)]
        assert sqlite_engine.pool.checkedout() == 5  # type: ignore[attr-defined]
    collect()
    assert len(registry) == 0
    assert [s.close_calls for s in sessions] == [0] * 5  # not inside the GC
    gevent.sleep(0)  # the hub's closer
    assert [s.close_calls for s in sessions] == [1] * 5
    assert not any(s.in_transaction() for s in sessions)
    assert sqlite_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_session_closed_when_gevent_greenlet_finishes_while_still_referenced(
    sqlite_engine: Engine,
) -> None:
    registry = WeakScopeRegistry(sessionmaker(sqlite_engine, class_=CountingSession))

    def work() -> CountingSession:
        session = registry()
        session.execute(text("select 1"))
        return session

    jobs = [gevent.spawn(work) for _ in range(10)]
    gevent.joinall(jobs, raise_error=True)
    sessions = [job.value for job in jobs]
    gevent.sleep(0)  # the hub runs the links; the closer greenlet runs
    assert len(registry) == 0
    assert [s.close_calls for s in sessions] == [1] * 10
    assert sqlite_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert registry.ended_without_remove == 10
    assert all(job.dead for job in jobs)  # still referenced the whole time


def test_gevent_greenlet_that_removed_its_session_is_not_closed_twice(
    sqlite_engine: Engine,
) -> None:
    scoped = greenscope.scoped_session(sessionmaker(sqlite_engine, class_=CountingSession))

    def work() -> CountingSession:
        session = scoped()
        scoped.remove()
        return session

    job = gevent.spawn(work)
    session = job.get()
    gevent.sleep(0)
    assert session.close_calls == 1
    assert scoped.registry.ended_without_remove == 0


def test_thread_entry_gone_after_thread_ends_and_session_closed_on_next_use(
    sqlite_engine: Engine,
) -> None:
    registry = WeakScopeRegistry(sessionmaker(sqlite_engine, class_=CountingSession))
    seen: List[CountingSession] = []

    def work() -> None:
        session = registry()
        session.execute(text("select 1"))
        seen.append(session)

    main_greenlets = get_total_main_greenlets()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    del threads
    wait_for_thread_greenlet_cleanup(main_greenlets)
    assert len(registry) == 0
    # an ended thread's session is parked; any later registry() call closes it (threads that
    # ran after it may already have), exactly once
    registry()
    assert [s.close_calls for s in seen] == [1] * 4
    assert sqlite_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    registry.clear()


def test_close_error_is_logged_not_raised_into_the_next_user(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Value):
        def close(self) -> None:
            raise RuntimeError("boom while closing")

    registry = WeakScopeRegistry(Broken)
    _in_raw_greenlet(registry)
    collect()
    with caplog.at_level("ERROR", logger="greenscope"):
        gevent.sleep(0)  # the closer greenlet closes it: the error must not reach anyone
        registry()
    assert "boom while closing" in caplog.text
    registry.clear()


# -- the strict leak idiom (asgiref) ------------------------------------------------------


@pytest.fixture
def no_cycles() -> Iterator[None]:
    """Run the test body with the GC off and assert it created no cyclic garbage."""
    collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
        gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage]
        assert garbage == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize(
    "scopefunc", [None, greenlet.getcurrent, lambda: 42], ids=["default", "getcurrent", "int"]
)
def test_create_and_clear_leaves_no_cyclic_garbage(scopefunc: Any, no_cycles: None) -> None:
    registry = WeakScopeRegistry(Value, scopefunc)
    for _ in range(50):
        registry()
        registry.clear()
    assert len(registry) == 0


def _use_in_gevent_greenlet(registry: WeakScopeRegistry[Any], remove: bool) -> None:
    def work() -> None:
        registry()
        if remove:
            registry.clear()

    gevent.spawn(work).join()
    gevent.sleep(0)  # links
    gevent.sleep(0)  # closer greenlet


def test_gevent_greenlets_ending_without_remove_leave_no_cyclic_garbage() -> None:
    registry = WeakScopeRegistry(Value)
    _use_in_gevent_greenlet(registry, remove=False)  # warm up: hub, closer machinery
    collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            _use_in_gevent_greenlet(registry, remove=False)
        _use_in_gevent_greenlet(registry, remove=True)
        gc.collect()
        assert [type(o).__name__ for o in gc.garbage] == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert len(registry) == 0


def test_raw_greenlets_that_clear_leave_no_cyclic_garbage(no_cycles: None) -> None:
    registry = WeakScopeRegistry(Value)

    def work() -> None:
        registry()
        registry.clear()

    for _ in range(20):
        _in_raw_greenlet(work)
    assert len(registry) == 0


class WhereClosed:
    """Records, at each close(), whether the GC was running and whether it ran in the hub."""

    in_gc = False
    log: ClassVar[List[Tuple[bool, bool]]] = []

    def close(self) -> None:
        hub = gevent.get_hub()
        WhereClosed.log.append((WhereClosed.in_gc, greenlet.getcurrent() is hub))


def _gc_phase(phase: str, info: Dict[str, Any]) -> None:
    WhereClosed.in_gc = phase == "start"


def test_close_never_runs_inside_the_gc_or_the_hub() -> None:
    """DESIGN rule 3: end hooks only drop entries; Session.close() (I/O) runs elsewhere."""
    WhereClosed.log = []
    registry = WeakScopeRegistry(WhereClosed)
    gc.callbacks.append(_gc_phase)
    try:
        for _ in range(5):
            _in_raw_greenlet(registry)  # ends -> weakref callback, possibly inside the GC
        jobs = [gevent.spawn(registry) for _ in range(5)]  # ends -> rawlink, in the hub
        gevent.joinall(jobs)
        gevent.sleep(0)
        gevent.sleep(0)
        collect()
        gevent.sleep(0)  # the closer greenlet of the raw greenlets' values
    finally:
        gc.callbacks.remove(_gc_phase)
        WhereClosed.in_gc = False
    assert len(WhereClosed.log) == 10
    assert WhereClosed.log == [(False, False)] * 10
    registry.clear()


class _Closes:
    closed: ClassVar[List[Any]] = []

    def close(self) -> None:
        _Closes.closed.append(self)


def test_registry_dropped_by_its_user_still_closes_a_value_when_its_greenlet_ends() -> None:
    import gevent.event

    _Closes.closed.clear()
    holder = [WeakScopeRegistry(_Closes)]
    registry_ref = weakref.ref(holder[0])
    release = gevent.event.Event()

    def work() -> None:
        holder[0]()
        release.wait()

    glet = gevent.spawn(work)
    gevent.sleep(0)
    holder.clear()
    collect()
    assert registry_ref() is not None  # the greenlet's end hook keeps it until the greenlet ends
    release.set()
    glet.join()
    gevent.sleep(0)
    gevent.sleep(0)
    assert len(_Closes.closed) == 1
    del glet
    collect()
    assert registry_ref() is None


def test_registry_dropped_by_its_user_still_closes_a_value_when_its_scope_ends() -> None:
    _Closes.closed.clear()
    with greenscope.scope():
        registry = WeakScopeRegistry(_Closes)
        registry()
        registry_ref = weakref.ref(registry)
        del registry
        collect()
    assert len(_Closes.closed) == 1
    collect()
    assert registry_ref() is None


# -- custom scopefuncs: value keys by equality, as stock (issue 11, item 6) ----------------


@dataclasses.dataclass(frozen=True)
class RequestKey:
    request_id: int


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: uuid.UUID(int=7),
        lambda: RequestKey(7),
        lambda: (uuid.UUID(int=7), RequestKey(7)),
    ],
    ids=["uuid", "frozen-dataclass", "tuple"],
)
def test_equal_but_not_identical_keys_find_the_same_session_exactly_as_stock(
    make_key: Callable[[], Any], sqlite_engine: Engine
) -> None:
    """0.1 keyed by identity: ``S() is S()`` was False and ``S.add(x); S.commit()`` committed
    nothing, breaking the drop-in promise."""
    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql("create table if not exists items (id integer primary key)")
    results = {}
    for name, cls in (("stock", scoped_session), ("greenscope", greenscope.scoped_session)):
        scoped = cls(sessionmaker(sqlite_engine), scopefunc=make_key)
        same = scoped() is scoped()
        scoped.execute(text("insert into items default values"))
        scoped.commit()
        with sqlite_engine.connect() as conn:
            count = conn.execute(text("select count(*) from items")).scalar()
        has = scoped.registry.has()
        scoped.remove()
        results[name] = (same, count, has, scoped.registry.has())
        with sqlite_engine.begin() as conn:
            conn.exec_driver_sql("delete from items")
    assert results["greenscope"] == results["stock"] == (True, 1, True, False)


def test_identity_keys_still_never_inherit_a_dead_keys_session_by_a_reused_id() -> None:
    registry = WeakScopeRegistry(Value, scopefunc=lambda: holder[0])
    holder: List[Any] = [object()]
    first = registry()
    inherited = 0
    for _ in range(2000):
        holder[0] = object()  # the old key dies; the new one very likely gets its address
        if registry() is first:
            inherited += 1
    assert inherited == 0


# -- a key whose attribute access raises (issue 11, item 8) --------------------------------


class ExplodingKey:
    """A scope key whose every attribute lookup fails (a buggy proxy object)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no attribute {name} for you")


class RefusingGreenlet(gevent.Greenlet):  # type: ignore[misc]
    """A Greenlet whose end hook cannot be added."""

    def rawlink(self, callback: Any) -> None:
        raise RuntimeError("no attribute rawlink for you")


def test_a_key_whose_attribute_access_raises_is_an_ordinary_identity_key() -> None:
    """0.1 looked the end hook up on the key itself (``getattr(key, "rawlink")``) and stored
    the entry before that failed; hooks are chosen by the key's type now."""
    key = ExplodingKey()
    registry = WeakScopeRegistry(Value, scopefunc=lambda: key)
    assert registry() is registry()
    assert len(registry) == 1
    registry.clear()
    assert len(registry) == 0


def test_nothing_is_stored_when_storing_fails_and_the_value_made_is_closed() -> None:
    """0.1 stored the entry before the failure: the next call returned what the failed call
    had created."""
    key = RefusingGreenlet()
    made: List[Value] = []

    def create() -> Value:
        made.append(Value())
        return made[-1]

    registry = WeakScopeRegistry(create, scopefunc=lambda: key)
    with pytest.raises(RuntimeError, match="no attribute"):
        registry()
    assert len(registry) == 0
    assert made[0].closed == 1
    with pytest.raises(RuntimeError, match="no attribute"):
        registry()
    assert len(made) == 2 and len(registry) == 0
