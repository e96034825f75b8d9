"""Stock ``scoped_session`` (a ``threading.local``) created when the app is imported.

Right on OS threads; under ``gunicorn -k gevent --preload`` it is created before the worker
patches, so every greenlet shares one Session; patched first, it relies on ``remove()``.
"""

from __future__ import annotations

from _wsgi import app
from sqlalchemy.orm import scoped_session, sessionmaker

Session = scoped_session(sessionmaker())

__all__ = ["Session", "app"]
