"""``greenscope.scoped_session``: one Session per greenlet/thread, never shared, never inherited,
closed when its scope ends; bad input fails clearly and leaves nothing behind.

Unpatched gevent, raw greenlets and plain threads run in this process (monkeypatched scenarios
are in test_gevent_patching.py). Sessions are tagged through ``session.info`` with a token unique
to the greenlet that first used them, so "received a session another greenlet used" is checked
by identity of the tag, never by ``id()`` (ids are reused).
"""

from __future__ import annotations

import contextvars
import gc
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from typing import Any, Dict, Iterator, List, Tuple

import gevent
import greenlet
import pytest
from conftest import CountingSession, collect
from greenlet._greenlet import get_pending_cleanup_count, get_total_main_greenlets
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as stock_scoped_session
from sqlalchemy.pool import NullPool

import greenscope
from greenscope import registry as registry_module


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'session.db'}")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def Scoped(engine: Engine) -> greenscope.scoped_session[CountingSession]:
    return greenscope.scoped_session(sessionmaker(engine, class_=CountingSession))


def _stable_session(scoped: Any, pause: Any) -> Tuple[Session, bool]:
    """Call ``scoped()`` a few times with pauses: (the session, whether it never changed)."""
    first = scoped()
    stable = True
    for _ in range(3):
        pause()
        stable = stable and scoped() is first
    stable = stable and scoped.execute(text("select 1")).scalar() == 1
    return first, stable


# -- one session each, none shared --------------------------------------------------------


@pytest.fixture
def Unpooled(tmp_path: Any) -> Iterator[Any]:
    """NullPool: many sessions at once, unpatched (a QueuePool wait would block the thread)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'nullpool.db'}", poolclass=NullPool)
    try:
        yield greenscope.scoped_session(sessionmaker(engine))
    finally:
        engine.dispose()


def test_unpatched_gevent_greenlets_get_one_session_each(Unpooled: Any) -> None:
    Scoped = Unpooled
    jobs = [gevent.spawn(_stable_session, Scoped, lambda: gevent.sleep(0.001)) for _ in range(500)]
    gevent.joinall(jobs, raise_error=True)
    sessions = [job.value[0] for job in jobs]  # all referenced: ids are distinct iff distinct
    assert all(job.value[1] for job in jobs)
    assert len({id(s) for s in sessions}) == 500
    assert Scoped() not in sessions
    gevent.sleep(0)
    assert len(Scoped.registry) == 1  # only this test's own (main greenlet) session
    Scoped.remove()


def test_raw_greenlets_get_one_session_each(Unpooled: Any) -> None:
    Scoped = Unpooled
    main = greenlet.getcurrent()
    children = [greenlet.greenlet(lambda: _stable_session(Scoped, main.switch)) for _ in range(50)]
    results: List[Any] = [None] * len(children)
    for _ in range(4):  # interleave: every child is suspended while the others run
        for n, child in enumerate(children):
            results[n] = child.switch()
    assert all(child.dead for child in children)
    assert all(stable for _, stable in results)
    sessions = [session for session, _ in results]
    assert len({id(s) for s in sessions}) == 50
    assert Scoped() not in sessions
    Scoped.remove()


def test_plain_threads_get_one_session_each(Unpooled: Any) -> None:
    Scoped = Unpooled
    results: List[Tuple[Session, bool]] = []
    barrier = threading.Barrier(8)

    def pause() -> None:
        barrier.wait()  # every thread holds its session at the same time
        time.sleep(0.001)

    def work() -> None:
        results.append(_stable_session(Scoped, pause))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(stable for _, stable in results)
    sessions = [session for session, _ in results]
    assert len({id(s) for s in sessions}) == 8
    assert Scoped() not in sessions
    Scoped.remove()


# -- never inherited: 10,000 sequential greenlets without remove() --------------------------


def _count_inherited(scoped: Any, run_one: Any, n: int) -> Tuple[int, int]:
    """Run ``n`` greenlets one after the other; each tags its session with a fresh token.

    Returns (greenlets whose session already carried another greenlet's tag, distinct tags).
    """
    inherited = 0
    tokens = set()

    def handler(token: object) -> None:
        nonlocal inherited
        session = scoped()
        owner = session.info.get("owner")
        if owner is not None and owner is not token:
            inherited += 1
        session.info["owner"] = token
        tokens.add(id(token))

    for _ in range(n):
        run_one(handler, object())
    return inherited, len(tokens)


def _raw(handler: Any, token: object) -> None:
    greenlet.greenlet(handler).switch(token)


def _gevent(handler: Any, token: object) -> None:
    gevent.spawn(handler, token).join()


@pytest.mark.parametrize("run_one", [_raw, _gevent], ids=["raw-greenlets", "gevent-greenlets"])
def test_ten_thousand_sequential_greenlets_never_receive_another_greenlets_session(
    engine: Engine, run_one: Any
) -> None:
    scoped = greenscope.scoped_session(sessionmaker(engine))
    inherited, _ = _count_inherited(scoped, run_one, 10_000)
    assert inherited == 0
    gevent.sleep(0)
    collect()
    assert len(scoped.registry) == 0
    assert scoped.registry.ended_without_remove == 10_000


def test_id_keyed_stock_scopefunc_hands_dead_greenlets_sessions_to_new_ones(
    engine: Engine,
) -> None:
    """The failure greenscope fixes (Flask-SQLAlchemy 3 keys on ``id()``): the check can bite."""
    stock = stock_scoped_session(sessionmaker(engine), lambda: id(greenlet.getcurrent()))
    inherited, _ = _count_inherited(stock, _raw, 10_000)
    assert inherited > 5_000


# -- closed when the scope ends -----------------------------------------------------------


def test_sessions_of_raw_greenlets_that_die_closed_by_their_threads_hub_without_registry_use(
    Scoped: Any, engine: Engine
) -> None:
    gevent.get_hub()  # this thread has a hub: the raw greenlets' home

    def work() -> CountingSession:
        Scoped.execute(text("select 1"))  # holds a pooled connection, no remove()
        return Scoped()  # type: ignore[no-any-return]

    # The GC is paused so that it cannot collect a dead greenlet before the assertions below.
    gc.disable()
    try:
        sessions = [greenlet.greenlet(work).switch() for _ in range(5)]
        assert engine.pool.checkedout() == 5  # type: ignore[attr-defined]
        assert [s.close_calls for s in sessions] == [0] * 5
    finally:
        gc.enable()
    collect()
    assert len(Scoped.registry) == 0
    assert [s.close_calls for s in sessions] == [0] * 5  # never closed inside the GC
    gevent.sleep(0)  # the hub runs its closer greenlet: no registry use is needed
    assert [s.close_calls for s in sessions] == [1] * 5
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    Scoped.remove()


def test_session_closed_when_gevent_greenlet_finishes_while_still_referenced(
    Scoped: Any, engine: Engine
) -> None:
    def work() -> CountingSession:
        Scoped.execute(text("select 1"))
        return Scoped()  # type: ignore[no-any-return]

    job = gevent.spawn(work)
    session = job.get()
    assert session.close_calls == 0
    gevent.sleep(0)  # the hub runs the finished greenlet's links: the entry is dropped
    assert len(Scoped.registry) == 0
    gevent.sleep(0)  # the closer greenlet spawned by the link runs
    assert session.close_calls == 1
    assert not session.in_transaction()
    assert len(Scoped.registry) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert job.dead  # referenced by `job` all along


def test_plain_thread_session_gone_after_thread_ends_and_closed_on_next_use(
    Scoped: Any, engine: Engine
) -> None:
    seen: List[CountingSession] = []

    def work() -> None:
        Scoped.execute(text("select 1"))
        seen.append(Scoped())

    before = get_total_main_greenlets()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    del thread
    for _ in range(2000):  # greenlet frees a dead thread's main greenlet lazily: bounded wait
        collect()
        if get_pending_cleanup_count() == 0 and get_total_main_greenlets() <= before:
            break
        time.sleep(0.001)
    assert len(Scoped.registry) == 0
    assert seen[0].close_calls == 1  # closed by the ending thread itself, before join() returned
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_remove_closes_and_forgets_the_current_session(Scoped: Any) -> None:
    session = Scoped()
    Scoped.remove()
    assert session.close_calls == 1
    assert len(Scoped.registry) == 0
    assert Scoped() is not session
    Scoped.remove()
    assert Scoped.registry.ended_without_remove == 0


# -- bad input --------------------------------------------------------------------------


class _EqualityOnly:
    """Weakly referenceable but unhashable (``__eq__`` without ``__hash__``)."""

    def __eq__(self, other: object) -> bool:
        return self is other


@pytest.mark.parametrize(
    "make_key", [lambda: ["not", "hashable"], _EqualityOnly], ids=["list", "eq-without-hash"]
)
def test_unhashable_scope_key_raises_a_clear_type_error(engine: Engine, make_key: Any) -> None:
    scoped = greenscope.scoped_session(sessionmaker(engine), scopefunc=make_key)
    for call in (scoped, scoped.registry.has, lambda: scoped(bind=engine)):
        with pytest.raises(TypeError, match=r"unhashable scope key .*must be hashable"):
            call()
    with pytest.raises(TypeError, match="unhashable scope key"):
        scoped.execute(text("select 1"))
    assert len(scoped.registry) == 0


def test_keyword_arguments_when_a_session_exists_raise_invalid_request_error(
    engine: Engine,
) -> None:
    scoped = greenscope.scoped_session(sessionmaker(engine))
    session = scoped()
    with pytest.raises(exc.InvalidRequestError, match="Scoped session is already present"):
        scoped(autoflush=False)
    assert scoped() is session
    assert session.autoflush is True
    assert len(scoped.registry) == 1  # nothing new was stored
    scoped.remove()
    assert len(scoped.registry) == 0


def test_keyword_arguments_without_a_session_create_it_with_them(engine: Engine) -> None:
    scoped = greenscope.scoped_session(sessionmaker(engine))
    session = scoped(autoflush=False)
    assert session.autoflush is False
    assert scoped() is session
    scoped.remove()
    assert len(scoped.registry) == 0


@pytest.mark.parametrize(
    "factory",
    [
        lambda: async_sessionmaker(),
        lambda: sessionmaker(class_=AsyncSession),
        lambda: AsyncSession,
    ],
    ids=["async_sessionmaker", "sessionmaker-class_-AsyncSession", "AsyncSession-class"],
)
def test_async_session_factory_raises_type_error_naming_the_async_class(factory: Any) -> None:
    registries_before = len(registry_module._all_registries)
    with pytest.raises(TypeError, match=r"greenscope\.asyncio\.async_scoped_session"):
        greenscope.scoped_session(factory())
    collect()
    assert len(registry_module._all_registries) <= registries_before  # no registry left behind


def test_scoped_session_is_a_stock_subclass_and_keeps_its_session_factory(engine: Engine) -> None:
    factory = sessionmaker(engine)
    scoped = greenscope.scoped_session(factory)
    assert isinstance(scoped, stock_scoped_session)
    assert scoped.session_factory is factory
    assert isinstance(scoped.registry, greenscope.WeakScopeRegistry)


def test_session_dropped_by_registry_is_freed_after_greenlet_ends(engine: Engine) -> None:
    """No hidden strong reference: the Session of a finished greenlet can be collected."""
    scoped = greenscope.scoped_session(sessionmaker(engine))
    refs: Dict[str, Any] = {}

    def work() -> None:
        refs["session"] = weakref.ref(scoped())

    gevent.spawn(work).join()
    gevent.sleep(0)  # links run (entry dropped)
    gevent.sleep(0)  # the closer greenlet runs
    collect()
    assert refs["session"]() is None


def _churn_memory(scoped: Any, cycles: int) -> int:
    """Traced memory after ``cycles`` of Session() + remove() in the calling greenlet."""
    for _ in range(cycles):
        scoped()
        scoped.remove()
    collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.parametrize("where", ["gevent-greenlet", "raw-greenlet", "main-greenlet"])
def test_long_lived_greenlet_removing_each_session_keeps_memory_flat(where: str) -> None:
    """A keep-alive connection or a job loop: one greenlet, thousands of sessions, each removed.

    Nothing per session may stay attached to the long-lived greenlet (end hooks, entries).
    """
    scoped = greenscope.scoped_session(sessionmaker())

    def run() -> Tuple[int, int]:
        warm = _churn_memory(scoped, 1_000)
        return warm, _churn_memory(scoped, 10_000)

    tracemalloc.start()
    try:
        if where == "gevent-greenlet":
            warm, after = gevent.spawn(run).get()
        elif where == "raw-greenlet":
            warm, after = greenlet.greenlet(run).switch()
        else:
            warm, after = run()
    finally:
        tracemalloc.stop()
    # 10,000 leaked hooks or entries would be megabytes; allow noise of a few kilobytes
    assert after - warm < 64 * 1024


def test_scoped_session_of_a_sessionmaker_type_checks_like_the_stock_class(tmp_path: Any) -> None:
    """A drop-in must type-check where the stock class does (the package ships ``py.typed``).

    Regression: ``session_factory: sessionmaker[_S] | Callable[..., _S]`` made mypy infer
    ``Never`` and reject ``greenscope.scoped_session(sessionmaker(engine))``; the same for
    ``greenscope.asyncio.async_scoped_session(async_sessionmaker(engine))``.
    """
    pytest.importorskip("mypy")
    snippet = tmp_path / "typed_use.py"
    snippet.write_text(
        "from sqlalchemy import create_engine\n"
        "from sqlalchemy.orm import Session, sessionmaker\n"
        "import greenscope\n"
        "class MySession(Session):\n"
        "    pass\n"
        "engine = create_engine('sqlite://')\n"
        "plain = greenscope.scoped_session(sessionmaker(engine))\n"
        "mine = greenscope.scoped_session(sessionmaker(engine, class_=MySession))\n"
        "reveal_type(plain)\n"
        "reveal_type(mine())\n"
        "from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine\n"
        "from greenscope.asyncio import async_scoped_session\n"
        "aio = async_scoped_session(async_sessionmaker(create_async_engine('sqlite+aiosqlite://')))\n"
        "reveal_type(aio)\n"
    )
    # a subprocess: mypy in this process would keep ~700,000 objects alive for every later
    # gc.collect() of the suite
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out, err, status = proc.stdout, proc.stderr, proc.returncode
    assert status == 0, out + err
    assert (
        'Revealed type is "greenscope.session.scoped_session[sqlalchemy.orm.session.Session]"'
        in out
    )
    assert "MySession" in out.splitlines()[1]
    assert (
        'Revealed type is "greenscope.asyncio.async_scoped_session'
        '[sqlalchemy.ext.asyncio.session.AsyncSession]"' in out
    )


def test_context_copied_into_a_thread_or_greenlet_does_not_share_the_session(
    Unpooled: Any,
) -> None:
    """The hot-path cache lives in a ContextVar; a copied context must not carry the session."""
    Scoped = Unpooled
    mine = Scoped()
    seen: List[Any] = []

    def in_copy() -> None:
        seen.append(Scoped())
        seen.append(Scoped.execute(text("select 1")).scalar())

    ctx = contextvars.copy_context()  # holds this greenlet's cached session
    thread = threading.Thread(target=ctx.run, args=(in_copy,))
    thread.start()
    thread.join()

    glet = greenlet.greenlet(in_copy)
    glet.gr_context = contextvars.copy_context()
    glet.switch()

    job = gevent.Greenlet(in_copy)
    job.gr_context = contextvars.copy_context()
    job.start()
    job.join()

    sessions = seen[0::2]
    assert seen[1::2] == [1, 1, 1]
    assert len({id(s) for s in sessions}) == 3
    assert mine not in sessions
    assert Scoped() is mine
    Scoped.remove()
