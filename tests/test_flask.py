"""``greenscope.flask``: Flask-SQLAlchemy's ``db.session`` as a greenscope session."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import flask_sqlalchemy
import pytest
from conftest import run_python, wait_for
from flask import Flask
from sqlalchemy import text

import greenscope
from greenscope.flask import SQLAlchemy, app_context_scope, install
from greenscope.scoping import ScopeKey
from greenscope.wsgi import ScopeMiddleware

pytestmark = pytest.mark.timeout(120)


_made: List[Tuple[Flask, flask_sqlalchemy.SQLAlchemy]] = []


@pytest.fixture(autouse=True)
def _close_what_the_apps_opened() -> Iterator[None]:
    """After each test: close the sessions its requests saw (the stock tests leave them open on
    purpose) and dispose its engines, so no SQLite connection is left to the GC (3.13 warns)."""
    yield
    while _made:
        app, db = _made.pop()
        for session, _ in app.extensions["seen"]:
            session.close()
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


def make_app(db: flask_sqlalchemy.SQLAlchemy, path: Path, pool_size: int = 30) -> Flask:
    app = Flask(__name__)
    _made.append((app, db))
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        "pool_timeout": 5,
    }
    db.init_app(app)
    seen: List[Any] = []
    app.extensions["seen"] = seen

    @app.get("/")
    def index() -> str:
        session = db.session()
        inherited = "request" in session.info
        session.info["request"] = len(seen)
        session.execute(text("select 1"))
        seen.append((session, inherited))
        return "ok"

    @app.get("/raise")
    def fail() -> str:
        db.session.execute(text("select 1"))
        raise RuntimeError("handler failed")

    return app


def checked_out(app: Flask, db: flask_sqlalchemy.SQLAlchemy) -> int:
    with app.app_context():
        return db.engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


def test_db_session_is_a_greenscope_session_scoped_to_the_app_context(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "a.db")
    assert isinstance(db.session, greenscope.scoped_session)
    assert db.session.registry.scopefunc is app_context_scope
    with app.app_context() as ctx:
        outer = db.session()
        assert app_context_scope() is ctx
        with app.app_context():
            inner = db.session()
            assert inner is not outer
        assert db.session() is outer  # the inner teardown removed only the inner session
        assert outer.info == {} and not outer.in_transaction()
        db.session.execute(text("select 1"))
        assert outer.in_transaction()
    assert not outer.in_transaction()  # removed (closed) at teardown
    assert len(db.session.registry) == 0
    assert checked_out(app, db) == 0


def test_requests_get_fresh_sessions_removed_at_teardown(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "b.db")
    client = app.test_client()
    for _ in range(5):
        assert client.get("/").status_code == 200
        assert len(db.session.registry) == 0
        assert checked_out(app, db) == 0
    seen = app.extensions["seen"]
    assert len({id(session) for session, _ in seen}) == 5
    assert not any(inherited for _, inherited in seen)


def test_request_that_raises_leaves_nothing_checked_out(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "c.db")
    client = app.test_client()
    for _ in range(3):
        assert client.get("/raise").status_code == 500
    assert checked_out(app, db) == 0
    assert len(db.session.registry) == 0


def test_explicit_scope_inside_an_app_context_gets_a_fresh_session_per_job(
    tmp_path: Path,
) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "d.db")
    jobs: List[Any] = []
    with app.app_context():
        context_session = db.session()
        for _ in range(3):
            with greenscope.scope() as key:
                assert app_context_scope() is key
                db.session.execute(text("select 1"))
                jobs.append(db.session())
            assert checked_out(app, db) == 0
        assert db.session() is context_session
    assert len({id(s) for s in jobs} | {id(context_session)}) == 4


def test_asyncio_child_of_an_app_context_gets_its_own_session(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "e.db")
    with app.app_context() as ctx:
        mine = db.session()

        async def child() -> Tuple[Any, object]:
            return db.session(), app_context_scope()

        # asyncio.run copies this context (the app context included) into its task
        theirs, key = asyncio.run(child())
        assert theirs is not mine
        assert key is not ctx and isinstance(key, asyncio.Task)
        assert db.session() is mine


def test_install_converts_an_existing_flask_sqlalchemy_db(tmp_path: Path) -> None:
    db = flask_sqlalchemy.SQLAlchemy(session_options={"expire_on_commit": False})
    factory = db.session.session_factory
    session = install(db)
    assert session is db.session and isinstance(session, greenscope.scoped_session)
    assert session.session_factory is factory  # options and listeners kept
    assert install(db) is session
    app = make_app(db, tmp_path / "f.db")
    with app.app_context():
        assert db.session().expire_on_commit is False
    client = app.test_client()
    for _ in range(3):
        client.get("/")
    assert len({id(s) for s, _ in app.extensions["seen"]}) == 3
    assert checked_out(app, db) == 0


def test_install_keeps_a_custom_scopefunc() -> None:
    def per_tenant() -> str:
        return "tenant"

    db = flask_sqlalchemy.SQLAlchemy(session_options={"scopefunc": per_tenant})
    assert install(db).registry.scopefunc is per_tenant
    assert SQLAlchemy(session_options={"scopefunc": per_tenant}).session.registry.scopefunc is (
        per_tenant
    )


def _bypass_teardown(app: Flask, db: flask_sqlalchemy.SQLAlchemy) -> None:
    """Simulate a request whose teardown never removed the session."""
    app.teardown_appcontext_funcs.remove(db._teardown_session)


_STOCK_REQUESTS = 200


def test_stock_flask_sqlalchemy_hands_a_dead_requests_session_to_a_new_request(
    tmp_path: Path,
) -> None:
    """Flask-SQLAlchemy 3 keys on ``id(app_ctx)``: freed contexts' ids are reused."""
    db = flask_sqlalchemy.SQLAlchemy()
    app = make_app(db, tmp_path / "g.db", pool_size=_STOCK_REQUESTS + 1)
    _bypass_teardown(app, db)
    client = app.test_client()
    seen = app.extensions["seen"]
    # Whether a freed context's address is reused depends on the heap: the first inherited
    # session came at request 2 to 15 (CPython 3.10 and 3.11, ten runs each), and a CI run of
    # the whole suite once saw none in 20 requests, so go on until one is seen.
    while len(seen) < _STOCK_REQUESTS and not any(inherited for _, inherited in seen):
        assert client.get("/").status_code == 200
    assert any(inherited for _, inherited in seen), f"no id reused in {len(seen)} requests"
    assert checked_out(app, db) > 1  # and the others were never closed


def test_greenscope_flask_never_hands_a_dead_requests_session_to_a_new_request(
    tmp_path: Path,
) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "h.db")
    _bypass_teardown(app, db)
    client = app.test_client()
    for _ in range(20):
        assert client.get("/").status_code == 200
    seen = app.extensions["seen"]
    assert not any(inherited for _, inherited in seen)
    assert len({id(s) for s, _ in seen}) == 20
    # each dead context's session is closed by this thread's home (its hub's closer greenlet, or
    # a closer thread), with no registry use; at most the last context is still alive
    assert wait_for(lambda: checked_out(app, db) <= 1)
    assert db.session.registry.ended_without_remove >= 19


def test_scope_middleware_around_flask_gives_each_request_its_scope(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "i.db")
    keys: List[object] = []

    @app.get("/key")
    def key() -> str:
        keys.append(app_context_scope())
        db.session.execute(text("select 1"))
        return "ok"

    app.wsgi_app = ScopeMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    for _ in range(3):
        assert client.get("/key").status_code == 200
    assert all(isinstance(k, ScopeKey) for k in keys) and len({id(k) for k in keys}) == 3
    assert checked_out(app, db) == 0


_FLAVOURS = {"stock": flask_sqlalchemy.SQLAlchemy, "greenscope": SQLAlchemy}


@pytest.mark.parametrize("flavour", sorted(_FLAVOURS))
def test_db_session_outside_an_app_context_raises_like_flask_sqlalchemy(
    flavour: str, tmp_path: Path
) -> None:
    db = _FLAVOURS[flavour]()
    make_app(db, tmp_path / "j.db")
    with pytest.raises(RuntimeError, match=r"^Working outside of application context\.") as call:
        db.session()
    with pytest.raises(RuntimeError) as proxied:
        db.session.execute(text("select 1"))
    with pytest.raises(RuntimeError) as removed:
        db.session.remove()
    assert str(call.value) == str(proxied.value) == str(removed.value)
    assert len(db.session.registry.registry) == 0  # nothing was created


def test_db_session_in_an_explicit_scope_without_an_app_context_raises(tmp_path: Path) -> None:
    """A scope is no app context: the session could not find its engine (``current_app``)."""
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "k.db")
    with greenscope.scope():
        with pytest.raises(RuntimeError, match=r"^Working outside of application context\."):
            db.session()
        with app.app_context():  # the scope's job pushes the context it needs: fine
            assert db.session.execute(text("select 1")).scalar() == 1
    assert len(db.session.registry) == 0
    assert checked_out(app, db) == 0


def _nested_context_sessions(app: Flask, db: flask_sqlalchemy.SQLAlchemy) -> Dict[str, Any]:
    outer = db.session()
    outer.execute(text("select 1"))
    with app.app_context():
        inner = db.session()
        inner.execute(text("select 1"))
    return {
        "inner_is_outer": inner is outer,
        "outer_still_current": db.session() is outer,
        "outer_still_in_transaction": outer.in_transaction(),
        "inner_closed": not inner.in_transaction(),
    }


_SAME_AS_FLASK_SQLALCHEMY = {
    "inner_is_outer": False,
    "outer_still_current": True,
    "outer_still_in_transaction": True,
    "inner_closed": True,
}


@pytest.mark.parametrize("flavour", sorted(_FLAVOURS))
def test_app_context_pushed_in_a_request_scope_gets_its_own_session(
    flavour: str, tmp_path: Path
) -> None:
    """Under ScopeMiddleware the request's session is the scope's; a nested app context's
    teardown must not remove (close) it."""
    db = _FLAVOURS[flavour]()
    app = make_app(db, tmp_path / "l.db")
    results: List[Dict[str, Any]] = []

    @app.get("/nested")
    def nested() -> str:
        results.append(_nested_context_sessions(app, db))
        return "ok"

    app.wsgi_app = ScopeMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    for _ in range(2):
        assert client.get("/nested").status_code == 200
    assert results == [_SAME_AS_FLASK_SQLALCHEMY] * 2
    assert len(db.session.registry.registry) == 0
    assert checked_out(app, db) == 0


def test_app_context_pushed_in_a_job_scope_gets_its_own_session(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = make_app(db, tmp_path / "m.db")
    with app.app_context():
        for _ in range(2):
            with greenscope.scope() as key:
                assert _nested_context_sessions(app, db) == _SAME_AS_FLASK_SQLALCHEMY
                assert app_context_scope() is key
    with greenscope.scope() as key, app.app_context():  # the scope's own context, then a nested one
        assert _nested_context_sessions(app, db) == _SAME_AS_FLASK_SQLALCHEMY
        assert app_context_scope() is key
    assert len(db.session.registry) == 0
    assert checked_out(app, db) == 0


# -- under gevent: concurrent requests served by gevent.pywsgi -----------------------------

_GEVENT = """
from gevent import monkey
monkey.patch_all()

import http.client, itertools, json, os, sys, tempfile
import gevent
from gevent.pywsgi import WSGIServer
from flask import Flask
from sqlalchemy import text
import flask_sqlalchemy
from greenscope.flask import SQLAlchemy

MODE = sys.argv[1]
db = SQLAlchemy() if MODE == "greenscope" else flask_sqlalchemy.SQLAlchemy()
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "g.db")
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 60, "max_overflow": 0, "pool_timeout": 5}
db.init_app(app)
serial = itertools.count(1)
seen = []

@app.get("/")
def index():
    session = db.session()
    if "no" not in session.info:
        session.info["no"] = next(serial)
    session.execute(text("select 1"))
    gevent.sleep(0.005)  # let the other requests interleave
    assert db.session() is session
    seen.append(session)  # keep them alive: distinct objects, distinct ids
    return str(session.info["no"])

@app.get("/raise")
def fail():
    db.session.execute(text("select 1"))
    gevent.sleep(0.001)
    raise RuntimeError("handler failed")

server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
server.start()

def client(path, n):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    try:
        out = []
        for _ in range(n):
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            out.append(int(body) if response.status == 200 else response.status)
        return out
    finally:
        conn.close()

ok = gevent.joinall([gevent.spawn(client, "/", 3) for _ in range(30)], raise_error=True)
bad = gevent.joinall([gevent.spawn(client, "/raise", 2) for _ in range(10)], raise_error=True)
gevent.sleep(0.05)
with app.app_context():
    checked_out = db.engine.pool.checkedout()
print(json.dumps({
    "numbers": [n for g in ok for n in g.value],
    "errors": [n for g in bad for n in g.value],
    "distinct_objects": len({id(s) for s in seen}),
    "checked_out": checked_out,
    "registry_len": len(db.session.registry),
}))
"""


def test_concurrent_gevent_requests_get_distinct_sessions_and_leave_nothing_checked_out() -> None:
    result: Dict[str, Any] = run_python(_GEVENT, args=["greenscope"])
    assert len(result["numbers"]) == 90
    assert len(set(result["numbers"])) == 90
    assert result["distinct_objects"] == 90
    assert result["errors"] == [500] * 20
    assert result["checked_out"] == 0
    assert result["registry_len"] == 0
