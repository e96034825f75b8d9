"""An ASGI app (FastAPI, Starlette) with greenscope sessions: is its ``ScopeMiddleware`` on?

``async def`` endpoints run in the request's own task, which greenscope scopes by itself. ``def``
endpoints and dependencies do not: Starlette and FastAPI run them in anyio's worker threads,
which are reused from request to request. Without ``greenscope.asgi.ScopeMiddleware`` (which
hands each request's scope to the thread-pool work it causes), a greenscope session used there
belongs to the worker thread: every request that thread serves gets the same Session, and
nothing closes it. The middleware is found as the loaded object (or something it wraps) or in
Starlette's ``app.user_middleware`` (entries whose ``.cls`` is the class).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Iterator, List, Optional

from ..findings import OK, UNSAFE, Context, Finding
from ._common import (
    callable_name,
    greenscope_registries,
    inner_apps,
    is_asgi,
    is_async_callable,
    name_of,
)

__all__ = ["check_asgi", "sync_endpoints"]

_FIX = (
    "add greenscope.asgi.ScopeMiddleware: app.add_middleware(greenscope.asgi.ScopeMiddleware) "
    "(or app = greenscope.asgi.ScopeMiddleware(app))"
)


def _routes(app: Any, depth: int = 0) -> Iterator[Any]:
    router = getattr(app, "router", app)
    for route in list(getattr(router, "routes", None) or []):
        yield route
        if depth < 8:  # Mount / Host: their app's routes
            yield from _routes(getattr(route, "app", None), depth + 1)


def _dependency_calls(dependant: Any, depth: int = 0) -> Iterator[Any]:
    if dependant is None or depth > 16:
        return
    call = getattr(dependant, "call", None)
    if call is not None:
        yield call
    for sub in getattr(dependant, "dependencies", None) or []:
        yield from _dependency_calls(sub, depth + 1)


def sync_endpoints(app: Any) -> List[str]:
    """Names of the ``def`` endpoints and dependencies of a Starlette/FastAPI app (thread pool).

    Example::

        >>> from starlette.applications import Starlette
        >>> from starlette.responses import PlainTextResponse
        >>> from starlette.routing import Route
        >>> def hello(request):
        ...     return PlainTextResponse("hi")
        >>> sync_endpoints(Starlette(routes=[Route("/", hello)]))
        ['greenscope.diagnostics.checks.asgi.hello']
    """
    names: List[str] = []
    for route in _routes(app):
        dependant = getattr(route, "dependant", None)  # FastAPI's APIRoute
        calls = list(_dependency_calls(dependant)) if dependant is not None else []
        endpoint = getattr(route, "endpoint", None)
        if not calls and endpoint is not None:
            calls = [endpoint]
        for call in calls:
            if inspect.isclass(call):  # Starlette HTTPEndpoint: its handler methods
                verbs = ("get", "post", "put", "patch", "delete")
                methods = [getattr(call, verb, None) for verb in verbs]
                sync = [m for m in methods if m is not None and not is_async_callable(m)]
                names += [callable_name(m) for m in sync]
            elif not is_async_callable(call):
                names.append(callable_name(call))
    return sorted(set(names))


def _scope_middleware_class() -> Optional[type]:
    """``greenscope.asgi.ScopeMiddleware``, or None where that module is not installed."""
    try:
        module = importlib.import_module("greenscope.asgi")
    except ImportError:
        return None
    cls = getattr(module, "ScopeMiddleware", None)
    return cls if isinstance(cls, type) else None


def _has_scope_middleware(app: Any, cls: Optional[type]) -> bool:
    if cls is None:
        return False
    for inner in inner_apps(app):
        if isinstance(inner, cls):
            return True
        for middleware in getattr(inner, "user_middleware", None) or []:
            if getattr(middleware, "cls", None) is cls:
                return True
    return False


def check_asgi(ctx: Context) -> List[Finding]:
    """The loaded ASGI app, if greenscope registries use the default scope.

    Example (no app given: nothing to check)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_asgi(Context())
        []
    """
    app = ctx.app
    if not is_asgi(app):
        return []
    registries = greenscope_registries(default_scope_only=True)
    if not registries:
        return []
    subject = f"ASGI app {name_of(app)}"
    if _has_scope_middleware(app, _scope_middleware_class()):
        return [
            Finding(
                OK,
                subject,
                "greenscope.asgi.ScopeMiddleware: one scope per request, thread-pool work included",
            )
        ]
    sync = sync_endpoints(app)
    if sync:
        shown = ", ".join(sync[:3]) + (f" and {len(sync) - 3} more" if len(sync) > 3 else "")
        return [
            Finding(
                UNSAFE,
                subject,
                f"def endpoints/dependencies ({shown}) run in reused worker threads and "
                "greenscope.asgi.ScopeMiddleware is not installed: a greenscope session used "
                "there belongs to the thread, so the requests it serves share one Session and "
                "nothing closes it",
                _FIX,
            )
        ]
    return [
        Finding(
            OK,
            subject,
            "only async endpoints: each request's task has its own session, closed when the task "
            "ends (add greenscope.asgi.ScopeMiddleware before adding a def endpoint)",
        )
    ]
