"""greenscope: SQLAlchemy session scoping that is correct on greenlets and asyncio.

One Session per greenlet, task or explicit scope; never shared by accident, never leaked,
closed promptly when its scope ends, whatever gevent patched and whenever.

Note: the submodule ``greenscope.asyncio`` shadows the stdlib name in this namespace once
imported, so this module never refers to the stdlib ``asyncio`` by that name.
"""

from __future__ import annotations

from .explicit import scope as scope
from .fork import fork_safe as fork_safe
from .registry import WeakScopeRegistry as WeakScopeRegistry
from .scoping import current_scope as current_scope
from .session import scoped_session as scoped_session

__all__ = ["WeakScopeRegistry", "current_scope", "fork_safe", "scope", "scoped_session"]
__version__ = "0.1.0"
