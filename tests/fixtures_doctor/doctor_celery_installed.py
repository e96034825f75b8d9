"""The Celery app of ``doctor_celery``, with ``greenscope.celery.install(app)``."""

from __future__ import annotations

from doctor_celery import Session, app, engine

import greenscope.celery

greenscope.celery.install(app)

__all__ = ["Session", "app", "engine"]
