"""Flask-SQLAlchemy 2.5 style: keyed on ``greenlet.getcurrent`` in a plain dict."""

from __future__ import annotations

import greenlet
from _wsgi import app
from sqlalchemy.orm import scoped_session, sessionmaker

Session = scoped_session(sessionmaker(), scopefunc=greenlet.getcurrent)

__all__ = ["Session", "app"]
