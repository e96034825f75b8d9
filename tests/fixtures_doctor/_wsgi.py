"""The WSGI callables the fixtures expose as ``app`` (the doctor only imports them).

``app`` is a bare WSGI app; ``scoped_app`` is the same app in ``greenscope.wsgi.ScopeMiddleware``,
which every fixture with a greenscope session uses unless the missing middleware is its point.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from greenscope.wsgi import ScopeMiddleware


def app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


scoped_app = ScopeMiddleware(app)
