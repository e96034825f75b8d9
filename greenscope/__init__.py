"""greenscope: SQLAlchemy session scoping that is correct on greenlets and asyncio.

One Session per greenlet, task or explicit scope; never shared by accident, never leaked,
closed promptly when its scope ends, whatever gevent patched and whenever.

Note: the submodule ``greenscope.asyncio`` shadows the stdlib name in this namespace once
imported, so this module never refers to the stdlib ``asyncio`` by that name.
"""

from __future__ import annotations

import logging as _logging

# records when each Session's transaction began, for diagnostics.runtime_report (before the
# application's first transaction)
from . import _transactions as _transactions
from .drivers import patch_drivers as patch_drivers
from .explicit import scope as scope
from .fork import fork_safe as fork_safe
from .handoffs import handoff as handoff
from .registry import WeakScopeRegistry as WeakScopeRegistry
from .scoping import current_scope as current_scope
from .session import scoped_session as scoped_session

__all__ = [
    "WeakScopeRegistry",
    "current_scope",
    "fork_safe",
    "handoff",
    "patch_drivers",
    "scope",
    "scoped_session",
]
__version__ = "0.1.0"

# A library logs and lets the application decide where it goes (gunicorn's hooks in
# greenscope.gunicorn log through gunicorn's own error log instead).
_logging.getLogger("greenscope").addHandler(_logging.NullHandler())
