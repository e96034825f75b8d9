"""Flask with a greenscope session and no ScopeMiddleware, no teardown either."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))
app = Flask(__name__)


@app.route("/")
def index() -> str:
    return str(id(Session()))


__all__ = ["Session", "app", "engine"]
