"""greenscope and psycopg2, but nobody made psycopg2 cooperative (no psycogreen)."""

from __future__ import annotations

import os

from _wsgi import scoped_app as app
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = create_engine("postgresql+psycopg2://" + URL.split("://", 1)[1])  # never connected
Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
