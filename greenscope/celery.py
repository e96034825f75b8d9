"""Celery: every task in its own explicit scope, in every pool.

A Celery worker runs many tasks on one thread (``solo``, ``prefork`` children, ``threads``) or in
short-lived greenlets (``gevent``, ``eventlet``). A stock thread-local ``scoped_session`` hands a
thread's session to every later task on it, with whatever transaction the last one left open;
under ``-P gevent`` each greenlet's session is dropped, never closed, and holds its connection
until the garbage collector runs. :func:`install` hangs on Celery's own signals (no
monkeypatching):

- ``task_prerun`` opens a :func:`greenscope.scope` for the task and ``task_postrun`` closes it,
  with every session created inside: after success, failure, retry, a soft time limit and a
  revoke that interrupts the task (Celery sends ``task_postrun`` as the task unwinds). A hard
  time limit or ``revoke(terminate=True)`` under ``prefork`` kills the child process, and its
  connections end with it. Both signals are sent for eager calls too (``task.apply()``,
  ``task_always_eager``): a task that applies another eagerly gets a nested scope, and leaving
  it never touches the outer task's session. Calling a task like a function (``task(...)``) is
  not a task run: it shares its caller's scope.
- ``worker_process_init`` (each ``prefork`` child): makes sure the fork handling of
  :mod:`greenscope.fork` ran - registries empty, engines bound to them with pools of their own.
- ``worker_init`` (the worker process, before its pool starts): when gevent or eventlet patched
  the process (``-P gevent`` / ``-P eventlet``), the database drivers are made cooperative
  (:func:`greenscope.patch_drivers`), so a query never stops every other task.

Example::

    >>> from celery import Celery
    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.orm import sessionmaker
    >>> import greenscope, greenscope.celery
    >>> app = Celery("example", broker="memory://", task_always_eager=True)
    >>> greenscope.celery.install(app)
    >>> engine = create_engine("sqlite://")
    >>> Session = greenscope.scoped_session(sessionmaker(engine))
    >>> @app.task
    ... def job():
    ...     session = Session()  # no remove(): the task's scope closes it
    ...     session.info["runs"] = session.info.get("runs", 0) + 1
    ...     return session.info["runs"]
    >>> job.delay().get(), job.delay().get()  # a new session each time
    (1, 1)
    >>> engine.dispose()
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from celery import signals

from . import explicit as _explicit
from . import fork as _fork
from .drivers import green_runtime, patch_drivers

__all__ = ["install"]

_log = logging.getLogger("greenscope")

#: the attribute of a task's request (``task.request``, one per run) holding its scope
_ATTR = "_greenscope_scope"


def install(app: Any) -> None:
    """Run every task of ``app`` (a ``celery.Celery``) in its own :func:`greenscope.scope`.

    Call it where the app is defined, so the worker and every process it forks run it. Calling
    it again is harmless. Sets ``app.greenscope_installed = True`` (``greenscope doctor`` looks
    for it).

    :param app: the Celery application.

    Example::

        >>> from celery import Celery
        >>> import greenscope.celery
        >>> app = Celery("example", broker="memory://")
        >>> greenscope.celery.install(app)
        >>> greenscope.celery.install(app)  # harmless
        >>> app.greenscope_installed
        True
    """
    app.greenscope_installed = True
    # Receivers are module functions connected once (the dispatch_uid makes a second connect a
    # no-op); each acts only for apps that were installed.
    for signal, receiver in _RECEIVERS.items():
        signal.connect(receiver, weak=False, dispatch_uid=f"greenscope.celery.{signal.name}")


def _installed(task: Any) -> bool:
    app = getattr(task, "_app", None) or getattr(task, "app", None)
    return bool(getattr(app, "greenscope_installed", False))


def _task_prerun(sender: Any = None, task: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    if task is None or not _installed(task):
        return
    request = task.request
    scope = _explicit.scope()
    scope.__enter__()
    setattr(request, _ATTR, scope)


def _task_postrun(sender: Any = None, task: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    if task is None:
        return
    request = task.request
    scope: Optional[_explicit.scope] = getattr(request, _ATTR, None)
    if scope is None:
        return
    setattr(request, _ATTR, None)
    scope.__exit__(None, None, None)  # closes every session; a close error is raised (logged)


def _worker_process_init(**_: Any) -> None:
    _fork.ensure_child_state()


def _worker_init(**_: Any) -> None:
    patched = green_runtime()
    if patched is None:
        return
    did = patch_drivers(log=_log)
    _log.info("greenscope: %s worker, database drivers made cooperative: %s", patched, did)


_RECEIVERS: Dict[Any, Callable[..., None]] = {
    signals.task_prerun: _task_prerun,
    signals.task_postrun: _task_postrun,
    signals.worker_process_init: _worker_process_init,
    signals.worker_init: _worker_init,
}
