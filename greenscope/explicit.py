"""``greenscope.scope()``: an explicit scope for a request, a job, or any block of work.

Greenlet scope is not request scope: gevent's pywsgi and gunicorn's gevent worker serve every
request of a keep-alive connection in one greenlet, and a job loop lives for hours. Inside
``with greenscope.scope():`` every greenscope registry hands out a fresh session, and at exit
(also on an exception) those sessions are closed and removed. Scopes nest; leaving an inner
scope never touches the outer scope's session. A scope belongs to the greenlet or task that
opened it: child greenlets and tasks get their own sessions.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from types import TracebackType
from typing import Any, Callable, Generator, List, Optional, Tuple, Type, TypeVar, cast

from . import _closing, runtimes
from .registry import _all_registries
from .runtimes import aio
from .scoping import ScopeKey, _get_running_loop, current_owner, scope_var

__all__ = ["scope"]

_F = TypeVar("_F", bound=Callable[..., Any])
_VarTokens = List[Tuple["contextvars.ContextVar[Any]", "contextvars.Token[Any]"]]


class scope:
    """Open an explicit scope: ``with``, ``async with``, or as a decorator.

    ``__enter__`` returns the scope's key (what :func:`greenscope.current_scope` returns inside).
    At exit every session created inside is closed - awaited for ``AsyncSession`` under
    ``async with`` - and removed from its registry.

    Example::

        >>> from sqlalchemy import create_engine
        >>> from sqlalchemy.orm import sessionmaker
        >>> import greenscope
        >>> Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
        >>> outer = Session()
        >>> with greenscope.scope():
        ...     inner = Session()
        ...     inner is outer
        False
        >>> Session() is outer
        True
        >>> @greenscope.scope()
        ... def job():
        ...     return Session()
        >>> job() is not job()
        True
    """

    __slots__ = ("_key", "_scope_token", "_var_tokens")

    def __init__(self) -> None:
        self._key: Optional[ScopeKey] = None
        self._scope_token: Optional[contextvars.Token[Optional[ScopeKey]]] = None
        self._var_tokens: _VarTokens = []

    # -- the with / async with protocol -------------------------------------------------

    def __enter__(self) -> ScopeKey:
        if self._key is not None:
            raise RuntimeError("this greenscope.scope() is already open; create a new one")
        key = self._key = ScopeKey(current_owner())
        self._scope_token = scope_var.set(key)
        # Hide every registry's fast-path cache, so the outer scope's session is not found.
        self._var_tokens = [
            (r._var, r._var.set(None)) for r in list(_all_registries) if r._var is not None
        ]
        return key

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        first_error = close_at_scope_end(self._leave())
        if first_error is not None and exc_type is None:
            raise first_error

    async def __aenter__(self) -> ScopeKey:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        values = self._leave()
        if not values:
            return
        first_error = await _closing.to_the_end(_close_all(values))
        if first_error is not None and exc_type is None:
            raise first_error

    def _leave(self) -> List[Any]:
        """Drop this scope's entries and restore the caller's context; return values to close."""
        key = self._key
        if key is None:
            raise RuntimeError("this greenscope.scope() is not open")
        values = key.end()
        restore(self._var_tokens, self._scope_token)
        self._key = self._scope_token = None
        self._var_tokens = []
        return values

    # -- the decorator ------------------------------------------------------------------

    def __call__(self, fn: _F) -> _F:
        """Run every call of ``fn`` in a fresh scope that spans its whole work.

        - a coroutine function: ``async with`` around the awaited body;
        - a generator function: the scope spans the iteration, from the first ``next()`` to
          exhaustion or ``close()``, and is current only while the generator's own code runs
          (each step runs in a context of its own, so between steps the consumer is back in
          its own scope);
        - a plain function: ``with`` around the call; if it *returns* a coroutine or a
          generator, the scope spans awaiting or iterating it, as above.

        An async generator function raises ``TypeError`` here: an async generator's steps run in
        its consumer's context, so no scope could stay its own across them. Open
        ``async with greenscope.scope():`` around each unit of work inside it instead.
        """
        if inspect.isasyncgenfunction(fn):
            raise TypeError(_ASYNC_GENERATOR)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with scope():
                    return await fn(*args, **kwargs)

            return cast(_F, run_async)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def run_generator(*args: Any, **kwargs: Any) -> Any:
                return _scoped_iteration(fn(*args, **kwargs))

            return cast(_F, run_generator)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with scope():
                result = fn(*args, **kwargs)
            if inspect.iscoroutine(result):
                return _scoped_awaiting(result)
            if inspect.isgenerator(result):
                return _scoped_iteration(result)
            if inspect.isasyncgen(result):
                result.aclose().close()  # never started: nothing to finalize
                raise TypeError(_ASYNC_GENERATOR)
            return result

        return cast(_F, run)


_ASYNC_GENERATOR = (
    "greenscope.scope() cannot decorate an async generator: its steps run in the consumer's "
    "context, so no scope could stay its own across them; open `async with greenscope.scope():` "
    "around each unit of work inside it"
)


async def _scoped_awaiting(coro: Any) -> Any:
    async with scope():
        return await coro


def _scoped_iteration(gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Iterate ``gen`` inside one fresh scope, each step in the scope's own context (as
    :class:`greenscope.wsgi.ScopeMiddleware` steps a response body)."""
    context = contextvars.copy_context()
    opened = scope()
    key = context.run(opened.__enter__)
    error: Optional[BaseException] = None
    try:
        step: Callable[[Any], Any] = gen.send
        arg: Any = None
        while True:
            owner = current_owner()
            if key.owner is not owner:  # consumed by another greenlet or task than opened it
                key.owner = owner
            try:
                item = context.run(step, arg)
            except StopIteration as stop:
                return stop.value
            try:
                arg, step = (yield item), gen.send
            except GeneratorExit:
                context.run(gen.close)
                raise
            except BaseException as thrown:  # thrown in by the consumer: into the generator
                arg, step = thrown, gen.throw
    except BaseException as exc:
        error = exc
        raise
    finally:
        context.run(opened.__exit__, type(error) if error is not None else None, error, None)


def close_at_scope_end(values: List[Any]) -> Optional[BaseException]:
    """Close a scope's values in order (``with`` exit, WSGI request end); log errors and
    return the first. An ``AsyncSession`` left in a sync scope finishes closing on the running
    loop. If the closing greenlet is killed or timed out meanwhile, the interrupted value and the
    rest are closed elsewhere before the kill goes on."""
    first_error: Optional[BaseException] = None
    for index, value in enumerate(values):
        try:
            awaitable = _closing.start_close(value)
        except Exception as error:
            _closing.log.exception("greenscope: error closing %r at scope exit", value)
            first_error = first_error or error
            continue
        except BaseException:  # killed or timed out while closing: close the rest elsewhere
            _close_elsewhere(values[index:])
            raise
        if awaitable is not None:
            aio.finish_close(value, awaitable, _get_running_loop())
    return first_error


def _close_elsewhere(values: List[Any]) -> None:
    """The exiting greenlet is being killed (``gevent.Timeout``, ``kill()``): this thread's home
    (a closer greenlet of its hub, its loop, or a closer thread) closes what it could not - the
    interrupted session again (the pool invalidates a connection whose reset fails) and the ones
    not reached yet - instead of leaving them to the GC."""
    home = runtimes.home_here()
    for value in values:
        home.close_soon(value, None)


async def _close_all(values: List[Any]) -> Optional[BaseException]:
    """Close ``values`` in order (awaiting async closes); log errors, return the first."""
    first_error: Optional[BaseException] = None
    for value in values:
        try:
            awaitable = _closing.start_close(value)
            if awaitable is not None:
                await awaitable
        except Exception as error:
            _closing.log.exception("greenscope: error closing %r at scope exit", value)
            first_error = first_error or error
    return first_error


def restore(
    var_tokens: List[Tuple[contextvars.ContextVar[Any], contextvars.Token[Any]]],
    scope_token: Optional[contextvars.Token[Optional[ScopeKey]]],
) -> None:
    """Leave a scope's context as it was entered: reset the registries' cached sessions it
    hid, clear those cached inside it (registries created there too), reset the scope."""
    restored = set()
    for var, token in reversed(var_tokens):
        _reset(var, token)
        restored.add(var)
    for registry in list(_all_registries):
        var = registry._var
        if var is not None and var not in restored and var.get() is not None:
            var.set(None)
    if scope_token is not None:
        _reset(scope_var, scope_token)


def _reset(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    try:
        var.reset(token)
    except ValueError:  # exited in another context than it was entered in
        old = token.old_value
        var.set(None if old is contextvars.Token.MISSING else old)
