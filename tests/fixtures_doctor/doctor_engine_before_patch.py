"""An engine (QueuePool) created before ``monkey.patch_all()``: its lock is an OS lock."""

from __future__ import annotations

from sqlalchemy import create_engine

import greenscope

engine = create_engine("sqlite:////tmp/greenscope-doctor-fixture.db")  # never connected

from gevent import monkey  # noqa: E402

monkey.patch_all()

from _wsgi import scoped_app as app  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

Session = greenscope.scoped_session(sessionmaker(engine))

__all__ = ["Session", "app", "engine"]
