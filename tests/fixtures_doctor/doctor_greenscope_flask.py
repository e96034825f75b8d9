"""Flask-SQLAlchemy through ``greenscope.flask``: ``db.session`` is a greenscope session."""

from __future__ import annotations

from flask import Flask

from greenscope.flask import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
db = SQLAlchemy(app)

__all__ = ["app", "db"]
