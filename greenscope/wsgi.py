"""``ScopeMiddleware``: every WSGI request in its own explicit scope.

Greenlet scope is not request scope: gevent's pywsgi and gunicorn's gevent worker serve every
request of a keep-alive connection in one greenlet, so a greenlet-scoped session would carry one
request's state into the next. The middleware gives each request its own
:class:`~greenscope.scoping.ScopeKey`; every greenscope registry hands out a fresh session inside
it, and those sessions are closed and removed when the request ends.

When does a request end? PEP 3333 lets the server iterate the response body *after* the
application returned, and call the iterable's ``close()`` last - possibly on the same greenlet,
with server code (header writing, logging, the next request's parsing) in between. So:

- **The request gets its own** :class:`contextvars.Context`, copied from the server's when the
  request starts. The application call, every ``next()`` of the response iterable and its
  ``close()`` each run inside that context (``Context.run``), where ``current_scope()`` is the
  request's key and every registry's fast-path cache starts empty (as on entering
  :func:`greenscope.scope`). Nothing set there - the scope, the
  registries' caches, context variables the application sets - leaks into the server code between
  two steps, and the request still sees its own values at the next step (the fast path stays warm
  across body chunks).
- **The scope is closed** - its sessions closed and removed, errors logged - as soon as no
  application code can run any more: when the application returns a ``list`` or ``tuple`` (it has
  no ``close()`` and its steps run no application code; the server gets it as it is, and the
  connection is back in the pool *before* the server writes the response, so a request waiting
  for the pool gets it rather than this keep-alive greenlet's next request); else after the
  wrapped iterable's ``close()`` when the server calls ``close()`` on the response; at once when
  the application raises in the call; and at once when an iteration step raises (the wrapped
  ``close()`` is called first, inside the scope). ``close()`` is idempotent. If a broken server
  never calls ``close()``, the scope key is freed with the response and its sessions are closed by
  the thread's home (see :mod:`greenscope.runtimes`).
- **Owner**: a scope belongs to the greenlet or thread that uses it. Servers iterate on the
  greenlet that called the application; should one iterate elsewhere, the key is handed to the
  greenlet running the step (``key.owner`` is updated), so the session is still the request's.
- **Nothing is consumed eagerly**: the wrapper pulls one item per ``next()`` of the server.
- ``wsgi.file_wrapper``: when the application returns an instance of the server's
  ``environ["wsgi.file_wrapper"]`` class, it is returned *unwrapped* so the server keeps its
  ``sendfile`` fast path (gunicorn checks ``isinstance(result, environ["wsgi.file_wrapper"])``);
  the scope's end is chained onto that instance's ``close``. Reading a file needs no database
  session, so the scope is not made current while the server sends it. If the instance does not
  accept a ``close`` attribute, it is wrapped like any other iterable (correct, but the server
  then streams it without ``sendfile``).

The request's key is also put in ``environ["greenscope.scope"]``.

Example::

    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import sessionmaker
    >>> import greenscope
    >>> from greenscope.wsgi import ScopeMiddleware
    >>> Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    >>> def app(environ, start_response):
    ...     start_response("200 OK", [("Content-Type", "text/plain")])
    ...     return [str(id(Session())).encode()]
    >>> wrapped = ScopeMiddleware(app)
    >>> def call():
    ...     result = wrapped({}, lambda status, headers, exc_info=None: None)
    ...     try:
    ...         return b"".join(result)
    ...     finally:
    ...         if hasattr(result, "close"):  # a list body has none: its scope ended already
    ...             result.close()
    >>> first = call()
    >>> len(Session.registry)  # the request's session was closed and removed
    0
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Iterable, Iterator, Optional

from . import _closing
from .explicit import close_at_scope_end
from .registry import _all_registries
from .scoping import ScopeKey, current_owner, scope_var

__all__ = ["ScopeMiddleware"]

_StartResponse = Callable[..., Any]
_WSGIApp = Callable[[Any, _StartResponse], Iterable[bytes]]


class ScopeMiddleware:
    """Run each WSGI request in its own explicit :func:`greenscope.scope`.

    Sessions from any greenscope registry used during the request - in the application call, while
    the response body is produced, in the body's ``close()`` - are the request's own, and are
    closed and removed when the server closes the response (or the application raises). See the
    module docstring for how the scope stays current while the server iterates the body.

    :param app: the WSGI application to wrap.

    Example (Flask: ``app.wsgi_app = ScopeMiddleware(app.wsgi_app)``)::

        >>> from greenscope.wsgi import ScopeMiddleware
        >>> def hello(environ, start_response):
        ...     start_response("200 OK", [])
        ...     return [b"hello"]
        >>> application = ScopeMiddleware(hello)
        >>> body = application({}, lambda *args: None)  # a list: the scope has ended already
        >>> list(body)
        [b'hello']
    """

    __slots__ = ("app",)

    def __init__(self, app: _WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: _StartResponse) -> Iterable[bytes]:
        request = _Request(environ)
        try:
            # One Context.run: the scope is entered and the application called inside it.
            result: Iterable[bytes] = request.context.run(
                _enter_and_call, request, self.app, environ, start_response
            )
        except BaseException:
            request.end(failed=True)
            raise
        if type(result) is list or type(result) is tuple:
            # No application code can run any more (a list has no close() and its steps run
            # none): end the scope now, before the server writes the body. The connection goes
            # back to the pool while the response is sent, so a request waiting for it gets it
            # first, instead of this keep-alive greenlet taking it straight back.
            request.end(failed=False)
            return result
        file_wrapper = environ.get("wsgi.file_wrapper") if isinstance(environ, dict) else None
        is_file = isinstance(file_wrapper, type) and isinstance(result, file_wrapper)
        if is_file and _chain_close(result, request):
            return result
        request.result = result
        return request


class _Request:
    """One request: its scope key, the contextvars Context its steps run in, and the response
    body handed to the server (stepped inside the scope; ``close()`` ends the scope)."""

    __slots__ = ("context", "ended", "inner_closed", "iterator", "key", "result")

    def __init__(self, environ: Any) -> None:
        key = self.key = ScopeKey(current_owner())
        self.ended = False
        self.context = contextvars.copy_context()
        self.result: Iterable[bytes] = ()
        self.iterator: Optional[Iterator[bytes]] = None
        self.inner_closed = False
        if isinstance(environ, dict):
            environ["greenscope.scope"] = key

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` with this request's scope current."""
        owner = current_owner()
        if self.key.owner is not owner:  # a server stepping on another greenlet or thread
            self.key.owner = owner
        return self.context.run(fn, *args)

    def end(self, failed: bool) -> None:
        """Close and remove the request's sessions (once). Re-raise a close error on success."""
        if self.ended:
            return
        self.ended = True
        first_error = close_at_scope_end(self.key.end())
        if first_error is not None and not failed:
            raise first_error

    # -- the response iterable ------------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.ended:
            raise StopIteration
        try:
            if self.iterator is None:
                self.iterator = self.run(iter, self.result)
            return self.run(next, self.iterator)  # type: ignore[no-any-return]
        except StopIteration:
            raise
        except BaseException:
            try:
                self._close_inner(failed=True)
            except Exception:  # the iteration error is the one the server must see
                _closing.log.exception("greenscope: error closing a response that failed")
            raise

    def close(self) -> None:
        """PEP 3333: close the wrapped iterable (inside the scope), then end the scope."""
        self._close_inner(failed=False)

    def _close_inner(self, failed: bool) -> None:
        try:
            if not self.inner_closed:
                self.inner_closed = True
                close = getattr(self.result, "close", None)
                if close is not None and not self.ended:
                    self.run(close)
                elif close is not None:
                    close()
        except BaseException:
            self.end(failed=True)
            raise
        self.end(failed=failed)


def _enter_and_call(request: _Request, app: _WSGIApp, *args: Any) -> Iterable[bytes]:
    """Inside the request's fresh Context: make its key current, hide every registry's cached
    value, then call the application."""
    # The copy of an empty context holds no cached value (gunicorn's and pywsgi's connection
    # greenlets run with an empty one: each request's variables live in its own copy).
    hide = len(request.context) > 0
    scope_var.set(request.key)
    if hide:
        for registry in _all_registries:
            var = registry._var
            if var is not None:
                var.set(None)
    return app(*args)


def _chain_close(result: Any, request: _Request) -> bool:
    """Chain the scope's end onto a server file wrapper's ``close``; False if it refuses."""
    inner: Optional[Callable[[], Any]] = getattr(result, "close", None)

    def close() -> None:
        try:
            if inner is not None:
                inner()
        except BaseException:
            request.end(failed=True)
            raise
        request.end(failed=False)

    try:
        result.close = close
    except (AttributeError, TypeError):
        return False
    return True
