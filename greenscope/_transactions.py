"""When each Session's transaction began at the database, for the runtime report.

"idle in transaction" is the symptom people chase: a session that began a transaction and was
left holding it (and its connection, and its locks). :func:`greenscope.diagnostics.runtime_report`
shows, per registry, how many live sessions are in a transaction and how long the oldest has
been open; this module keeps the one fact it needs and SQLAlchemy does not: *when* a transaction
began.

One class-level ``after_begin`` listener on :class:`sqlalchemy.orm.Session` (every Session, every
subclass, ``AsyncSession.sync_session`` included) records ``time.monotonic()`` for the root
:class:`~sqlalchemy.orm.SessionTransaction` when its first connection begins - when SQLAlchemy
sends the database its ``BEGIN``, not when the session autobegins without I/O. It is registered
when ``greenscope`` is imported, so it is on before the application's first transaction.
Entries are weak: a transaction that ended and was freed leaves nothing behind, and the report
only counts a session's *current* root transaction.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Optional

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["began_at"]

#: root SessionTransaction -> time.monotonic() of its first connection's BEGIN
_began: weakref.WeakKeyDictionary[SessionTransaction, float] = weakref.WeakKeyDictionary()


def _after_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    while transaction.parent is not None:  # a nested transaction's BEGIN is its root's
        transaction = transaction.parent
    if transaction not in _began:
        _began[transaction] = time.monotonic()


def began_at(session: Any) -> Optional[float]:
    """``time.monotonic()`` when ``session``'s current transaction began at the database, or
    None when it is not in one (``AsyncSession``: its ``sync_session``).

    Example::

        >>> from sqlalchemy import create_engine, text
        >>> from sqlalchemy.orm import Session
        >>> engine = create_engine("sqlite://")
        >>> session = Session(engine)
        >>> began_at(session) is None
        True
        >>> _ = session.execute(text("select 1"))
        >>> began_at(session) <= time.monotonic()
        True
        >>> session.commit()
        >>> began_at(session) is None
        True
        >>> session.close(); engine.dispose()
    """
    session = getattr(session, "sync_session", session)
    get_transaction = getattr(session, "get_transaction", None)
    if get_transaction is None:
        return None
    transaction = get_transaction()
    if transaction is None:
        return None
    return _began.get(transaction)


if not event.contains(Session, "after_begin", _after_begin):
    event.listen(Session, "after_begin", _after_begin)
