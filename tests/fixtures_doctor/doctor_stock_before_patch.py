"""The import-order bug: a stock ``scoped_session`` built, then ``monkey.patch_all()``."""

from __future__ import annotations

from sqlalchemy.orm import scoped_session, sessionmaker

Session = scoped_session(sessionmaker())

from gevent import monkey  # noqa: E402

monkey.patch_all()

from _wsgi import app  # noqa: E402

__all__ = ["Session", "app"]
