"""The Celery app of ``doctor_celery``, with ``greenscope.celery.install(app)``."""

from __future__ import annotations

import greenscope.celery
from doctor_celery import Session, app, engine

greenscope.celery.install(app)

__all__ = ["Session", "app", "engine"]
