"""Scope churn (spawn, use ``Session()``, exit) and memory per live scope.

Run by ``bench/run.py`` in a fresh interpreter per mode::

    .venv/bin/python bench/churn.py greenlet [--quick] [--smoke]   # under monkey.patch_all()
    .venv/bin/python bench/churn.py task [--quick] [--smoke]       # asyncio, unpatched

prints one JSON object. ``greenlet`` mode: ``churn`` (greenlets/s, interleaved rounds, ratios
against stock gevent.local ``scoped_session`` *with* ``remove()``), ``memory`` (bytes per live
greenlet holding a session, tracemalloc) and ``flat`` (RSS and live entries while greenscope churns
through many greenlets that never call ``remove()``). ``task`` mode: ``churn`` for tasks, against
stock ``async_scoped_session(scopefunc=current_task)`` with ``await remove()``.
"""

from __future__ import annotations

import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "greenlet"
if MODE == "greenlet":
    from gevent import monkey

    monkey.patch_all()

import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from greenlet import getcurrent  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

import greenscope  # noqa: E402
from bench._harness import compare_runs  # noqa: E402

QUICK = "--quick" in sys.argv
SMOKE = "--smoke" in sys.argv
if SMOKE:
    ROUNDS, COUNT, LIVE, FLAT = 2, 400, 200, 2000
elif QUICK:
    ROUNDS, COUNT, LIVE, FLAT = 7, 5000, 2000, 100_000
else:
    ROUNDS, COUNT, LIVE, FLAT = 15, 20000, 5000, 1_000_000
BATCH = 100


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- greenlets (gevent, patched) ---------------------------------------------------------------


def greenlet_churn(work: Callable[[], None]) -> Callable[[], float]:
    import gevent

    def run() -> float:
        start = time.perf_counter()
        for _ in range(COUNT // BATCH):
            gevent.joinall([gevent.spawn(work) for _ in range(BATCH)])
        gevent.sleep(0)  # end hooks and greenscope's closer greenlet run inside the timing
        gevent.sleep(0)
        return COUNT / (time.perf_counter() - start)

    return run


def greenlet_mode() -> Dict[str, Any]:
    import gevent
    import gevent.event

    factory = sessionmaker(create_engine("sqlite://"))
    gs = greenscope.scoped_session(factory)
    tl = scoped_session(factory)  # created after patching: gevent.local, the correct stock setup
    gc_peer = scoped_session(factory, scopefunc=getcurrent)
    id_peer = scoped_session(factory, scopefunc=lambda: id(getcurrent()))

    def bare() -> None:
        pass

    def with_remove(session: Any) -> Callable[[], None]:
        def work() -> None:
            session()
            session.remove()

        return work

    def gs_no_remove() -> None:
        gs()

    candidates = {
        "bare": greenlet_churn(bare),
        "stock_threadlocal_remove": greenlet_churn(with_remove(tl)),
        "stock_getcurrent_remove": greenlet_churn(with_remove(gc_peer)),
        "stock_id_remove": greenlet_churn(with_remove(id_peer)),
        "greenscope_remove": greenlet_churn(with_remove(gs)),
        "greenscope": greenlet_churn(gs_no_remove),
    }
    for run in candidates.values():  # warm-up
        run()
    churn = compare_runs(candidates, "stock_threadlocal_remove", rounds=ROUNDS, between=gc.collect)
    churn["unit"] = "greenlets/s"
    churn["ended_without_remove"] = gs.registry.ended_without_remove
    churn["live_entries_after"] = len(gs.registry)

    # memory per live scope: LIVE greenlets parked on an event, each holding its session
    def live_cost(session: Any) -> float:
        release = gevent.event.Event()

        def hold() -> None:
            if session is not None:
                session()
            release.wait()

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        glets = [gevent.spawn(hold) for _ in range(LIVE)]
        gevent.sleep(0)
        gevent.sleep(0)
        during = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        release.set()
        gevent.joinall(glets)
        del glets
        gevent.sleep(0)
        gc.collect()
        return (during - before) / LIVE

    memory: Dict[str, Any] = {"unit": "bytes per live greenlet", "live": LIVE, "candidates": {}}
    for name, session in [
        ("bare", None),
        ("stock_threadlocal", tl),
        ("stock_getcurrent", gc_peer),
        ("greenscope", gs),
    ]:
        samples = [live_cost(session) for _ in range(3)]
        memory["candidates"][name] = {"per_scope": sorted(samples)[1]}
    bare_cost = memory["candidates"]["bare"]["per_scope"]
    for cand in memory["candidates"].values():
        cand["over_bare"] = cand["per_scope"] - bare_cost

    # flat memory: FLAT greenlets through greenscope without remove()
    gc.collect()
    checkpoints: List[Dict[str, Any]] = []
    step = max(FLAT // 10, BATCH)
    start = time.perf_counter()
    done = 0
    while done < FLAT:
        for _ in range(step // BATCH):
            gevent.joinall([gevent.spawn(gs_no_remove) for _ in range(BATCH)])
        done += step
        gevent.sleep(0)
        checkpoints.append(
            {"greenlets": done, "rss": rss_bytes(), "live_entries": len(gs.registry)}
        )
    elapsed = time.perf_counter() - start
    flat = {
        "greenlets": done,
        "seconds": elapsed,
        "checkpoints": checkpoints,
        "rss_growth_after_first_tenth": checkpoints[-1]["rss"] - checkpoints[0]["rss"],
        "ended_without_remove": gs.registry.ended_without_remove,
    }
    return {"greenlet_churn": churn, "memory": memory, "flat": flat}


# -- tasks (asyncio, unpatched) --------------------------------------------------------------


async def task_mode() -> Dict[str, Any]:
    from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine

    from greenscope.asyncio import async_scoped_session as gs_async_scoped_session

    factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    stock = async_scoped_session(factory, scopefunc=asyncio.current_task)
    gs = gs_async_scoped_session(factory)
    loop = asyncio.get_running_loop()

    async def bare() -> None:
        pass

    def with_remove(session: Any) -> Callable[[], Any]:
        async def work() -> None:
            session()
            await session.remove()

        return work

    async def gs_no_remove() -> None:
        gs()

    def churn(work: Callable[[], Any]) -> Callable[[], float]:
        # compare_runs is synchronous, so the rounds are interleaved by hand below, inside
        # this one loop (a loop per round would re-create the engine and its pool).
        async def run() -> float:
            start = time.perf_counter()
            for _ in range(COUNT // BATCH):
                await asyncio.gather(*(work() for _ in range(BATCH)))
            for _ in range(3):  # done-callbacks and greenscope's close tasks run inside timing
                await asyncio.sleep(0)
            return COUNT / (time.perf_counter() - start)

        return run  # type: ignore[return-value]

    runs = {
        "bare": churn(bare),
        "stock_task_remove": churn(with_remove(stock)),
        "greenscope_remove": churn(with_remove(gs)),
        "greenscope": churn(gs_no_remove),
    }
    values: Dict[str, List[float]] = {name: [] for name in runs}
    for run in runs.values():
        await run()  # type: ignore[misc]
    names = list(runs)
    for rnd in range(ROUNDS):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(await runs[name]())  # type: ignore[misc]
            gc.collect()
    from bench._harness import summarize

    del loop
    return {
        "task_churn": {
            "baseline": "stock_task_remove",
            "higher_is_better": True,
            "unit": "tasks/s",
            "candidates": summarize(values, "stock_task_remove"),
            "ended_without_remove": gs.registry.ended_without_remove,
            "live_entries_after": len(gs.registry),
        }
    }


def main() -> None:
    out = greenlet_mode() if MODE == "greenlet" else asyncio.run(task_mode())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
