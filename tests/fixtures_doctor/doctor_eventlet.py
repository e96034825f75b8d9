"""eventlet's import-order bug: a stock ``scoped_session`` built, then eventlet patched - and
patched selectively, which leaves psycopg2 without a wait callback (a bare
``eventlet.monkey_patch()`` would have given it eventlet's)."""

from __future__ import annotations

import os

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = create_engine("postgresql+psycopg2://" + URL.split("://", 1)[1])  # never connected
Session = scoped_session(sessionmaker(engine))

import eventlet  # noqa: E402

eventlet.monkey_patch(os=True, select=True, socket=True, thread=True, time=True)

from _wsgi import app  # noqa: E402

__all__ = ["Session", "app", "engine"]
