"""A WSGI app whose handlers do everything that could leak one user's data into another request.

Run by ``tests/test_security_gunicorn.py`` under real gunicorn
(``-k gevent -c python:greenscope.gunicorn``), on PostgreSQL through psycopg2. Each data request
first reports what its session already holds - ``Session.info``, the identity map, pending and
dirty objects - then puts its own user's state there and *forgets* ``remove()``:

- ``/remember?user=U``: sets ``Session.info``, loads U's rows into the identity map, modifies
  them and adds a pending row (uncommitted changes), and returns without commit or ``remove()``;
- ``/boom?user=U``: the same, then raises mid-request (gunicorn answers 500);
- ``/stats``: connections checked out and live registry entries.

A fresh session per request reports an empty snapshot. ``GREENSCOPE_SECURE_MODE`` picks the
session: ``greenscope`` (default) is ``greenscope.scoped_session``; ``stock`` is SQLAlchemy's
``scoped_session`` with its default thread-local scope, the control that shows the leak. Both are
wrapped in :class:`greenscope.wsgi.ScopeMiddleware`, so the session class is the only difference
(``GREENSCOPE_SECURE_MIDDLEWARE=0`` leaves the middleware out, for the second control).
``DATABASE_URL`` and ``SECURE_TABLE`` (a table ``(id serial, owner text, n int)``) are required.

Example (what the test runs)::

    GREENSCOPE_SECURE_MODE=greenscope DATABASE_URL=postgresql+psycopg2://... SECURE_TABLE=t \\
        gunicorn -k gevent -c python:greenscope.gunicorn --pythonpath tests apps.secure_app:app
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Union
from urllib.parse import parse_qs

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import greenscope
from greenscope.wsgi import ScopeMiddleware

MODE = os.environ.get("GREENSCOPE_SECURE_MODE", "greenscope")
engine = sa.create_engine(os.environ["DATABASE_URL"], pool_size=5, max_overflow=0, pool_timeout=10)
_factory = sessionmaker(engine)
Session: Union[greenscope.scoped_session[Any], sa.orm.scoped_session[Any]]
if MODE == "stock":
    Session = sa.orm.scoped_session(_factory)
else:
    Session = greenscope.scoped_session(_factory)


class Base(DeclarativeBase):
    pass


class Note(Base):
    """One row of a user's private data."""

    __tablename__ = os.environ["SECURE_TABLE"]
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str]
    n: Mapped[int]


def _owners(objects: Iterable[Any]) -> List[str]:
    return sorted(str(obj.owner) for obj in objects if isinstance(obj, Note))


def _snapshot(session: sa.orm.Session) -> Dict[str, Any]:
    """Everything a request could inherit from another one through its session."""
    return {
        "info": {key: value for key, value in session.info.items() if isinstance(key, str)},
        "identity": _owners(session.identity_map.values()),
        "new": _owners(session.new),
        "dirty": _owners(session.dirty),
        "in_transaction": session.in_transaction(),
    }


def _handle(path: str, user: str) -> Dict[str, Any]:
    session = Session()
    seen = _snapshot(session)
    # rows with n == -1 are only ever written uncommitted: seeing one means sharing a transaction
    seen["uncommitted_rows"] = sorted(
        session.scalars(sa.select(Note.owner).where(Note.n == -1)).all()
    )
    session.info["user"] = user  # Session.info
    notes = session.scalars(sa.select(Note).where(Note.owner == user)).all()  # identity map
    for note in notes:
        note.n += 1  # dirty, never committed
    session.add(Note(owner=user, n=-1))  # pending, never committed
    if path == "/boom":
        raise RuntimeError(f"boom in {user}'s request")
    # ... and remove() is forgotten
    return {"user": user, "seen": seen, "loaded": len(notes)}


def _stats() -> Dict[str, Any]:
    registry = Session.registry
    return {
        "mode": MODE,
        "checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
        "registry_len": len(registry)
        if isinstance(registry, greenscope.WeakScopeRegistry)
        else None,
    }


def _app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    path = environ.get("PATH_INFO", "")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/stats":
        body = _stats()
    elif path in ("/remember", "/boom"):
        body = _handle(path, query["user"][0])
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    data = json.dumps(body).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


#: ``GREENSCOPE_SECURE_MIDDLEWARE=0`` leaves the middleware out: greenlet scope alone, which a
#: keep-alive connection shares between requests (the test shows that leak too)
app = _app if os.environ.get("GREENSCOPE_SECURE_MIDDLEWARE") == "0" else ScopeMiddleware(_app)
