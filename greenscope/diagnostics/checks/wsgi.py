"""A WSGI app with greenscope sessions: is it wrapped in ``greenscope.wsgi.ScopeMiddleware``?

Greenlet scope is not request scope: gevent's pywsgi and gunicorn's gevent worker serve every
request of a keep-alive connection in one greenlet, and threaded servers reuse their threads.
Without the middleware, a greenscope session in the default scope belongs to that greenlet or
thread, so the requests it serves share one Session (its identity map, its open transaction)
unless each one calls ``remove()``. The check walks the loaded object through the attributes
wrappers keep their inner app in (``.wsgi_app`` - Flask's - ``.app``, ``.application``,
``.wrapped``, ``__wrapped__``) looking for a ``ScopeMiddleware``.
"""

from __future__ import annotations

from typing import Any, List

from ..findings import OK, UNSAFE, WARNING, Context, Finding
from ._common import WRAPPER_ATTRIBUTES, green_runtime, greenscope_registries, is_asgi, name_of

__all__ = ["check_wsgi"]

_FIX = (
    "wrap the WSGI app: app = greenscope.wsgi.ScopeMiddleware(app) (Flask: app.wsgi_app = "
    "ScopeMiddleware(app.wsgi_app))"
)


def _wrapped(app: Any, cls: type, depth: int = 0) -> bool:
    """Does every request to ``app`` pass through a ``cls`` (``ScopeMiddleware``)? Through the
    wrapper attributes; for werkzeug's ``DispatcherMiddleware``, its app and every mount."""
    if isinstance(app, cls):
        return True
    if app is None or isinstance(app, type) or depth > 12:
        return False
    mounts = getattr(app, "mounts", None)
    if isinstance(mounts, dict):
        apps = [getattr(app, "app", None), *mounts.values()]
        return all(_wrapped(inner, cls, depth + 1) for inner in apps if callable(inner))
    for attribute in WRAPPER_ATTRIBUTES:
        try:  # context-local proxies and properties may raise
            inner = getattr(app, attribute, None)
        except Exception:
            continue
        usable = inner is not None and inner is not app and callable(inner)
        if usable and _wrapped(inner, cls, depth + 1):
            return True
    return False


def _has_teardown(app: Any) -> bool:
    """A Flask app with teardown handlers (which may call ``Session.remove()``)."""
    funcs = list(getattr(app, "teardown_request_funcs", {}).get(None, []))
    funcs += list(getattr(app, "teardown_appcontext_funcs", []))
    return bool(funcs)


def check_wsgi(ctx: Context) -> List[Finding]:
    """The loaded WSGI app, if greenscope registries use the default scope.

    Example (no app given: nothing to check)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_wsgi(Context())
        []
    """
    app = ctx.app
    if app is None or not callable(app) or isinstance(app, type) or is_asgi(app):
        return []
    registries = greenscope_registries(default_scope_only=True)
    if not registries:
        return []
    from ...wsgi import ScopeMiddleware

    subject = f"WSGI app {name_of(app)}"
    if _wrapped(app, ScopeMiddleware):
        return [
            Finding(OK, subject, "greenscope.wsgi.ScopeMiddleware wraps it: one scope per request")
        ]
    gevent = green_runtime() is not None or ctx.mode in ("patch", "preload")
    teardown = _has_teardown(app)
    where = (
        "gevent serves every request of a keep-alive connection in one greenlet"
        if gevent
        else "threaded servers run request after request on each thread"
    )
    shared = (
        f"not wrapped in greenscope.wsgi.ScopeMiddleware, and {where}: the requests it serves "
        f"share one Session from {len(registries)} greenscope registr"
        f"{'y' if len(registries) == 1 else 'ies'} in the default scope"
    )
    if gevent and not teardown:
        return [
            Finding(
                UNSAFE,
                subject,
                shared + " (measured: 19 of 20 keep-alive requests on gevent's pywsgi got the "
                "first request's Session)",
                _FIX,
            )
        ]
    if teardown:
        shared += " unless a teardown handler calls Session.remove() after each request"
    else:
        shared += " unless each request calls remove()"
    return [Finding(WARNING, subject, shared, _FIX)]
