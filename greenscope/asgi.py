"""``ScopeMiddleware``: every ASGI request and websocket connection in one explicit scope.

A pure ASGI middleware (``__call__(scope, receive, send)``), so the application runs in the
request's own task, as the server started it (Starlette's ``BaseHTTPMiddleware`` runs the
downstream application in another task). For each ``http`` request and ``websocket`` connection:

- **One scope**, opened before the application is called: :func:`greenscope.current_scope` is
  the request's :class:`~greenscope.scoping.ScopeKey` in the request task, and every
  greenscope registry hands out the request's own session (``async_scoped_session`` and
  ``scoped_session`` alike). A child task the request creates (``create_task``, ``gather``, a
  task group) gets its own session, as everywhere in greenscope (DESIGN rule 4).
- **Handed off to the framework's thread pool**: the sync work the framework runs for the
  request in a worker thread - Starlette's ``run_in_threadpool``, so FastAPI ``def`` endpoints
  and ``def`` dependencies, and ``asyncio.to_thread`` - runs in a copy of the request task's
  context, and is in the request's scope: a ``greenscope.scoped_session`` used there is the
  request's ``Session`` (the same one for a ``def`` dependency and its ``def`` endpoint, even on
  two pool threads). Threads the request did not hand work to (``threading.Thread``,
  ``executor.submit`` without :func:`greenscope.handoff`) and threads still running after the
  request ended never see it.
- **Closed when the application returns** (or raises, or is cancelled by a client
  disconnect): that is when the response is complete *and* no application code can run for
  the request any more - a streaming response's last chunk has been sent, and what the
  framework runs after sending the response has run: Starlette ``BackgroundTasks`` and FastAPI
  ``yield``-dependency exits (FastAPI 0.165 runs them after the response is sent). Those share
  the request's sessions: closing at the final ``http.response.body`` instead would roll back
  what a dependency's exit then commits (measured: 3 of 3 such inserts lost). It is where a
  correct stock application calls ``remove()``.
- **Never blocking the loop**: an ``AsyncSession`` is awaited; a sync ``Session`` holding a
  transaction is closed (ROLLBACK and pool check-in) in the loop's default executor, awaited. A
  close interrupted by a cancellation finishes first; the cancellation is raised after it.
  Errors while closing are logged on the ``greenscope`` logger, never raised into the server
  (the response has already been sent).
- ``lifespan`` (and any other scope type) passes through untouched.

A websocket connection is one scope, from the application's call until it returns.
The event loop must be an asyncio loop (uvicorn, hypercorn's asyncio worker, daphne).

Example::

    >>> import asyncio
    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import sessionmaker
    >>> import greenscope
    >>> from greenscope.asgi import ScopeMiddleware
    >>> Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    >>> seen = []
    >>> async def app(scope, receive, send):
    ...     seen.append(Session())
    ...     await send({"type": "http.response.start", "status": 200, "headers": []})
    ...     await send({"type": "http.response.body", "body": b"ok"})
    >>> async def request():
    ...     async def receive():
    ...         return {"type": "http.request", "body": b""}
    ...     async def send(message):
    ...         pass
    ...     await ScopeMiddleware(app)({"type": "http"}, receive, send)
    >>> async def main():
    ...     await request()
    ...     await request()
    >>> asyncio.run(main())
    >>> seen[0] is not seen[1], len(Session.registry)
    (True, 0)
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from typing import Any, Awaitable, Callable, List, MutableMapping, Optional, Tuple

from sqlalchemy.orm import Session

from . import _closing
from .explicit import restore
from .registry import _all_registries
from .runtimes import aio
from .scoping import ScopeKey, current_owner, scope_var

__all__ = ["ScopeMiddleware"]

_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[MutableMapping[str, Any], _Receive, _Send], Awaitable[None]]
_VarTokens = List[Tuple["contextvars.ContextVar[Any]", "contextvars.Token[Any]"]]


class ScopeMiddleware:
    """Run each ASGI request (and websocket connection) in one explicit greenscope scope.

    The request's sessions are closed when the application returns; see the module docstring for
    why then, and how the framework's thread pool shares the scope.

    :param app: the ASGI 3 application to wrap.

    Example (FastAPI or Starlette: ``app.add_middleware(ScopeMiddleware)``; any ASGI
    application: wrap it)::

        >>> from greenscope.asgi import ScopeMiddleware
        >>> async def hello(scope, receive, send):
        ...     await send({"type": "http.response.start", "status": 200, "headers": []})
        ...     await send({"type": "http.response.body", "body": b"hello"})
        >>> application = ScopeMiddleware(hello)
    """

    __slots__ = ("app",)

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: _Receive, send: _Send
    ) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # lifespan: untouched
            await self.app(scope, receive, send)
            return
        request = _Request()
        tokens = request.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            request.leave(tokens)
            await request.finish()


class _Request:
    """One request's scope key, and how it is entered and left in the request task."""

    __slots__ = ("key",)

    def __init__(self) -> None:
        self.key = ScopeKey(current_owner(), handoff=True)

    def enter(self) -> Tuple[contextvars.Token[Optional[ScopeKey]], _VarTokens]:
        """Make the key current in the request task; hide the registries' cached sessions."""
        hidden: _VarTokens = []
        if len(contextvars.copy_context()) > 0:  # a server's fresh task context caches nothing
            hidden = [(r._var, r._var.set(None)) for r in _all_registries if r._var is not None]
        return scope_var.set(self.key), hidden

    def leave(self, tokens: Tuple[contextvars.Token[Optional[ScopeKey]], _VarTokens]) -> None:
        """Restore the request task's context as it was before :meth:`enter`."""
        scope_token, hidden = tokens
        restore(hidden, scope_token)

    async def finish(self) -> None:
        """The application returned or raised: end the scope, close its sessions."""
        values = self.key.end()
        if values:
            await _close_all(values)


async def _close_all(values: List[Any]) -> None:
    """Close ``values`` without blocking the loop, all at once; log errors. A cancellation
    arriving meanwhile is raised once every close has finished."""
    loop = asyncio.get_running_loop()
    pending: List[Tuple[Any, asyncio.Future[Any]]] = []
    for value in values:
        close = getattr(value, "close", None)
        if close is None:
            continue
        try:
            if inspect.iscoroutinefunction(close):  # AsyncSession
                if aio._in_transaction(value):  # a ROLLBACK to await: in a task of its own
                    pending.append((value, asyncio.ensure_future(close())))
                else:
                    await close()  # nothing to roll back: finishes without suspending
            elif isinstance(value, Session) and not value.in_transaction():
                close()  # no connection held: no I/O
            else:  # a ROLLBACK and a pool check-in: blocking I/O, not on the loop
                pending.append((value, loop.run_in_executor(None, close)))
        except Exception:
            _closing.log.exception("greenscope: error closing %r at request end", value)
    # Each close already runs (a task, an executor job): wait for each to its end in turn. No
    # gather and no task of our own: a request's extra allocations are what sets how often the
    # cyclic GC runs under load (measured: docs/performance.md).
    cancelled: Optional[BaseException] = None
    for value, future in pending:
        try:
            await _closing.to_the_end(future)
        except asyncio.CancelledError as error:  # raised once that close has finished
            cancelled = error
        except Exception:
            _closing.log.exception("greenscope: error closing %r at request end", value)
    if cancelled is not None:
        raise cancelled
