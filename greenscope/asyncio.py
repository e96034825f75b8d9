"""``greenscope.asyncio.async_scoped_session``: the stock async class on a ``WeakScopeRegistry``.

No ``scopefunc`` is needed: the default is :func:`greenscope.current_scope`, i.e. the running
task (or an explicit ``greenscope.scope()``). The registry adds one done-callback per task on first
store; when the task finishes its entry is dropped and its ``AsyncSession`` is closed as a task on
the same loop - no more Tasks and sessions kept alive by a forgotten ``remove()`` (SQLAlchemy
issue 8340).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import async_scoped_session as _stock_async_scoped_session

from .registry import WeakScopeRegistry
from .session import _is_async_factory

__all__ = ["async_scoped_session"]

_AS = TypeVar("_AS", bound=AsyncSession)


class async_scoped_session(_stock_async_scoped_session[_AS]):
    """A drop-in :class:`sqlalchemy.ext.asyncio.async_scoped_session` scoped per task.

    :param session_factory: an :class:`sqlalchemy.ext.asyncio.async_sessionmaker`.
    :param scopefunc: optional; default :func:`greenscope.current_scope`. With the default, use
        outside a running task and outside any ``greenscope.scope()`` raises ``RuntimeError``
        instead of silently handing out a session keyed on the event loop's greenlet.

    Example::

        >>> import asyncio
        >>> from sqlalchemy import text
        >>> from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
        >>> from greenscope.asyncio import async_scoped_session
        >>> AsyncSession = async_scoped_session(
        ...     async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))
        >>> async def main():
        ...     one = await AsyncSession.execute(text("select 1"))
        ...     await AsyncSession.remove()
        ...     return one.scalar()
        >>> asyncio.run(main())
        1
    """

    registry: WeakScopeRegistry[_AS]

    def __init__(
        self,
        session_factory: async_sessionmaker[_AS] | Callable[..., _AS],
        scopefunc: Optional[Callable[[], Any]] = None,
    ) -> None:
        if not _is_async_factory(session_factory):
            raise TypeError(
                f"greenscope.asyncio.async_scoped_session needs an async_sessionmaker, got "
                f"{session_factory!r}; use greenscope.scoped_session for a sync Session"
            )
        self.session_factory = session_factory  # type: ignore[assignment]
        self.registry = WeakScopeRegistry(session_factory, scopefunc)
        self.registry._requires_task = scopefunc is None
