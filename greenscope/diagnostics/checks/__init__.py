"""The doctor's checks: one module per runtime, integration or concern.

Each module exposes ``check_<thing>(ctx) -> List[Finding]`` and returns nothing when what it
checks is not in the process. :data:`CHECKS` is the order of the report. A new integration's
check is a new module here, added to :data:`CHECKS`.

- ``gevent``: gevent imported, ``threading.local`` patched;
- ``eventlet``: eventlet imported, threads monkeypatched;
- ``scoped_session``: every stock and greenscope ``scoped_session`` and its scopefunc;
- ``flask``: Flask-SQLAlchemy 3's ``db.session`` (called from ``scoped_session``);
- ``engines``: pools whose locks predate gevent's patch;
- ``drivers``: psycopg2's wait callback, psycopg 3's wait functions (drivers the app uses only);
- ``wsgi``: the loaded WSGI app and ``greenscope.wsgi.ScopeMiddleware``;
- ``asgi``: the loaded ASGI app, its ``def`` endpoints and ``greenscope.asgi.ScopeMiddleware``;
- ``celery``: Celery apps and ``greenscope.celery.install(app)``.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, FrozenSet, List, Optional

from ..findings import Context, Finding, Report
from .asgi import check_asgi
from .celery import check_celery
from .drivers import check_psycopg, check_psycopg2
from .engines import check_engines
from .eventlet import check_eventlet
from .gevent import check_gevent
from .scoped_session import check_scoped_sessions, classify_scopefunc
from .wsgi import check_wsgi

__all__ = [
    "CHECKS",
    "check",
    "check_asgi",
    "check_celery",
    "check_engines",
    "check_eventlet",
    "check_gevent",
    "check_psycopg",
    "check_psycopg2",
    "check_scoped_sessions",
    "check_wsgi",
    "classify_scopefunc",
]

#: every check, in report order
CHECKS: List[Callable[[Context], List[Finding]]] = [
    check_gevent,
    check_eventlet,
    check_scoped_sessions,
    check_engines,
    check_psycopg2,
    check_psycopg,
    check_wsgi,
    check_asgi,
    check_celery,
]


def check(
    mode: str = "as-is",
    target: Optional[str] = None,
    app: Any = None,
    app_modules: Optional[FrozenSet[str]] = None,
) -> Report:
    """Check the current process (after the app is imported) and return the :class:`Report`.

    :param mode: how the app was imported relative to gevent's patch (``as-is``, ``patch``,
        ``preload``), for the fixes the report suggests.
    :param target: the ``module:variable`` the report names.
    :param app: the loaded application object (the WSGI, ASGI and Celery checks look at it).
    :param app_modules: modules that importing the app added (drivers outside it are not
        reported); None counts every imported module.

    Example::

        >>> report = check()
        >>> report.verdict in ("OK", "WARNING", "UNSAFE")
        True
    """
    gc.collect()  # objects already unreachable are not the app's configuration
    ctx = Context(mode, app, app_modules)
    findings: List[Finding] = []
    for run in CHECKS:
        findings += run(ctx)
    return Report(mode, findings, target)
