"""``greenscope.scoped_session``: the stock ``scoped_session`` with a ``WeakScopeRegistry``.

Only the registry is swapped; every proxied method and attribute is SQLAlchemy's own (``__call__``
and ``_proxied`` only inline the registry's hit path in front of the stock code).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from greenlet import getcurrent
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session as _stock_scoped_session

from .registry import WeakScopeRegistry
from .scoping import _get_running_loop

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
        >>> Session.get_bind().dispose()  # close the pooled connection (3.13 warns at GC)
    """

    registry: WeakScopeRegistry[_S]

    def __init__(
        self,
        # Callable alone, not ``sessionmaker[_S] | Callable[..., _S]``: mypy infers Never from
        # that union and rejects ``scoped_session(sessionmaker(engine))``.
        session_factory: Callable[..., _S],
        scopefunc: Optional[Callable[[], Any]] = None,
    ) -> None:
        if _is_async_factory(session_factory):
            raise TypeError(
                f"greenscope.scoped_session got an async session factory {session_factory!r}; "
                "use greenscope.asyncio.async_scoped_session for AsyncSession"
            )
        self.session_factory = session_factory  # type: ignore[assignment]
        self.registry = WeakScopeRegistry(session_factory, scopefunc)

    # The two entry points of every use - ``Session()`` and ``_proxied`` (behind
    # ``Session.execute``, ``Session.add``, ...) - inline the registry's hit path for the common
    # case (a greenlet, no loop running): one Python frame less than ``self.registry()``, which
    # is what puts them under the stock getcurrent peer (bench/micro.py). Anything else (a task,
    # a first use, parked values, keyword arguments) goes through the stock code and the
    # registry, unchanged.

    @property
    def _proxied(self) -> _S:
        registry = self.registry
        try:
            var = registry._var
        except AttributeError:  # a registry swapped in by hand
            return super()._proxied
        if var is not None:
            fast = var.get()
            if fast is not None and fast.owner is getcurrent() and _get_running_loop() is None:
                return fast.value  # type: ignore[no-any-return]
        # A miss goes on through the MRO, as stock does: a mixin between this class and the
        # stock one (or a subclass's _proxied calling super) runs (tests/test_hit_path_table.py).
        return super()._proxied

    def __call__(self, **kw: Any) -> _S:
        """Return the current Session, creating it if needed (see the stock ``__call__``)."""
        if not kw:
            try:
                var = self.registry._var
            except AttributeError:  # a registry swapped in by hand
                var = None
            if var is not None:
                fast = var.get()
                if fast is not None and fast.owner is getcurrent() and _get_running_loop() is None:
                    session = fast.value
                    if not session._is_asyncio:  # else the stock path warns, as it would
                        return session  # type: ignore[no-any-return]
        return super().__call__(**kw)
