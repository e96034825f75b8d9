"""Fork safety: after ``os.fork()`` the child opens its own connections and never touches the
parent's.

uWSGI, Celery's prefork pool, ``multiprocessing`` with the fork start method and a plain
``os.fork()`` all copy the parent's connection pools into the child. Left alone, the child is
handed the parent's idle connections (two processes then talk on one socket and read each
other's replies), and anything that rolls back or closes an inherited connection in the child
does it on the parent's socket: a checked-out connection whose owner is dropped in the child is
rolled back by SQLAlchemy's finalizer (the parent's open transaction is gone), and an explicit
``close()`` sends libpq's Terminate (the parent's connection is gone).

What the child does, in the ``os.register_at_fork`` handler (no I/O, no greenlet switch), for
every engine a greenscope registry's ``sessionmaker`` is bound to (``bind`` or ``binds``, or the
engines of a Flask-SQLAlchemy ``db`` made with :mod:`greenscope.flask`) and every engine given
to :func:`fork_safe`:

1. the old pool and every connection record it had are kept referenced for the rest of the
   child's life (``_closing.fork_orphans``), and each checked-out record is told it has no fairy,
   so no finalizer ever rolls back, checks in or closes a parent's connection;
2. the socket of every inherited DBAPI connection is replaced *in the child's file table* by
   ``/dev/null`` (``os.dup2``): whatever still writes to it (a ``close()`` of a ``Connection`` the
   user kept, a finalizer at interpreter exit) writes nowhere, and reads see end-of-file. The
   parent's socket is untouched: a file descriptor table is per process. The descriptor number
   stays taken, so a new connection of the child can never get it and be closed by an orphan;
3. ``engine.dispose(close=False)``: the engine gets a new pool (with new locks: a lock some other
   thread held at fork time would otherwise stay held forever) and the child connects afresh.

To know which connections are inherited, each tracked engine's pool reports every connection it
opens (its ``connect`` event records the connection record and the pid); connections opened
before tracking began are found once, when the engine is first tracked, among the referrers of
its pool. Engines bound to registries are looked up in the parent just before each fork
(``gc.get_referrers`` once per new engine, a few milliseconds), so no call is needed for them.

gunicorn's gevent worker forks *before* gevent patches, so :mod:`greenscope.gunicorn` renews the
pools once more after patching (:func:`renew_pool`, the same step 1-3) for cooperative locks.

Example::

    >>> import os
    >>> from sqlalchemy import create_engine
    >>> import greenscope
    >>> engine = greenscope.fork_safe(create_engine("sqlite://"))
    >>> pool = engine.pool
    >>> pid = os.fork()
    >>> if pid == 0:  # the child: a pool of its own before its first line runs
    ...     os._exit(0 if engine.pool is not pool else 1)
    >>> os.waitpid(pid, 0)[1]
    0
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool.base import _ConnectionRecord

from . import _closing
from . import registry as _registry
from . import runtimes as _runtimes

__all__ = ["ensure_child_state", "fork_safe", "renew_pool"]

_E = TypeVar("_E")

#: pid given to connection records found at first sight in a child: certainly not the child's
_UNKNOWN_PID = 0


class _Tracking:
    """What greenscope knows about one engine: its connection records and who opened them."""

    __slots__ = ("__weakref__", "records")

    def __init__(self) -> None:
        #: connection record -> pid of the process that opened its current DBAPI connection
        self.records: weakref.WeakKeyDictionary[_ConnectionRecord, int] = (
            weakref.WeakKeyDictionary()
        )

    def on_connect(self, dbapi_connection: Any, record: _ConnectionRecord) -> None:
        self.records[record] = os.getpid()


#: every tracked engine (weakly): given to fork_safe(), or bound to a registry at a fork
_tracked: weakref.WeakKeyDictionary[Engine, _Tracking] = weakref.WeakKeyDictionary()
#: the engines the parent saw just before this fork, for the child handler (strong, briefly)
_at_fork: List[Engine] = []
#: the process the fork handling last ran in (or that imported this module)
_handled_pid = os.getpid()


def fork_safe(engine: _E) -> _E:
    """Make ``engine`` (an ``Engine`` or ``AsyncEngine``) safe across ``os.fork()``; return it.

    Engines bound to a greenscope registry's ``sessionmaker`` need no call: this is for the
    others (an engine used with plain ``Session(engine)`` or ``engine.connect()``). The engine
    is held weakly. In every child forked afterwards the engine has a new pool before the
    child's first line runs, and the parent's connections are never used, rolled back or closed
    there (see the module documentation).

    :param engine: the engine; an ``AsyncEngine`` is tracked through its ``sync_engine``.

    Example::

        >>> from sqlalchemy import create_engine
        >>> import greenscope
        >>> engine = greenscope.fork_safe(create_engine("sqlite://"))
    """
    _track(_sync_engine(engine))
    return engine


def renew_pool(engine: Any) -> bool:
    """Give ``engine`` a new pool in this (forked) process, orphaning the inherited one.

    What the at-fork handler does for each tracked engine, usable later too:
    :mod:`greenscope.gunicorn` calls it after gevent patched the worker. Connections this
    process opened itself are left to SQLAlchemy (``dispose(close=False)``); connections opened
    by another process are kept referenced forever and their sockets pointed at ``/dev/null``.
    Returns whether any inherited connection was found (for an engine greenscope never tracked
    every connection is presumed inherited and the whole old pool kept).

    Example (in a process that did not fork, nothing is inherited)::

        >>> from sqlalchemy import create_engine
        >>> import greenscope.fork
        >>> engine = greenscope.fork_safe(create_engine("sqlite://"))
        >>> greenscope.fork.renew_pool(engine)
        False
    """
    engine = _sync_engine(engine)
    pool = engine.pool
    tracking = _tracked.get(engine)
    if tracking is None:
        _closing.fork_orphans.append(pool)  # nothing known: keep all of it
        engine.dispose(close=False)
        return True
    me = os.getpid()
    inherited = [r for r, pid in list(tracking.records.items()) if pid != me]
    tracking.records = weakref.WeakKeyDictionary(
        (r, pid) for r, pid in list(tracking.records.items()) if pid == me
    )
    if inherited:
        _orphan(pool, inherited)
    engine.dispose(close=False)
    return bool(inherited)


def ensure_child_state() -> bool:
    """Run greenscope's fork handling now if this process was forked without it; return whether
    it had to (a ``fork()`` made in C without ``PyOS_AfterFork_Child()`` runs no at-fork handler).

    Integrations call it from their "new worker process" hook (Celery's
    ``worker_process_init``); it is cheap and idempotent.

    Example (this process ran it when it started, so there is nothing to do)::

        >>> import greenscope.fork
        >>> greenscope.fork.ensure_child_state()
        False
    """
    if _handled_pid == os.getpid():
        return False
    _registry._after_fork_in_child()
    _runtimes._after_fork_in_child()
    _after_fork_in_child()
    return True


# -- the pieces ---------------------------------------------------------------------------


def _sync_engine(engine: Any) -> Engine:
    sync = getattr(engine, "sync_engine", engine)
    if not isinstance(sync, Engine):
        raise TypeError(f"greenscope.fork_safe() needs an Engine or AsyncEngine, not {engine!r}")
    return sync


def _track(engine: Engine, found_pid: Optional[int] = None) -> _Tracking:
    """Start tracking ``engine``: a ``connect`` listener, and the records it already has."""
    tracking = _tracked.get(engine)
    if tracking is not None:
        return tracking
    tracking = _tracked[engine] = _Tracking()
    # Listening on the engine puts the listener on its pool's dispatch, which every pool made by
    # dispose() inherits: connections of renewed pools are reported too.
    event.listen(engine, "connect", tracking.on_connect)
    pool = engine.pool
    pid = os.getpid() if found_pid is None else found_pid
    for referrer in gc.get_referrers(pool):
        if type(referrer) is _ConnectionRecord and _record_pool(referrer) is pool:
            tracking.records[referrer] = pid
    return tracking


def _record_pool(record: _ConnectionRecord) -> Any:
    return getattr(record, "_ConnectionRecord__pool", None)


def _bound_engines() -> List[Engine]:
    """Every engine a live greenscope registry's sessionmaker is bound to."""
    found: List[Engine] = []
    for registry in list(_registry._all_registries):
        kw = getattr(registry.createfunc, "kw", None)
        if not isinstance(kw, dict):
            continue
        binds: List[Any] = [kw.get("bind"), *dict(kw.get("binds") or {}).values()]
        # Flask-SQLAlchemy 3 (greenscope.flask): the session finds its engines through db
        for per_app in list(getattr(kw.get("db"), "_app_engines", {}).values()):
            binds.extend(dict(per_app).values())
        for bind in binds:
            sync = getattr(bind, "sync_engine", bind)
            if isinstance(sync, Engine) and sync not in found:
                found.append(sync)
    return found


def _orphan(pool: Any, records: List[_ConnectionRecord]) -> None:
    """Keep ``pool`` and ``records`` forever, unfinalizable, with their sockets on /dev/null."""
    _closing.fork_orphans.append((pool, records))
    null = -1
    try:
        for record in records:
            # a checked-out record whose fairy is dropped here is then never reset or closed
            # (SQLAlchemy's finalizer acts only when the record still points at the fairy)
            record.fairy_ref = None
            fd = _socket_fd(record.dbapi_connection)
            if fd is None:
                continue
            if null < 0:
                null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd, inheritable=False)
    finally:
        if null >= 0:
            os.close(null)


_FD_GETTERS: Tuple[Callable[[Any], Any], ...] = (
    lambda c: c.fileno(),  # psycopg2, psycopg
    lambda c: c._transport.get_extra_info("socket").fileno(),  # asyncpg
    lambda c: c._sock.fileno(),  # pymysql
)


def _socket_fd(dbapi_connection: Any) -> Optional[int]:
    """The socket file descriptor of a DBAPI connection (psycopg2, psycopg, asyncpg, pymysql),
    or None (SQLite, a closed connection)."""
    if dbapi_connection is None:
        return None
    candidates = [dbapi_connection, getattr(dbapi_connection, "driver_connection", None)]
    for conn in candidates:
        if conn is None:
            continue
        for get in _FD_GETTERS:
            try:
                fd = get(conn)
            except Exception:
                continue
            if isinstance(fd, int) and fd >= 0:
                return fd
    return None


def _before_fork() -> None:
    """Parent, just before a fork: find the engines to renew in the child (no I/O)."""
    engines = _bound_engines()
    for engine in engines:
        _track(engine)
    for engine in list(_tracked.keys()):
        if engine not in engines:
            engines.append(engine)
    _at_fork[:] = engines


def _after_fork_in_child() -> None:
    """Child, right after the fork: renew every engine seen before it (no I/O, no switch)."""
    global _handled_pid
    _handled_pid = os.getpid()
    engines = list(_at_fork)
    _at_fork.clear()
    # a fork that ran no before handler (a C fork() followed by PyOS_AfterFork_Child())
    for engine in [*_tracked.keys(), *_bound_engines()]:
        if engine not in engines:
            _track(engine, found_pid=_UNKNOWN_PID)
            engines.append(engine)
    first_error: Optional[BaseException] = None
    for engine in engines:  # one engine failing leaves the others renewed
        try:
            renew_pool(engine)
        except Exception as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error  # reported by CPython as an unraisable exception of the fork


def _after_fork_in_parent() -> None:
    _at_fork.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
