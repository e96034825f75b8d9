"""Flask-SQLAlchemy 3's ``db.session``: keyed on ``id(app_ctx)``, removed at teardown.

What actually happens there: Flask-SQLAlchemy registers a ``teardown_appcontext`` handler that
calls ``db.session.remove()`` whenever an app context pops, and every request pops its own. So
requests get their own Session, greenlets or not. The ``id()`` key matters only where that
``remove()`` is skipped: an app context pushed and never popped (a job greenlet that calls
``app.app_context().push()``), or a teardown handler registered after ``init_app`` that raised
first (Flask runs them in reverse order and stops at the first error). The Session stays in the
registry, and the next app context allocated at the same address inherits it, with its pending
objects and open transaction. Measured (tests/test_diagnostics.py): 1,000 sequential gevent
greenlets that pushed an app context and never popped it: 188 to 217 of the 999 after the first
got a dead greenlet's Session (4 runs); with the context popped, 0. A WARNING, then; UNSAFE
when nothing ever removes the session (a ``db`` whose teardown is not registered on any app).
"""

from __future__ import annotations

import sys
from typing import Any

from ..findings import UNSAFE, WARNING, Finding
from ._common import objects_of

__all__ = ["classify_db_session", "is_flask_sqlalchemy_session"]

_FIX = (
    "db = greenscope.flask.SQLAlchemy(app) (or greenscope.flask.install(db)): db.session is "
    "then keyed on the app context object itself, never on its id"
)


def is_flask_sqlalchemy_session(proxy: Any) -> bool:
    """Is ``proxy`` a stock Flask-SQLAlchemy 3 ``db.session`` (scopefunc ``_app_ctx_id``)?

    Example::

        >>> from sqlalchemy.orm import scoped_session, sessionmaker
        >>> is_flask_sqlalchemy_session(scoped_session(sessionmaker()))
        False
    """
    session_module = sys.modules.get("flask_sqlalchemy.session")
    if session_module is None:
        return False
    key = getattr(session_module, "_app_ctx_id", None)
    scopefunc = getattr(getattr(proxy, "registry", None), "scopefunc", None)
    return key is not None and scopefunc is key


def _teardown_registered(proxy: Any) -> bool:
    """Does some Flask app run the teardown of the ``db`` that owns ``proxy``?"""
    extension = sys.modules.get("flask_sqlalchemy.extension")
    flask_app = sys.modules.get("flask.app")
    if extension is None or flask_app is None:
        return False
    owners = [db for db in objects_of(extension.SQLAlchemy) if db.__dict__.get("session") is proxy]
    for app in objects_of(flask_app.Flask):
        for func in getattr(app, "teardown_appcontext_funcs", []):
            if getattr(func, "__self__", None) in owners:
                return True
    return False


def classify_db_session(subject: str, proxy: Any) -> Finding:
    """The finding for a stock Flask-SQLAlchemy 3 ``db.session`` (see the module docstring)."""
    if not _teardown_registered(proxy):
        return Finding(
            UNSAFE,
            subject,
            "Flask-SQLAlchemy session keyed on id(app context) (_app_ctx_id) and no app runs its "
            "teardown (db.init_app was not called on the app using it): nothing removes it, "
            "and a later app context at the same address inherits it",
            _FIX,
        )
    return Finding(
        WARNING,
        subject,
        "Flask-SQLAlchemy 3 keys it on id(app context) (_app_ctx_id); its teardown calls "
        "remove() whenever an app context pops, so each request gets its own Session. Where "
        "remove() is skipped (a context pushed and never popped, a teardown that raised "
        "first), the next app context at the same address inherits that Session and its "
        "transaction (measured: about 1 in 5 greenlets that pushed a context and never popped it)",
        _FIX,
    )
