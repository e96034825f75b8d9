"""A Celery app next to a greenscope session, without ``greenscope.celery.install(app)``."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

app = Celery("doctor_celery", broker="memory://")
engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))


@app.task
def count_rows() -> int:
    return Session.connection().exec_driver_sql("select 1").scalar_one()  # type: ignore[no-any-return]


__all__ = ["Session", "app", "count_rows", "engine"]
