"""Find unsafe session scoping in an application: ``python -m greenscope doctor module:app``.

Users usually arrive here after an incident: requests that saw each other's data, a pool that
ran dry, a worker that froze. Every one of those has a configuration that can be *seen* in a
running process, so the doctor imports the application the way gunicorn would and looks. The
package is laid out by concern:

- :mod:`greenscope.diagnostics.findings`: :class:`Finding`, :class:`Report` and the levels;
- :mod:`greenscope.diagnostics.checks`: one module of checks per runtime or integration (gevent,
  eventlet, scoped sessions, Flask-SQLAlchemy, engines, drivers, WSGI, ASGI, Celery), run by
  :func:`check`;
- :mod:`greenscope.diagnostics.cli`: the command line, :func:`main` and :func:`load_app`;
- :mod:`greenscope.diagnostics.runtime`: :func:`runtime_report` and :func:`log_runtime_report`,
  the view of a running process (live scopes, sessions closed for want of ``remove()``,
  sessions left in a transaction and the age of the oldest; with ``GREENSCOPE_TRACE=1`` where
  they were created). ``greenscope.gunicorn`` logs it at worker exit.

Example::

    >>> from greenscope.diagnostics import check
    >>> check().verdict in ("OK", "WARNING", "UNSAFE")
    True
"""

from __future__ import annotations

from .checks import check as check
from .checks import check_engines as check_engines
from .checks import check_gevent as check_gevent
from .checks import check_psycopg as check_psycopg
from .checks import check_psycopg2 as check_psycopg2
from .checks import check_scoped_sessions as check_scoped_sessions
from .checks import classify_scopefunc as classify_scopefunc
from .cli import load_app as load_app
from .cli import main as main
from .findings import MODES as MODES
from .findings import OK as OK
from .findings import UNSAFE as UNSAFE
from .findings import WARNING as WARNING
from .findings import Context as Context
from .findings import Finding as Finding
from .findings import Report as Report
from .runtime import RegistryReport as RegistryReport
from .runtime import RuntimeReport as RuntimeReport
from .runtime import log_runtime_report as log_runtime_report
from .runtime import runtime_report as runtime_report

__all__ = [
    "Finding",
    "Report",
    "check",
    "load_app",
    "log_runtime_report",
    "main",
    "runtime_report",
]
