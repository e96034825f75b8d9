"""A plain WSGI app with a greenscope session and no ``ScopeMiddleware``.

Each request answers with the id of the Session it got and whether it was new; under gevent's
pywsgi every request of a keep-alive connection runs in one greenlet, so they share it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))


def app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    inherited = Session.registry.has()
    session = Session()
    body = f"{id(session)} {'inherited' if inherited else 'new'}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


__all__ = ["Session", "app", "engine"]
