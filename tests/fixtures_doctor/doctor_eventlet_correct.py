"""eventlet done right: patched first, greenscope's session, psycopg2 made cooperative."""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import os  # noqa: E402

from _wsgi import scoped_app as app  # noqa: E402
from psycogreen.eventlet import patch_psycopg  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

import greenscope  # noqa: E402

patch_psycopg()
URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = create_engine("postgresql+psycopg2://" + URL.split("://", 1)[1])  # never connected
Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
