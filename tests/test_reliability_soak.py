"""Soak: a million greenlets and 100,000 asyncio tasks that never call ``remove()``.

Each greenlet (gevent) or task (asyncio) creates a session through greenscope and finishes
without ``remove()``; greenscope's end hooks must drop every entry and close every session, so
the registry comes back to 0 and resident memory stays flat: the growth from the first 10% of
the run to the end must stay under 10 MB. The work runs in batches of 1,000 concurrent greenlets
or tasks, so memory is bounded by design and any growth is a leak. Sessions do no database I/O
(a ``sessionmaker`` bound to an in-memory SQLite engine that never connects): this measures the
registry, not a driver.

Counts: ``GREENSCOPE_SOAK_GREENLETS`` (default 1,000,000) and ``GREENSCOPE_SOAK_TASKS``
(default 100,000). Reproduce: ``.venv/bin/python -m pytest tests/test_reliability_soak.py -s``.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_python

pytestmark = pytest.mark.slow

GREENLETS = int(os.environ.get("GREENSCOPE_SOAK_GREENLETS", "1000000"))
TASKS = int(os.environ.get("GREENSCOPE_SOAK_TASKS", "100000"))
BATCH = 1000
MAX_GROWTH_KB = 10 * 1024

_RSS = r"""
def rss_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

GEVENT_SOAK = (
    r"""
from gevent import monkey
monkey.patch_all()

import gc, json, sys, time
import gevent
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
import greenscope
"""
    + _RSS
    + r"""
total, batch = int(sys.argv[1]), int(sys.argv[2])
engine = sa.create_engine("sqlite://")  # never connected: sessions do no I/O
Session = greenscope.scoped_session(sessionmaker(engine))
made = [0]


def handler():
    Session().info["n"] = made[0]  # create this greenlet's session and touch it; no remove()
    made[0] += 1


def settle():
    for _ in range(1000):
        gevent.sleep(0)
        if len(Session.registry) == 0:
            break


start = time.perf_counter()
rss_at_10 = None
peak_len = 0
done = 0
while done < total:
    size = min(batch, total - done)
    greenlets = [gevent.spawn(handler) for _ in range(size)]
    gevent.joinall(greenlets)
    peak_len = max(peak_len, len(Session.registry))
    del greenlets
    settle()
    done += size
    if rss_at_10 is None and done >= total // 10:
        gc.collect()
        rss_at_10 = rss_kb()
gc.collect()
settle()
print(json.dumps({
    "made": made[0],
    "registry_len": len(Session.registry),
    "peak_len_after_join": peak_len,
    "ended_without_remove": Session.registry.ended_without_remove,
    "rss_at_10_kb": rss_at_10,
    "rss_end_kb": rss_kb(),
    "seconds": time.perf_counter() - start,
}))
"""
)

ASYNCIO_SOAK = (
    r"""
import asyncio, gc, json, sys, time
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from greenscope.asyncio import async_scoped_session
"""
    + _RSS
    + r"""
total, batch = int(sys.argv[1]), int(sys.argv[2])


async def main():
    engine = create_async_engine("sqlite+aiosqlite://")  # never connected
    Session = async_scoped_session(async_sessionmaker(engine))
    made = [0]

    async def handler():
        Session().info["n"] = made[0]  # no remove()
        made[0] += 1

    async def settle():
        for _ in range(1000):
            await asyncio.sleep(0)
            if len(Session.registry) == 0:
                break

    start = time.perf_counter()
    rss_at_10 = None
    done = 0
    while done < total:
        size = min(batch, total - done)
        await asyncio.gather(*(handler() for _ in range(size)))
        await settle()
        done += size
        if rss_at_10 is None and done >= total // 10:
            gc.collect()
            rss_at_10 = rss_kb()
    gc.collect()
    await settle()
    result = {
        "made": made[0],
        "registry_len": len(Session.registry),
        "ended_without_remove": Session.registry.ended_without_remove,
        "rss_at_10_kb": rss_at_10,
        "rss_end_kb": rss_kb(),
        "seconds": time.perf_counter() - start,
    }
    await engine.dispose()
    return result


print(json.dumps(asyncio.run(main())))
"""
)


def test_a_million_greenlets_without_remove_leave_an_empty_registry_and_flat_memory() -> None:
    result = run_python(GEVENT_SOAK, args=[str(GREENLETS), str(BATCH)], timeout=290)

    assert result["made"] == GREENLETS
    assert result["registry_len"] == 0
    assert result["ended_without_remove"] == GREENLETS  # every session closed by greenscope
    growth = result["rss_end_kb"] - result["rss_at_10_kb"]
    print(
        f"\nsoak gevent: {GREENLETS} greenlets in {result['seconds']:.1f} s; RSS "
        f"{result['rss_at_10_kb']} kB at 10% -> {result['rss_end_kb']} kB ({growth:+d} kB)"
    )
    assert growth < MAX_GROWTH_KB, result


def test_100000_asyncio_tasks_without_remove_leave_an_empty_registry_and_flat_memory() -> None:
    result = run_python(ASYNCIO_SOAK, args=[str(TASKS), str(BATCH)], timeout=290)

    assert result["made"] == TASKS
    assert result["registry_len"] == 0
    assert result["ended_without_remove"] == TASKS
    growth = result["rss_end_kb"] - result["rss_at_10_kb"]
    print(
        f"\nsoak asyncio: {TASKS} tasks in {result['seconds']:.1f} s; RSS "
        f"{result['rss_at_10_kb']} kB at 10% -> {result['rss_end_kb']} kB ({growth:+d} kB)"
    )
    assert growth < MAX_GROWTH_KB, result
