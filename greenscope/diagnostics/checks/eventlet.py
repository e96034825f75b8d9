"""eventlet: monkeypatched? (The session and driver checks then judge what runs on it.)

eventlet apps patch themselves (``eventlet.monkey_patch()`` first thing) or run under
``gunicorn -k eventlet``, which patches before importing the app; the doctor checks what it
finds after the import, in as-is mode. What is unsafe on eventlet is the same as on gevent: a
stock ``scoped_session`` whose ``threading.local`` predates the patch (one Session per OS
thread, shared by every greenthread), and psycopg2 without a wait callback (every query blocks
the hub); the scoped-session and driver checks report those.
"""

from __future__ import annotations

import sys
from typing import List

from ..findings import OK, WARNING, Context, Finding
from ._common import eventlet_patched

__all__ = ["check_eventlet"]


def check_eventlet(ctx: Context) -> List[Finding]:
    """Report whether eventlet is imported and has monkeypatched threads.

    Example::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_eventlet(Context("as-is")) if "eventlet" not in __import__("sys").modules else []
        []
    """
    if "eventlet" not in sys.modules:
        return []
    if eventlet_patched():
        return [Finding(OK, "eventlet", "monkeypatched: threading.local is per greenthread")]
    if "gevent" in sys.modules:
        return []  # imported next to gevent (a library's optional import): gevent's check speaks
    return [
        Finding(
            WARNING,
            "eventlet",
            "imported, but threads are NOT monkeypatched: thread-locals and locks are per OS "
            "thread, shared by every greenthread",
            "call eventlet.monkey_patch() before anything else is imported (gunicorn -k "
            "eventlet does it in each worker)",
        )
    ]
