"""gevent itself: imported, and has it patched ``threading.local``?"""

from __future__ import annotations

import sys
from typing import List

from ..findings import OK, WARNING, Context, Finding
from ._common import gevent_patched

__all__ = ["check_gevent"]


def check_gevent(ctx: Context) -> List[Finding]:
    """Report whether gevent is in use and has patched ``threading.local``.

    Example::

        >>> from greenscope.diagnostics.findings import Context
        >>> [f.level for f in check_gevent(Context("as-is"))] in (["OK"], ["WARNING"])
        True
    """
    if "gevent" not in sys.modules:
        if "eventlet" in sys.modules:
            return []  # an eventlet application: the eventlet check speaks
        hint = ""
        if ctx.mode == "as-is":
            hint = (
                " (run the doctor with --patch, or --preload, to check the app as gunicorn's "
                "gevent worker imports it)"
            )
        return [Finding(OK, "gevent", "not imported: OS threads only, nothing to patch" + hint)]
    if gevent_patched():
        return [Finding(OK, "gevent", "threading.local is patched (per greenlet)")]
    return [
        Finding(
            WARNING,
            "gevent",
            "imported, but threading.local is NOT patched: thread-locals and locks are per OS "
            "thread, shared by every greenlet",
            "call gevent.monkey.patch_all() before anything else is imported (gunicorn -k "
            "gevent does it in each worker)",
        )
    ]
