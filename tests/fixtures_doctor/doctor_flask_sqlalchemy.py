"""Flask-SQLAlchemy 3: ``db.session`` is keyed on ``id(app_ctx)``."""

from __future__ import annotations

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
db = SQLAlchemy(app)

__all__ = ["app", "db"]
