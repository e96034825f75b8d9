"""greenscope on SQLite only, in ScopeMiddleware: the app never imports a PostgreSQL driver."""

from __future__ import annotations

from _wsgi import scoped_app as app
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
