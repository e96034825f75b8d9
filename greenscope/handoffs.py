"""``greenscope.handoff(fn)``: run ``fn`` in another thread *inside* the caller's scope.

A scope belongs to the greenlet or task that opened it (DESIGN rule 4: children never inherit
by accident). Work sent to a thread pool is a child too, and by default it does not inherit:

- ``executor.submit(fn)``, ``loop.run_in_executor(None, fn)`` and ``threading.Thread(target=fn)``
  run ``fn`` with an empty :mod:`contextvars` context: no explicit scope is current there, so a
  ``greenscope.scoped_session`` used in ``fn`` is the *thread's* own (keyed on the pool thread's
  main greenlet, shared by every job that thread runs until it calls ``remove()``);
- ``asyncio.to_thread(fn)`` copies the caller's context, but a scope opened by a task is still
  the task's: the thread gets its own session.

Handing work off is sharing on purpose, so it is spelled out: ``handoff(fn)`` captures the
caller's context and its explicit scope, and returns a callable that runs ``fn`` in a copy of
that context, where :func:`greenscope.current_scope` is the caller's scope and every greenscope
registry hands out the scope's own session. The scope still ends where it was opened: its
sessions are closed there, and a handed-off call still running after that (or started after)
no longer sees it - it gets the thread's own session instead, and never registers one under
the dead scope. So hand off work the scope waits for (``future.result()``, ``await``), and
open a scope of its own for work that outlives it. Once a scope has handed work off, it is
shared with every thread running a copy of its context (``asyncio.to_thread`` included), as
the ASGI middleware's request scopes are.

:class:`greenscope.asgi.ScopeMiddleware` hands every request's scope to the copies of its
context that the framework runs in its thread pool (Starlette's ``run_in_threadpool``,
``asyncio.to_thread``): no wrapper is needed there. A ``Session`` shared by two threads must not
be used by both *at the same time* (SQLAlchemy's rule): hand off work that runs one at a time.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, TypeVar, cast

from .scoping import ScopeKey, current_scope

__all__ = ["handoff"]

_F = TypeVar("_F", bound=Callable[..., Any])


def handoff(fn: _F) -> _F:
    """Return ``fn`` wrapped to run, in any thread, inside the caller's explicit scope.

    Call it where the scope is current (inside ``greenscope.scope()``, or in a request served
    by a greenscope middleware), and give the result to the thread pool. Each call of the
    wrapper runs ``fn`` in a fresh copy of the caller's context, so it may be called many
    times, from several threads. Outside any explicit scope it raises ``RuntimeError``: there is
    no scope to share, and silently giving the thread its own session would hide the mistake.

    :param fn: the callable to run in another thread.

    Example::

        >>> from concurrent.futures import ThreadPoolExecutor
        >>> from sqlalchemy import create_engine
        >>> from sqlalchemy.orm import sessionmaker
        >>> import greenscope
        >>> Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
        >>> with ThreadPoolExecutor(1) as pool, greenscope.scope():
        ...     mine = Session()
        ...     shared = pool.submit(greenscope.handoff(Session)).result()
        ...     plain = pool.submit(Session).result()
        >>> shared is mine, plain is mine
        (True, False)
    """
    key = current_scope()
    if type(key) is not ScopeKey:
        raise RuntimeError(
            "greenscope.handoff() was called outside any explicit scope: there is no scope "
            "to hand to another thread. Call it inside `with greenscope.scope():` or in a "
            "request served through greenscope.asgi.ScopeMiddleware or greenscope.wsgi."
            "ScopeMiddleware."
        )
    key.handoff = True
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def handed_off(*args: Any, **kwargs: Any) -> Any:
        return context.copy().run(fn, *args, **kwargs)

    return cast(_F, handed_off)
