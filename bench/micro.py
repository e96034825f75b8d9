"""Hot lookups: ``Session.registry()`` and ``Session()`` with a session present.

Run by ``bench/run.py`` in a fresh interpreter per mode (patching is process-wide)::

    .venv/bin/python bench/micro.py [--patched] [--quick] [--smoke]

prints one JSON object: ``{figure: compare-result}`` where a figure is
``<context>.<registry|session|proxied>`` and the contexts are ``main`` (the thread's main
greenlet), ``greenlet`` (inside a gevent ``Greenlet``), ``scope`` (inside ``greenscope.scope()``)
and, unpatched only, ``task`` (inside an asyncio Task).

Candidates (all measured in the same interleaved run, see ``_harness``):

- ``floor``: a plain ``dict[getcurrent()]`` in one Python frame, the lower bound of any design
  that keys on the greenlet (``dict[current_task()]`` inside a task);
- ``stock_threadlocal``: stock ``scoped_session`` (``threading.local``; gevent.local when patched);
- ``stock_getcurrent``: stock ``scoped_session(scopefunc=greenlet.getcurrent)``;
- ``stock_id``: stock ``scoped_session(scopefunc=lambda: id(getcurrent()))`` (id-keyed);
- ``stock_task``: stock ``async_scoped_session(scopefunc=asyncio.current_task)``;
- ``greenscope``: ``greenscope.scoped_session`` / ``greenscope.asyncio.async_scoped_session``
  (pure Python).
"""

from __future__ import annotations

import sys

PATCHED = "--patched" in sys.argv
if PATCHED:
    from gevent import monkey

    monkey.patch_all()

import asyncio  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from typing import Any, Callable, Dict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent  # noqa: E402
from greenlet import getcurrent  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

import greenscope  # noqa: E402
from bench._harness import compare  # noqa: E402

QUICK = "--quick" in sys.argv
SMOKE = "--smoke" in sys.argv
if SMOKE:
    ROUNDS, NUMBER = 2, 200
elif QUICK:
    ROUNDS, NUMBER = 12, 10000
else:
    ROUNDS, NUMBER = 40, 20000

Candidates = Dict[str, Callable[[], Any]]


def sync_candidates(factory: sessionmaker[Any]) -> Dict[str, Any]:
    """The scoped_session flavours, each with its session already created in this context."""
    sessions: Dict[str, Any] = {
        "stock_threadlocal": scoped_session(factory),
        "stock_getcurrent": scoped_session(factory, scopefunc=getcurrent),
        "stock_id": scoped_session(factory, scopefunc=lambda: id(getcurrent())),
        "greenscope": greenscope.scoped_session(factory),
    }
    for session in sessions.values():
        session()
    return sessions


def floor_for(key_func: Callable[[], Any]) -> Callable[[], Any]:
    table = {key_func(): object()}

    def floor() -> Any:
        return table[key_func()]

    return floor


def measure(sessions: Dict[str, Any], floor: Callable[[], Any], base: str) -> Dict[str, Any]:
    registry: Candidates = {"floor": floor}
    registry.update({name: s.registry for name, s in sessions.items()})
    session: Candidates = {"floor": floor}
    session.update(sessions)
    # A proxied attribute (``Session.is_active``): what ``Session.execute``, ``Session.add``...
    # pay to find the session, through ``scoped_session._proxied``; getattr via partial adds
    # the same C-level call to every candidate.
    proxied: Candidates = {"floor": floor}
    proxied.update(
        {name: functools.partial(getattr, s, "is_active") for name, s in sessions.items()}
    )
    return {
        "registry": compare(registry, baseline=base, rounds=ROUNDS, number=NUMBER),
        "session": compare(session, baseline=base, rounds=ROUNDS, number=NUMBER),
        "proxied": compare(proxied, baseline=base, rounds=ROUNDS, number=NUMBER),
    }


def run_sync(factory: sessionmaker[Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    sessions = sync_candidates(factory)
    for fig, res in measure(sessions, floor_for(getcurrent), "stock_getcurrent").items():
        out[f"main.{fig}"] = res

    def in_greenlet() -> Dict[str, Any]:
        return measure(sync_candidates(factory), floor_for(getcurrent), "stock_getcurrent")

    for fig, res in gevent.spawn(in_greenlet).get().items():
        out[f"greenlet.{fig}"] = res

    with greenscope.scope():
        sessions["greenscope"]()  # a fresh session for the scope; the peers keep theirs
        for fig, res in measure(sessions, floor_for(getcurrent), "stock_getcurrent").items():
            out[f"scope.{fig}"] = res
    return out


async def run_task() -> Dict[str, Any]:
    from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine

    from greenscope.asyncio import async_scoped_session as gs_async_scoped_session

    factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
    sessions: Dict[str, Any] = {
        "stock_task": async_scoped_session(factory, scopefunc=asyncio.current_task),
        "greenscope": gs_async_scoped_session(factory),
    }
    for session in sessions.values():
        session()
    out = measure(sessions, floor_for(asyncio.current_task), "stock_task")
    for session in sessions.values():
        await session.remove()
    return {f"task.{fig}": res for fig, res in out.items()}


def main() -> None:
    factory = sessionmaker(create_engine("sqlite://"))
    results: Dict[str, Any] = {"patched": PATCHED}
    results.update(run_sync(factory))
    if not PATCHED:
        results.update(asyncio.run(run_task()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
