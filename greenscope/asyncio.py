"""``greenscope.asyncio.async_scoped_session``: the stock async class on a ``WeakScopeRegistry``.

No ``scopefunc`` is needed: the default is :func:`greenscope.current_scope`, i.e. the running
task (or an explicit ``greenscope.scope()``). The registry adds one done-callback per task on first
store; when the task finishes its entry is dropped and its ``AsyncSession`` is closed as a task on
the same loop - no more Tasks and sessions kept alive by a forgotten ``remove()`` (SQLAlchemy
issue 8340). A loop shut down by ``asyncio.run()`` waits for those closes instead of cancelling
them (see ``greenscope.runtimes.aio``).

What the default scope means in asyncio code:

- every task has its own session; a child task (``create_task``, ``gather``, ``TaskGroup``) gets
  its own even though it runs in a copy of its parent's contextvars;
- inside ``AsyncSession.run_sync()`` (SQLAlchemy's ``greenlet_spawn`` greenlet) the scope is still
  the calling task, so a sync ``greenscope.scoped_session`` used there is the task's;
- ``asyncio.to_thread`` runs in a copy of the task's context on another thread: that thread is
  its own scope and never sees the task's session;
- with no running task and no explicit scope there is nowhere to keep an ``AsyncSession``:
  ``RuntimeError``, rather than a session silently keyed on the thread's greenlet.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from greenlet import getcurrent
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import async_scoped_session as _stock_async_scoped_session
from sqlalchemy.orm import Session

from .registry import WeakScopeRegistry
from .runtimes import aio as _aio
from .scoping import _current_task, _get_running_loop

__all__ = ["async_scoped_session", "wait_closed"]

_AS = TypeVar("_AS", bound=AsyncSession)


def _is_sync_factory(factory: Any) -> bool:
    """True for factories that certainly make a sync ``Session`` (a ``sessionmaker`` or a
    ``Session`` subclass); any other callable is accepted, as the stock class accepts it."""
    if isinstance(factory, async_sessionmaker):
        return False
    cls = getattr(factory, "class_", factory)
    return isinstance(cls, type) and issubclass(cls, Session)


class async_scoped_session(_stock_async_scoped_session[_AS]):
    """A drop-in :class:`sqlalchemy.ext.asyncio.async_scoped_session` scoped per task.

    Only the registry differs from the stock class: every proxied coroutine and attribute, and
    ``await Session.remove()``, are SQLAlchemy's own.

    :param session_factory: an :class:`sqlalchemy.ext.asyncio.async_sessionmaker` (or a
        ``sessionmaker(class_=AsyncSession)``, or any callable returning an ``AsyncSession``).
        A sync ``sessionmaker`` raises ``TypeError``: use :class:`greenscope.scoped_session`.
    :param scopefunc: optional; default :func:`greenscope.current_scope`. With the default, use
        outside a running task and outside any ``greenscope.scope()`` raises ``RuntimeError``
        instead of silently handing out a session keyed on the event loop's greenlet.

    Example::

        >>> import asyncio
        >>> from sqlalchemy import text
        >>> from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
        >>> from sqlalchemy.pool import AsyncAdaptedQueuePool
        >>> from greenscope.asyncio import async_scoped_session, wait_closed
        >>> engine = create_async_engine("sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool)
        >>> AsyncSession = async_scoped_session(async_sessionmaker(engine))
        >>> async def handler(n):
        ...     return (await AsyncSession.execute(text(f"select {n}"))).scalar()
        >>> async def main():
        ...     results = await asyncio.gather(*(handler(n) for n in range(3)))
        ...     await wait_closed()  # the finished tasks' sessions are being closed
        ...     await engine.dispose()
        ...     return results, len(AsyncSession.registry)
        >>> asyncio.run(main())  # no remove(): each task's session closed when it ended
        ([0, 1, 2], 0)
    """

    registry: WeakScopeRegistry[_AS]

    def __init__(
        self,
        # Callable alone: mypy infers Never from ``async_sessionmaker[_AS] | Callable[..., _AS]``
        # and would reject ``async_scoped_session(async_sessionmaker(engine))``.
        session_factory: Callable[..., _AS],
        scopefunc: Optional[Callable[[], Any]] = None,
    ) -> None:
        if _is_sync_factory(session_factory):
            raise TypeError(
                f"greenscope.asyncio.async_scoped_session needs an async_sessionmaker, got the "
                f"sync factory {session_factory!r}; use greenscope.scoped_session for a sync "
                "Session, or sqlalchemy.ext.asyncio.async_sessionmaker for AsyncSession"
            )
        self.session_factory = session_factory  # type: ignore[assignment]
        self.registry = WeakScopeRegistry(session_factory, scopefunc)
        self.registry._requires_task = scopefunc is None

    # As in ``greenscope.scoped_session``: ``AsyncSession()`` and ``_proxied`` (behind every
    # proxied method) inline the registry's hit path for the common case here - the running task
    # owns the cached entry - one Python frame less than ``self.registry()``. Any other case
    # (first use in a task, an explicit scope, keyword arguments) takes the stock code.

    @property
    def _proxied(self) -> _AS:
        registry = self.registry
        try:
            var = registry._var
        except AttributeError:  # a registry swapped in by hand
            return super()._proxied
        if var is not None:
            fast = var.get()
            if fast is not None:
                loop = _get_running_loop()
                if loop is not None and fast.owner is _current_task(loop):
                    current, glet = getcurrent(), fast.glet
                    if glet is current or current.parent is glet:  # the task's greenlet
                        return fast.value  # type: ignore[no-any-return]
        return super()._proxied

    def __call__(self, **kw: Any) -> _AS:
        """Return the current AsyncSession, creating it if needed (see the stock ``__call__``)."""
        if not kw:
            try:
                var = self.registry._var
            except AttributeError:  # a registry swapped in by hand
                var = None
            if var is not None:
                fast = var.get()
                if fast is not None:
                    loop = _get_running_loop()
                    if loop is not None and fast.owner is _current_task(loop):
                        current, glet = getcurrent(), fast.glet
                        if glet is current or current.parent is glet:  # the task's greenlet
                            return fast.value  # type: ignore[no-any-return]
        return super().__call__(**kw)


async def wait_closed() -> None:
    """Wait until the sessions of finished tasks on this loop are closed.

    Closes run as tasks on the loop (a sync ``Session`` used in a task: in the loop's default
    executor), a few iterations after their task ended. Await this before
    ``await engine.dispose()`` at shutdown (so every connection is back in the pool being
    disposed), or in a test before counting checked-out connections. ``asyncio.run()`` needs no
    help: it waits for pending closes before closing the loop.

    Example::

        >>> import asyncio
        >>> from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
        >>> from sqlalchemy.pool import AsyncAdaptedQueuePool
        >>> engine = create_async_engine("sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool)
        >>> Session = async_scoped_session(async_sessionmaker(engine))
        >>> async def main():
        ...     await asyncio.create_task(Session.connection())  # a task that never remove()s
        ...     await wait_closed()
        ...     checked_out = engine.pool.checkedout()
        ...     await engine.dispose()
        ...     return checked_out
        >>> asyncio.run(main())
        0
    """
    await _aio.wait_closed()
