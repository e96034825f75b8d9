"""``greenscope.scoped_session``: the stock ``scoped_session`` with a ``WeakScopeRegistry``.

Only the registry is swapped; every proxied method and attribute is SQLAlchemy's own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as _stock_scoped_session

from .registry import WeakScopeRegistry

__all__ = ["scoped_session"]

_S = TypeVar("_S", bound=Session)


def _is_async_factory(factory: Any) -> bool:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    if isinstance(factory, async_sessionmaker):
        return True
    cls = getattr(factory, "class_", factory)
    return isinstance(cls, type) and issubclass(cls, AsyncSession)


class scoped_session(_stock_scoped_session[_S]):
    """A drop-in :class:`sqlalchemy.orm.scoped_session` that is right on greenlets and asyncio.

    The default scope is :func:`greenscope.current_scope` (explicit scope, else asyncio task,
    else greenlet), whatever gevent patched and whenever. Sessions of finished greenlets, tasks
    and scopes are closed and forgotten even when ``remove()`` is never called.

    :param session_factory: a :class:`sqlalchemy.orm.sessionmaker` (or any callable returning
        a :class:`sqlalchemy.orm.Session`).
    :param scopefunc: optional function returning the scope key; default ``current_scope``.

    Example::

        >>> from sqlalchemy import create_engine, text
        >>> from sqlalchemy.orm import sessionmaker
        >>> import greenscope
        >>> Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
        >>> Session.execute(text("select 1")).scalar()
        1
        >>> Session() is Session()
        True
        >>> Session.remove()
    """

    registry: WeakScopeRegistry[_S]

    def __init__(
        self,
        session_factory: sessionmaker[_S] | Callable[..., _S],
        scopefunc: Optional[Callable[[], Any]] = None,
    ) -> None:
        if _is_async_factory(session_factory):
            raise TypeError(
                f"greenscope.scoped_session got an async session factory {session_factory!r}; "
                "use greenscope.asyncio.async_scoped_session for AsyncSession"
            )
        self.session_factory = session_factory  # type: ignore[assignment]
        self.registry = WeakScopeRegistry(session_factory, scopefunc)
