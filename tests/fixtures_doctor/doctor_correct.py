"""The right configuration: greenscope's scoped_session, psycopg2 made cooperative."""

from __future__ import annotations

import os

from _wsgi import scoped_app as app
from psycogreen.gevent import patch_psycopg
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

patch_psycopg()

URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = create_engine("postgresql+psycopg2://" + URL.split("://", 1)[1])  # never connected
Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
