"""The Celery app of ``doctor_celery`` with a ``task_postrun`` handler that removes the session."""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun
from doctor_celery import Session, app, engine


@task_postrun.connect
def remove_session(**_kwargs: Any) -> None:
    Session.remove()


__all__ = ["Session", "app", "engine", "remove_session"]
