"""``greenscope.wsgi.ScopeMiddleware``: one scope per request, closed after the response closes."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import gevent
import gevent.event
import pytest
from conftest import run_python, session_class_whose_first_close_hangs
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import greenscope
from greenscope.scoping import ScopeKey
from greenscope.wsgi import ScopeMiddleware

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = create_engine(f"sqlite:///{tmp_path / 'wsgi.db'}")
    yield eng
    eng.dispose()


def checked_out(engine: Engine) -> int:
    return engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


class FakeServer:
    """Just enough of a WSGI server: records start_response, iterates, closes."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.status: Optional[str] = None

    def start_response(self, status: str, headers: List[Any], exc_info: Any = None) -> Any:
        self.status = status
        return lambda data: None

    def call(self, environ: Optional[Dict[str, Any]] = None) -> Iterable[bytes]:
        return self.app(environ if environ is not None else {}, self.start_response)

    def request(self, environ: Optional[Dict[str, Any]] = None) -> bytes:
        result = self.call(environ)
        try:
            return b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


def session_app(Session_: Any, seen: List[Any]) -> Callable[..., Iterable[bytes]]:
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        session = Session_()
        session.execute(text("select 1"))
        seen.append((session, greenscope.current_scope(), environ.get("greenscope.scope")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


# -- plain requests -------------------------------------------------------------------------


def test_request_killed_while_closing_its_sessions_still_gets_every_session_closed(
    engine: Engine,
) -> None:
    """Regression: the request-end close loop was a copy of ``scope.__exit__``'s without its
    kill handling, so a kill (or gevent.Timeout) during the first close leaked the others."""
    in_close, never = gevent.event.Event(), gevent.event.Event()

    BlocksOnce = session_class_whose_first_close_hangs(in_close, never)  # the kill lands there

    one = greenscope.scoped_session(sessionmaker(engine, class_=BlocksOnce))
    two = greenscope.scoped_session(sessionmaker(engine, class_=BlocksOnce))

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        one().execute(text("select 1"))
        two().execute(text("select 1"))
        start_response("200 OK", [])
        return [b"ok"]

    server = FakeServer(ScopeMiddleware(app))
    job = gevent.spawn(server.request)
    in_close.wait()
    held = checked_out(engine)
    job.kill()  # GreenletExit raised inside the first close, at the response's close()
    for _ in range(100):  # the closer greenlet finishes the job
        if checked_out(engine) == 0:
            break
        gevent.sleep(0)
    assert [held, checked_out(engine), len(one.registry), len(two.registry)] == [2, 0, 0, 0]


def test_each_request_gets_a_fresh_session_closed_and_removed_after_close(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    seen: List[Any] = []
    server = FakeServer(ScopeMiddleware(session_app(Session_, seen)))
    for _ in range(5):
        assert server.request() == b"ok"
        assert checked_out(engine) == 0
        assert len(Session_.registry) == 0
    assert len({id(s) for s, _, _ in seen}) == 5
    assert all(isinstance(key, ScopeKey) and key is env_key for _, key, env_key in seen)
    assert all(not s.in_transaction() for s, _, _ in seen)


def test_same_greenlet_without_middleware_reuses_the_session_across_requests(
    engine: Engine,
) -> None:
    """The failure the middleware exists for: greenlet scope is not request scope."""
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    seen: List[Any] = []
    server = FakeServer(session_app(Session_, seen))
    for _ in range(3):
        server.request()
    assert len({id(s) for s, _, _ in seen}) == 1
    assert checked_out(engine) == 1
    Session_.remove()


def test_streamed_body_keeps_the_session_open_until_the_server_calls_close(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        session = Session_()
        session.execute(text("select 1"))
        start_response("200 OK", [])
        yield b"ok"

    result = FakeServer(ScopeMiddleware(app)).call()
    assert list(result) == [b"ok"]
    assert checked_out(engine) == 1  # application code may still run, in close()
    result.close()  # type: ignore[attr-defined]
    assert (checked_out(engine), len(Session_.registry)) == (0, 0)


@pytest.mark.parametrize("body", [[b"o", b"k"], (b"o", b"k")])
def test_list_body_ends_the_scope_before_the_server_writes_it(
    engine: Engine, body: Iterable[bytes]
) -> None:
    """A list or tuple body has no close() and runs no application code when stepped: the scope
    ends as the application returns, so its connection is back in the pool while the response is
    written (a request waiting for the pool gets it first: issue 15), and the server gets the
    body itself (no wrapper, no Python frame per chunk)."""
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    seen: List[Session] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(Session_())
        seen[0].execute(text("select 1"))
        start_response("200 OK", [])
        return body

    result = FakeServer(ScopeMiddleware(app)).call()
    assert result is body
    assert (checked_out(engine), len(Session_.registry)) == (0, 0)
    assert not seen[0].in_transaction()


def test_close_error_of_a_list_response_is_logged_and_raised_from_the_call(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class CloseFails(Session):
        def close(self) -> None:
            super().close()
            raise OSError("close failed")

    Session_ = greenscope.scoped_session(sessionmaker(engine, class_=CloseFails))
    caplog.set_level(logging.ERROR, logger="greenscope")
    with pytest.raises(OSError, match="close failed"):
        FakeServer(ScopeMiddleware(session_app(Session_, []))).call()
    assert any("error closing" in r.getMessage() for r in caplog.records)
    assert checked_out(engine) == 0


# -- streaming ---------------------------------------------------------------------------


def test_streaming_response_uses_the_request_session_while_yielding_until_closed(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    server_session = Session_()  # the server greenlet's own session: must never be handed out
    server_session.execute(text("select 1"))
    steps: List[Any] = []
    pulled: List[int] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request_session = Session_()
        request_session.execute(text("select 1"))
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            try:
                for n in range(3):
                    pulled.append(n)
                    steps.append((Session_(), greenscope.current_scope()))
                    yield b"%d" % n
            finally:  # runs at close(), inside the request's scope
                steps.append((Session_(), greenscope.current_scope()))

        steps.append((request_session, greenscope.current_scope()))
        return body()

    result = FakeServer(ScopeMiddleware(app)).call()
    request_session, key = steps[0]
    assert pulled == []  # nothing consumed eagerly
    assert greenscope.current_scope() is not key  # the scope does not leak into the server
    assert Session_() is server_session
    iterator = iter(result)
    assert next(iterator) == b"0"
    assert pulled == [0]
    assert greenscope.current_scope() is not key
    assert Session_() is server_session
    assert next(iterator) == b"1"
    assert checked_out(engine) == 2  # the server's and the request's
    assert request_session.in_transaction()
    result.close()  # type: ignore[attr-defined]  # closed early, as after a client disconnect
    assert [s for s, _ in steps] == [request_session] * 4
    assert [k for _, k in steps] == [key] * 4
    assert not request_session.in_transaction()
    assert checked_out(engine) == 1
    assert Session_() is server_session
    Session_.remove()


def test_streaming_steps_on_another_greenlet_still_see_the_request_session(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    seen: List[Session] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(Session_())
        start_response("200 OK", [])
        return (seen.append(Session_()) or b"x" for _ in range(2))  # type: ignore[func-returns-value]

    result = FakeServer(ScopeMiddleware(app)).call()
    body = gevent.spawn(lambda: b"".join(result)).get()
    assert body == b"xx"
    assert seen[0] is seen[1] is seen[2]
    result.close()  # type: ignore[attr-defined]
    assert len(Session_.registry) == 0


def test_registry_created_during_a_request_does_not_leak_into_the_server(engine: Engine) -> None:
    made: List[Any] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        Session_ = greenscope.scoped_session(sessionmaker(engine))
        made.append((Session_, Session_()))
        start_response("200 OK", [])
        return [b""]

    FakeServer(ScopeMiddleware(app)).request()
    Session_, request_session = made[0]
    assert Session_() is not request_session
    assert len(Session_.registry) == 1
    Session_.remove()


# -- errors --------------------------------------------------------------------------------


def test_app_that_raises_in_the_call_leaves_nothing_checked_out(engine: Engine) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    error = RuntimeError("handler failed")

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        Session_().execute(text("select 1"))
        raise error

    with pytest.raises(RuntimeError) as raised:
        FakeServer(ScopeMiddleware(app)).call()
    assert raised.value is error
    assert checked_out(engine) == 0
    assert len(Session_.registry) == 0


def test_app_that_raises_while_iterating_closes_inner_iterable_and_session_at_once(
    engine: Engine,
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    closed: List[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            Session_().execute(text("select 1"))
            yield b"first"
            raise ValueError("body failed")

        def close(self) -> None:
            closed.append(Session_() is not None)

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    result = FakeServer(ScopeMiddleware(app)).call()
    iterator = iter(result)
    assert next(iterator) == b"first"
    assert checked_out(engine) == 1
    with pytest.raises(ValueError, match="body failed"):
        next(iterator)
    assert closed == [True]
    assert checked_out(engine) == 0
    result.close()  # type: ignore[attr-defined]  # the server still calls it: a no-op now
    assert closed == [True]
    with pytest.raises(StopIteration):
        next(iterator)
    assert len(Session_.registry) == 0


def test_iteration_error_wins_over_an_error_from_the_inner_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Body:
        def __iter__(self) -> Iterator[bytes]:
            raise ValueError("body failed")

        def close(self) -> None:
            raise OSError("inner close failed")

    caplog.set_level(logging.ERROR, logger="greenscope")
    result = FakeServer(ScopeMiddleware(lambda environ, sr: Body())).call()
    with pytest.raises(ValueError, match="body failed"):
        next(iter(result))
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [OSError]


def test_inner_close_is_called_exactly_once_even_when_close_is_called_twice() -> None:
    calls: List[str] = []

    class Body(list):  # type: ignore[type-arg]
        def close(self) -> None:
            calls.append("close")

    result = FakeServer(ScopeMiddleware(lambda environ, sr: Body([b"a"]))).call()
    assert list(result) == [b"a"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert calls == ["close"]


def test_close_error_at_request_end_is_logged_and_raised_from_close(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class CloseFails(Session):
        def close(self) -> None:
            super().close()
            raise OSError("close failed")

    Session_ = greenscope.scoped_session(sessionmaker(engine, class_=CloseFails))

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        Session_().execute(text("select 1"))
        start_response("200 OK", [])
        yield b"ok"

    caplog.set_level(logging.ERROR, logger="greenscope")
    result = FakeServer(ScopeMiddleware(app)).call()
    assert list(result) == [b"ok"]
    with pytest.raises(OSError, match="close failed"):
        result.close()  # type: ignore[attr-defined]
    assert any("error closing" in r.getMessage() for r in caplog.records)
    assert checked_out(engine) == 0


# -- wsgi.file_wrapper -----------------------------------------------------------------------


class ServerFileWrapper:
    """Like wsgiref's and gunicorn's FileWrapper: ``close`` is an instance attribute."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.filelike.read(4), b"")


def test_file_wrapper_result_is_returned_unwrapped_and_closing_it_ends_the_scope(
    engine: Engine, tmp_path: Path
) -> None:
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    path = tmp_path / "body.bin"
    path.write_bytes(b"0123456789")
    opened: List[Any] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        Session_().execute(text("select 1"))
        start_response("200 OK", [])
        opened.append(path.open("rb"))
        return environ["wsgi.file_wrapper"](opened[0])  # type: ignore[no-any-return]

    environ = {"wsgi.file_wrapper": ServerFileWrapper}
    result = FakeServer(ScopeMiddleware(app)).call(environ)
    assert isinstance(result, ServerFileWrapper)  # the server's sendfile path still applies
    assert b"".join(result) == b"0123456789"
    assert checked_out(engine) == 1
    result.close()
    assert opened[0].closed
    assert checked_out(engine) == 0
    assert len(Session_.registry) == 0


def test_file_wrapper_that_refuses_a_close_attribute_is_wrapped(engine: Engine) -> None:
    class SlottedWrapper:
        __slots__ = ("data",)

        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Iterator[bytes]:
            return iter([self.data])

    Session_ = greenscope.scoped_session(sessionmaker(engine))

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        Session_().execute(text("select 1"))
        start_response("200 OK", [])
        return SlottedWrapper(b"data")

    server = FakeServer(ScopeMiddleware(app))
    result = server.call({"wsgi.file_wrapper": SlottedWrapper})
    assert not isinstance(result, SlottedWrapper)
    assert list(result) == [b"data"]
    result.close()  # type: ignore[attr-defined]
    assert checked_out(engine) == 0


# -- a real server: gevent.pywsgi, keep-alive, streaming, errors ---------------------------------

_SERVER = """
from gevent import monkey
monkey.patch_all()

import http.client, itertools, json, os, sys, tempfile
import gevent
from gevent.pywsgi import WSGIServer
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker
import greenscope
from greenscope.wsgi import ScopeMiddleware

MODE = sys.argv[1]
engine = create_engine("sqlite:///" + os.path.join(tempfile.mkdtemp(), "srv.db"),
                       pool_size=40, max_overflow=0)
factory = sessionmaker(engine)
if MODE == "greenscope":
    Session = greenscope.scoped_session(factory)
else:
    Session = scoped_session(factory)  # stock: threading.local, patched to gevent.local

serial = itertools.count(1)
streamed = {}

def session_no():
    session = Session()
    if "no" not in session.info:
        session.info["no"] = next(serial)
    session.execute(text("select 1"))
    return session.info["no"]

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/raise":
        session_no()
        raise RuntimeError("handler failed")
    if path == "/stream":
        first = session_no()
        start_response("200 OK", [("Content-Type", "text/plain")])
        def body():
            for n in range(3):
                gevent.sleep(0.001)
                streamed.setdefault("steps", []).append(
                    [first, session_no(), engine.pool.checkedout()])
                yield b"chunk%d;" % n
        return body()
    body = str(session_no()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]

wsgi = ScopeMiddleware(app) if MODE == "greenscope" else app
server = WSGIServer(("127.0.0.1", 0), wsgi, log=None, error_log=None)
server.start()
port = server.server_port

def keep_alive(n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        out = []
        for _ in range(n):
            conn.request("GET", "/")
            response = conn.getresponse()
            out.append(int(response.read()))
            assert not response.will_close
        return out
    finally:
        conn.close()

result = {}
result["keep_alive"] = keep_alive(10)
result["concurrent"] = [g.get() for g in gevent.joinall(
    [gevent.spawn(keep_alive, 3) for _ in range(20)], raise_error=True)]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
conn.request("GET", "/stream")
response = conn.getresponse()
result["stream_body"] = response.read().decode()
conn.close()
gevent.sleep(0.05)
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
conn.request("GET", "/raise")
result["raise_status"] = conn.getresponse().status
conn.close()
gevent.sleep(0.05)
result["stream_steps"] = streamed["steps"]
result["checked_out_end"] = engine.pool.checkedout()
server.stop()
print(json.dumps(result))
"""


def test_pywsgi_keep_alive_streaming_and_errors_with_scope_middleware() -> None:
    result = run_python(_SERVER, args=["greenscope"])
    keep_alive = result["keep_alive"]
    assert len(set(keep_alive)) == 10  # 10 requests on one connection: 10 fresh sessions
    concurrent = list(itertools.chain.from_iterable(result["concurrent"]))
    assert len(concurrent) == 60
    assert len(set(concurrent) | set(keep_alive)) == 70
    assert result["stream_body"] == "chunk0;chunk1;chunk2;"
    steps = result["stream_steps"]
    assert len(steps) == 3
    # while the server iterated the body, the session was the request's and still open
    assert all(first == during for first, during, _ in steps)
    assert all(held == 1 for _, _, held in steps)
    assert result["raise_status"] == 500
    assert result["checked_out_end"] == 0


def test_pywsgi_keep_alive_with_stock_scoped_session_shows_cross_talk() -> None:
    result = run_python(_SERVER, args=["stock"])
    # every request of one keep-alive connection saw the first request's session
    assert len(set(result["keep_alive"])) == 1
    assert all(len(set(seen)) == 1 for seen in result["concurrent"])
