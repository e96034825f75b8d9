"""A gunicorn configuration for gevent workers that makes SQLAlchemy safe in them.

Use it as it is::

    gunicorn -c python:greenscope.gunicorn --preload app:app

or import it into your own ``gunicorn.conf.py`` (``from greenscope.gunicorn import *`` takes the
settings and hooks; if you define a hook of your own, call greenscope's from it)::

    from greenscope.gunicorn import *  # noqa: F403
    import greenscope.gunicorn

    workers = 4

    def post_fork(server, worker):
        greenscope.gunicorn.post_fork(server, worker)
        ...  # your own

Settings (plain module attributes; anything set later in your conf or on the command line wins):

- ``worker_class = "gevent"``: gunicorn's gevent worker (``gunicorn.workers.ggevent``).
- ``worker_connections = 1000``: concurrent connections (greenlets) per worker, gunicorn's default,
  stated so it is visible next to your database pool size: requests beyond the pool wait for a
  connection, cooperatively, up to the pool's ``pool_timeout``.
- ``keepalive = 5``: seconds an idle keep-alive connection is kept, a little more than gunicorn's 2,
  for workers behind a load balancer that reuses connections. Every request on one connection runs
  in the same greenlet, which is why requests need an explicit scope
  (:class:`greenscope.wsgi.ScopeMiddleware`), not a greenlet scope.

What happens in each worker, in gunicorn's order (``gunicorn/arbiter.py`` and
``gunicorn/workers/ggevent.py``: ``pre_fork`` in the master, ``fork()``, ``post_fork``, gevent's
``monkey.patch_all()``, the app import unless ``--preload``, ``post_worker_init``, serving):

1. :func:`pre_fork` (master): finds every SQLAlchemy ``Engine`` that exists at fork time with one
   ``gc.get_objects()`` scan (about 5 ms per 65,000 objects, once per worker spawned). An event
   listener cannot do this job: SQLAlchemy has no "engine created" event, and an engine that
   never connected still owns a pool whose locks were created before patching. They are handed
   to :func:`greenscope.fork_safe`: at the fork itself each gets a new pool in the worker and
   the master's connections are orphaned there (never reset or closed, their sockets on
   ``/dev/null`` in the worker); step 3 renews the pools once more, after patching, the same way
   (:func:`greenscope.fork.renew_pool`).
2. :func:`post_fork` (worker, before patching): makes sure every greenscope registry is empty, as
   ``os.register_at_fork`` in :mod:`greenscope.registry` already arranged: the parent's sessions
   and their connections are never touched in the child.
3. :func:`post_worker_init` (worker, after patching and after the app import): every engine
   found at fork time gets ``engine.dispose(close=False)``. The connections the master opened
   (``create_all`` at import, say) are dropped without being closed - their sockets are the
   master's, and without this every worker is handed the same one. Measured with
   ``examples/app.py``, 2 workers, ``--preload``, PostgreSQL, 200 requests 40 at a time, 3 runs:
   without these hooks both workers ran requests on the master's connection (6 to 17 each) and
   37 to 39 requests failed (``ResourceClosedError``, ``PGRES_TUPLES_OK and no message``, or no
   answer at all from a worker stuck reading the other's reply); with them, none. The new
   pool's queue and locks are made now, with gevent's ``threading`` (the old one held a
   ``_thread.RLock``; its ``Condition.wait()`` happens to stay cooperative on gevent 26 because
   the waiter lock is allocated through the patched module, but nothing promises that).
   Engines the app created in the worker (no ``--preload``) are left alone. Then
   :func:`greenscope.patch_drivers` makes the installed drivers cooperative: psycopg2 gets
   psycogreen's wait callback, and psycopg 3, which picks a blocking C wait function when it is
   imported before gevent patches (``--preload`` does exactly that), is switched to its
   pure-Python wait on gevent's ``select``. Measured in one worker, 20 concurrent requests
   each running ``select pg_sleep(0.5)``: 0.55 to 0.60 s for psycopg2 and psycopg 3 (C and pure
   Python); without this hook psycopg 3 runs them one after the other (10.09 s in issue 14; 4
   such requests took 2.06 s in ``tests/test_drivers.py``). The hook raises if a driver stays
   blocking.
4. Warnings from these hooks go through gunicorn's error log (``worker.log`` / ``server.log``),
   so they carry its timestamp and pid like gunicorn's own lines. What the library logs later in
   the worker (a session that failed to close after its greenlet ended) goes to the
   ``greenscope`` logger, which :func:`post_fork` gives gunicorn's error-log handlers unless the
   application configured logging itself (a root handler, or its own handler on ``greenscope``).
5. :func:`worker_exit` (worker): logs one line with the registries' live entries and how many
   sessions greenscope closed because their scope ended without ``remove()``
   (:func:`greenscope.diagnostics.log_runtime_report`).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import weakref
from typing import Any, List, Optional, Set, Tuple

from . import fork as _fork
from . import registry as _registry
from . import runtimes as _runtimes
from .drivers import patch_drivers

__all__ = [
    "keepalive",
    "post_fork",
    "post_worker_init",
    "pre_fork",
    "worker_class",
    "worker_connections",
    "worker_exit",
]

#: gunicorn's gevent worker
worker_class = "gevent"
#: connections (greenlets) per worker; gunicorn's default, stated for visibility
worker_connections = 1000
#: seconds an idle keep-alive connection stays open
keepalive = 5

_log = logging.getLogger("greenscope")

#: (pid of the process that took it, weak references to the engines alive then)
_snapshot: Optional[Tuple[int, List[weakref.ref[Any]]]] = None


def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: remember the SQLAlchemy engines that exist now.

    Example, from your own conf::

        >>> import greenscope.gunicorn
        >>> def pre_fork(server, worker):
        ...     greenscope.gunicorn.pre_fork(server, worker)
    """
    _take_snapshot()


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after fork (before gevent patches): ensure greenscope registries are empty.

    The core empties them in its ``os.register_at_fork`` handler; this hook verifies it and
    empties them itself (with a warning) if that handler did not run. If :func:`pre_fork` was not
    chained from your conf, the engines inherited from the master are recorded here instead.

    Example::

        >>> import greenscope.gunicorn
        >>> def post_fork(server, worker):
        ...     greenscope.gunicorn.post_fork(server, worker)
    """
    _route_library_log(worker)
    left = sum(len(r) for r in list(_registry._all_registries))
    if left:
        _logger(worker, server).warning(
            "greenscope: %d registry entries inherited from the master at fork; dropping them "
            "(the at-fork handler did not run?)",
            left,
        )
        _registry._after_fork_in_child()
        _runtimes._after_fork_in_child()
    live = [r for r in list(_registry._all_registries) if len(r)]
    if live:  # pragma: no cover - would be a bug in the core
        raise RuntimeError(f"greenscope: registries not empty after fork: {live!r}")
    if not _snapshot_inherited():
        _take_snapshot()


def post_worker_init(worker: Any) -> None:
    """Worker, after gevent patched and the app loaded: rebuild inherited pools, patch drivers.

    Example::

        >>> import greenscope.gunicorn
        >>> def post_worker_init(worker):
        ...     greenscope.gunicorn.post_worker_init(worker)
    """
    if _snapshot is None or _snapshot[0] not in (os.getpid(), os.getppid()):
        # Neither pre_fork nor post_fork ran in this process tree: the best guess is every
        # engine alive now (engines the app created in this worker are rebuilt too, harmlessly).
        _logger(worker).warning(
            "greenscope: pre_fork/post_fork hooks were not chained; disposing every engine"
        )
        _take_snapshot()
        _route_library_log(worker)
    disposed = dispose_engines_inherited_at_fork()
    gevent_patched = _gevent_patched()
    drivers = patch_drivers(log=_logger(worker))
    _logger(worker).info(
        "greenscope: worker %s ready: gevent patched=%s, %s pre-fork engine pool(s) rebuilt, "
        "drivers: %s",
        os.getpid(),
        gevent_patched,
        disposed,
        ", ".join(
            f"{s.driver} {s.action}{'' if s.cooperative or not s.installed else ' (BLOCKING)'}"
            for s in drivers.values()
        ),
    )


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on exit: log the registries' figures through gunicorn's logger.

    :func:`greenscope.diagnostics.log_runtime_report`: one line with the live scopes and the
    sessions greenscope closed because their scope ended without ``remove()``, and a warning per
    registry that had any (with ``GREENSCOPE_TRACE=1``, where live sessions were created).

    Example::

        >>> import greenscope.gunicorn
        >>> def worker_exit(server, worker):
        ...     greenscope.gunicorn.worker_exit(server, worker)
    """
    from .diagnostics import log_runtime_report

    log_runtime_report(_logger(worker))


# -- the pieces, usable on their own -------------------------------------------------------


def dispose_engines_inherited_at_fork() -> int:
    """``dispose(close=False)`` every engine recorded at fork time; return how many pools.

    Safe to call more than once in a worker: each engine is disposed once.

    Example (nothing was recorded in this process, so nothing is disposed)::

        >>> import greenscope.gunicorn
        >>> greenscope.gunicorn.dispose_engines_inherited_at_fork()
        0
    """
    global _snapshot
    if _snapshot is None:
        return 0
    refs = _snapshot[1]
    _snapshot = (os.getpid(), [])
    pools: Set[int] = set()
    for ref in refs:
        engine = ref()
        if engine is None or id(engine.pool) in pools:
            continue
        pools.add(id(engine.pool))
        _fork.renew_pool(engine)  # dispose(close=False), the master's connections orphaned
    return len(pools)


def _logger(*gunicorn_objects: Any) -> Any:
    """gunicorn's error log (``worker.log``, ``server.log``: its format, its file, its level),
    the first one of these objects has; the ``greenscope`` logger outside gunicorn."""
    for obj in gunicorn_objects:
        logger = getattr(obj, "log", None)
        if logger is not None:
            return logger
    return _log


def _route_library_log(worker: Any) -> None:
    """Give the ``greenscope`` logger gunicorn's error-log handlers in this worker, unless the
    application configured logging itself (a root handler, or a handler of its own on
    ``greenscope``): what the library logs while serving (a session that failed to close after
    its greenlet ended) then reads like gunicorn's own lines instead of going nowhere."""
    error_log = getattr(getattr(worker, "log", None), "error_log", None)
    if not isinstance(error_log, logging.Logger) or logging.getLogger().handlers:
        return
    if any(not isinstance(handler, logging.NullHandler) for handler in _log.handlers):
        return
    for handler in error_log.handlers:
        _log.addHandler(handler)


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


def _snapshot_inherited() -> bool:
    return _snapshot is not None and _snapshot[0] == os.getppid()


def _take_snapshot() -> None:
    global _snapshot
    engines = _find_engines()
    for engine in engines:  # renewed at the fork too, their inherited sockets neutralised
        _fork.fork_safe(engine)
    _snapshot = (os.getpid(), [weakref.ref(engine) for engine in engines])


def _find_engines() -> List[Any]:
    """Every SQLAlchemy ``Engine`` in this process (``OptionEngine`` views share their pool)."""
    engine_module = sys.modules.get("sqlalchemy.engine.base")
    if engine_module is None:  # SQLAlchemy not imported: there is no engine
        return []
    base: type = engine_module.Engine
    option: type = engine_module.OptionEngine
    classes = _subclasses(base) - _subclasses(option)
    return [obj for obj in gc.get_objects() if type(obj) in classes]


def _subclasses(cls: type) -> Set[type]:
    found = {cls}
    sub: type
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found
