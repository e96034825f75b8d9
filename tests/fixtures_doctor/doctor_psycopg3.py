"""greenscope on psycopg 3 (``postgresql+psycopg://``), wrapped in ScopeMiddleware.

Whether its queries block a gevent worker depends only on when psycopg is imported: after
``monkey.patch_all()`` it picks a cooperative wait function, before (``--preload``) its C one.
"""

from __future__ import annotations

import os

from _wsgi import scoped_app as app
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = create_engine("postgresql+psycopg://" + URL.split("://", 1)[1])  # imports psycopg
Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
