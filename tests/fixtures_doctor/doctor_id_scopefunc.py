"""A scopefunc keyed on ``id()`` of the current greenlet: ids are reused."""

from __future__ import annotations

import greenlet
from _wsgi import app
from sqlalchemy.orm import scoped_session, sessionmaker

Session = scoped_session(sessionmaker(), scopefunc=lambda: id(greenlet.getcurrent()))

__all__ = ["Session", "app"]
