"""Flask-SQLAlchemy on greenscope: ``db.session`` as a greenscope session.

Flask-SQLAlchemy 3 builds ``db.session`` as a stock ``scoped_session`` keyed on
``id(app_ctx)`` and removes it in a ``teardown_appcontext`` handler. An ``id()`` is only a hint:
once a request's app context is freed, the next context is very likely allocated at the same
address, so whenever ``remove()`` is skipped (a teardown that never ran, a streaming response
never closed, a context popped by hand) the next request inherits the dead request's Session,
its pending objects and its open transaction, and the registry keeps it forever.

:class:`SQLAlchemy` (a subclass; use it instead of ``flask_sqlalchemy.SQLAlchemy``) and
:func:`install` (for an existing ``db``) make ``db.session`` a :class:`greenscope.scoped_session`
whose scope is :func:`app_context_scope`:

1. outside any app context: ``RuntimeError`` ("Working outside of application context."),
   exactly as Flask-SQLAlchemy raises - also inside an explicit scope, since a Flask-SQLAlchemy
   session finds its engine through ``current_app`` and could not run a query there anyway;
2. the innermost explicit :func:`greenscope.scope` opened by this greenlet or task
   (``greenscope.wsgi.ScopeMiddleware`` around ``app.wsgi_app``, a job's
   ``with greenscope.scope()``), so a job loop inside one app context gets a fresh session per job.
   That holds for the app context the scope is first used under; an app context pushed inside
   that one gets its own session, as in Flask-SQLAlchemy;
3. else the current Flask **app context object itself** - held weakly and verified by identity,
   never by ``id()`` - which keeps Flask-SQLAlchemy 3's documented semantics (one session per
   app context, nested ``app.app_context()`` blocks get their own) - but only for the greenlet or
   task that first used the session under that context: an asyncio child task, which runs in a
   copy of its parent's contextvars, or another greenlet pushing the same context object gets its
   own session (DESIGN rule 4), keyed on :func:`greenscope.current_scope` (the greenlet or task).

Flask's teardown still calls ``db.session.remove()`` (Flask-SQLAlchemy's own handler is kept), so
each request's session is closed when its app context pops, exactly as before. If that is ever
skipped, no later request can see the session: its key is the dead context object, and when that
object is freed the registry closes the session on its next use.

Example::

    >>> from flask import Flask
    >>> from sqlalchemy import text
    >>> from greenscope.flask import SQLAlchemy
    >>> app = Flask(__name__)
    >>> app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    >>> db = SQLAlchemy(app)
    >>> with app.app_context():
    ...     outer = db.session()
    ...     with app.app_context():
    ...         inner = db.session()
    ...     db.session.execute(text("select 1")).scalar(), outer is inner
    (1, False)
    >>> len(db.session.registry)  # every app context's session was removed at teardown
    0
    >>> with app.app_context():
    ...     db.engine.dispose()  # close the pooled connection (3.13 warns at GC)
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict

import flask_sqlalchemy
from flask.ctx import AppContext
from flask.globals import _cv_app, app_ctx
from flask_sqlalchemy.session import Session as FlaskSession
from flask_sqlalchemy.session import _app_ctx_id

from .scoping import ScopeKey, current_scope
from .session import scoped_session

__all__ = ["SQLAlchemy", "app_context_scope", "install"]

#: app context -> weak reference to the greenlet or task that first used a session under it
_claims: weakref.WeakKeyDictionary[AppContext, weakref.ref[Any]] = weakref.WeakKeyDictionary()
#: explicit scope -> weak reference to the app context its session belongs to
_homes: weakref.WeakKeyDictionary[ScopeKey, weakref.ref[AppContext]] = weakref.WeakKeyDictionary()


def app_context_scope() -> object:
    """The scope of ``db.session``: explicit scope, else this app context, else the greenlet/task.

    Outside any app context it raises ``RuntimeError`` ("Working outside of application
    context."), exactly as Flask-SQLAlchemy's ``id(app_ctx)`` scope does - also inside an explicit
    :func:`greenscope.scope`: a Flask-SQLAlchemy session finds its engine through
    ``current_app``, so a session handed out there could not run a query anyway.

    See the module docstring for the rules. Usable as the ``scopefunc`` of any greenscope
    registry in a Flask application::

        >>> from flask import Flask
        >>> import greenscope
        >>> from greenscope.flask import app_context_scope
        >>> app = Flask(__name__)
        >>> with app.app_context() as ctx:
        ...     app_context_scope() is ctx
        True
        >>> with app.app_context(), greenscope.scope() as key:
        ...     app_context_scope() is key
        True
        >>> app_context_scope()
        Traceback (most recent call last):
          ...
        RuntimeError: Working outside of application context.
        ...
    """
    ctx = _cv_app.get(None)
    if ctx is None:
        ctx = app_ctx._get_current_object()  # type: ignore[attr-defined]  # raises RuntimeError
    key = current_scope()
    if type(key) is ScopeKey:
        # The scope's session belongs to the first app context it is used under (the request's
        # under ScopeMiddleware, the job's outer context in a job loop); an app context pushed
        # inside that one gets its own session, as in Flask-SQLAlchemy, so its teardown's
        # remove() never closes the scope's session.
        home = _homes.get(key)
        if home is None:
            _homes[key] = weakref.ref(ctx)
            return key
        if home() is ctx:
            return key
    claim = _claims.get(ctx)
    if claim is None:
        _claims[ctx] = weakref.ref(key)
        return ctx
    return ctx if claim() is key else key


def _greenscope_session(
    factory: Callable[..., FlaskSession], scopefunc: Any
) -> scoped_session[FlaskSession]:
    if scopefunc is None or scopefunc is _app_ctx_id:
        scopefunc = app_context_scope
    return scoped_session(factory, scopefunc)


class SQLAlchemy(flask_sqlalchemy.SQLAlchemy):
    """``flask_sqlalchemy.SQLAlchemy`` whose ``db.session`` is a greenscope session.

    Everything else - models, engines, binds, ``session_options``, the teardown that removes the
    session - is Flask-SQLAlchemy's own. A ``scopefunc`` in ``session_options`` is still honoured;
    the default is :func:`app_context_scope` instead of ``id(app_ctx)``.

    Example::

        >>> from flask import Flask
        >>> import greenscope
        >>> from greenscope.flask import SQLAlchemy
        >>> db = SQLAlchemy()
        >>> isinstance(db.session, greenscope.scoped_session)
        True
        >>> app = Flask(__name__)
        >>> app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
        >>> db.init_app(app)
    """

    def _make_scoped_session(self, options: Dict[str, Any]) -> scoped_session[FlaskSession]:
        scopefunc = options.pop("scopefunc", None)
        return _greenscope_session(self._make_session_factory(options), scopefunc)


def install(db: flask_sqlalchemy.SQLAlchemy) -> scoped_session[FlaskSession]:
    """Make an existing ``db.session`` a greenscope session; return it.

    Call it right after creating ``db`` (before any request): the session factory - and so every
    ``session_options`` setting and event listener, such as ``SQLALCHEMY_TRACK_MODIFICATIONS`` -
    is kept; a custom ``scopefunc`` is kept too, the default ``id(app_ctx)`` becomes
    :func:`app_context_scope`. Calling it twice is harmless.

    Example::

        >>> import flask_sqlalchemy
        >>> import greenscope
        >>> from greenscope.flask import install
        >>> db = flask_sqlalchemy.SQLAlchemy()
        >>> session = install(db)
        >>> session is db.session and isinstance(db.session, greenscope.scoped_session)
        True
    """
    current = db.session
    if isinstance(current, scoped_session):
        return current
    session = _greenscope_session(current.session_factory, current.registry.scopefunc)
    db.session = session
    return session
