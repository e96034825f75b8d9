"""Flask with a greenscope session, and ScopeMiddleware inside it (on ``app.wsgi_app``)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope.wsgi import ScopeMiddleware

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))
app = Flask(__name__)
app.wsgi_app = ScopeMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.route("/")
def index() -> str:
    return str(id(Session()))


__all__ = ["Session", "app", "engine"]
