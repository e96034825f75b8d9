"""greenscope.asgi.ScopeMiddleware and greenscope.handoff.

Under a real ``uvicorn`` process (``tests/apps/asgi_app.py``, FastAPI) on a free loopback port,
driven over HTTP with keep-alive clients, on PostgreSQL (asyncpg and psycopg2); each server's
connections carry their own ``application_name``, so ``pg_stat_activity`` shows only theirs.
Then in-process tests (no server) of the hand-off rules: child tasks, threads with and without
a hand-off, threads that outlive the request, the race between a thread and the request's end.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional

import anyio
import httpx
import pytest
from conftest import ROOT, async_pg_url, free_port, require_postgres, sync_pg_url
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

import greenscope
from greenscope.asgi import ScopeMiddleware
from greenscope.scoping import ScopeKey, scope_var

HOST = "127.0.0.1"
START_DEADLINE = 60.0


class Server:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path, name: str):
        self.port, self.process, self.log_path, self.app_name = port, process, log, name
        self.url = f"http://{HOST}:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> Dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return client.get("/stats").json()  # type: ignore[no-any-return]

    def backends(self) -> Dict[str, int]:
        """``pg_stat_activity`` states of this server's connections."""
        import psycopg2

        conn = psycopg2.connect(require_postgres(), connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "select state, count(*) from pg_stat_activity"
                    " where application_name = %s group by state",
                    (self.app_name,),
                )
                return {state: n for state, n in cur.fetchall()}
        finally:
            conn.close()

    def settled(self, timeout: float = 10.0) -> Dict[str, Any]:
        """Stats and backends once nothing is checked out or idle in transaction (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            stats, backends = self.stats(), self.backends()
            clean = (
                stats["entries"] in (0, None)
                and stats["checked_out"] == 0
                and stats["async_checked_out"] == 0
                and backends.get("idle in transaction", 0) == 0
            )
            if clean or time.monotonic() > deadline:
                return {"stats": stats, "backends": backends}
            time.sleep(0.1)


@contextlib.contextmanager
def uvicorn_server(mode: str) -> Iterator[Server]:
    """``uvicorn apps.asgi_app:app`` on a free loopback port; killed by pid at exit."""
    require_postgres()
    port, name = free_port(), f"gs-asgi-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        ASGI_MODE=mode,
        APP_NAME=name,
        DATABASE_URL=sync_pg_url(),
        ASYNC_DATABASE_URL=async_pg_url(),
    )
    log_fd, log_name = tempfile.mkstemp(prefix="greenscope-uvicorn-", suffix=".log")
    command = [sys.executable, "-m", "uvicorn", "--host", HOST, "--port", str(port)]
    command += ["--lifespan", "on", "--log-level", "warning", "--timeout-graceful-shutdown", "5"]
    command += ["--app-dir", str(ROOT / "tests"), "apps.asgi_app:app"]
    process = subprocess.Popen(
        command, stdout=log_fd, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
    )
    os.close(log_fd)
    server = Server(port, process, Path(log_name), name)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited {process.returncode}:\n{server.log()}")
            try:
                server.stats()
                break
            except (httpx.HTTPError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn not ready:\n{server.log()}") from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        server.final_log = server.log()  # type: ignore[attr-defined]
        os.unlink(log_name)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with uvicorn_server("greenscope") as running:
        yield running


def sequential(server: Server, path: str, n: int) -> List[Dict[str, Any]]:
    """``n`` requests, one after another, on one keep-alive connection."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        responses = [client.get(path) for _ in range(n)]
    assert [r.status_code for r in responses] == [200] * n
    return [r.json() for r in responses]


def concurrent(server: Server, path: str, n: int) -> List[Dict[str, Any]]:
    """``n`` requests at once, one connection each."""

    async def run() -> List[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.get(path) for _ in range(n)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * n
    return [r.json() for r in responses]


def assert_nothing_left(server: Server) -> Dict[str, Any]:
    settled = server.settled()
    stats, backends = settled["stats"], settled["backends"]
    assert stats["entries"] == 0, settled  # nothing left registered
    assert stats["checked_out"] == 0, settled
    assert stats["async_checked_out"] == 0, settled
    assert backends.get("idle in transaction", 0) == 0, settled
    return settled


# -- under uvicorn ----------------------------------------------------------------------------


def test_async_endpoint_and_its_async_dependency_share_one_asyncsession_per_request(
    server: Server,
) -> None:
    seen = sequential(server, "/async", 60) + concurrent(server, "/async", 60)
    assert all(r["dependency"] == r["endpoint"] for r in seen)
    assert len({r["endpoint"] for r in seen}) == 120
    settled = assert_nothing_left(server)
    assert {r["endpoint"] for r in seen} <= set(settled["stats"]["closed"])


def test_def_endpoint_and_its_def_dependency_share_one_session_even_on_two_pool_threads(
    server: Server,
) -> None:
    seen = sequential(server, "/sync", 60) + concurrent(server, "/sync", 60)
    assert all(r["dependency"] == r["endpoint"] for r in seen)
    assert len({r["endpoint"] for r in seen}) == 120
    # the concurrent ones ran their dependency and endpoint on different pool threads at times
    assert any(r["dependency_thread"] != r["endpoint_thread"] for r in seen)
    settled = assert_nothing_left(server)
    assert {r["endpoint"] for r in seen} <= set(settled["stats"]["closed"])


def _chunks(response: httpx.Response) -> List[Dict[str, Any]]:
    return [dict(ast.literal_eval(line)) for line in response.text.splitlines()]


def test_streaming_response_keeps_the_requests_session_until_its_body_is_sent(
    server: Server,
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sync_chunks = _chunks(client.get("/stream", params={"delay": 0.05}))
        async_chunks = _chunks(client.get("/astream", params={"delay": 0.05}))
    for chunks in (sync_chunks, async_chunks):
        assert len(chunks) == 3
        assert all(not c["closed"] for c in chunks)  # not closed while the body is produced
        assert all(c["pid"] == c["first_pid"] for c in chunks)  # the same connection throughout
    # a sync body is stepped in the thread pool: handed off, so the proxy gives the request's
    assert all(c["proxy"] == c["request"] for c in sync_chunks)
    # an async body runs in a child task of Starlette's when the server speaks ASGI < 2.4
    # (uvicorn: 2.3) and always on Starlette 0.36.3: the proxy gives that task its own
    # session there (DESIGN rule 4); in the request's own task, the request's
    for c in async_chunks:
        assert (c["proxy"] == c["request"]) is c["in_request_task"], (c, async_chunks[0]["spec"])
    settled = assert_nothing_left(server)
    for chunks in (sync_chunks, async_chunks):
        assert chunks[0]["request"] in settled["stats"]["closed"]


def test_client_disconnect_mid_stream_leaves_nothing_checked_out(server: Server) -> None:
    for path in ("/stream", "/astream"):
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            sock.sendall(f"GET {path}?delay=0.5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # closed before the body ended: the server notices at its next chunk
    time.sleep(1.2)
    assert_nothing_left(server)


def test_background_tasks_share_the_requests_session_closed_when_the_app_returns(
    server: Server,
) -> None:
    requests = sequential(server, "/background", 5)
    deadline = time.monotonic() + 10
    while len(server.stats()["background"]) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    settled = assert_nothing_left(server)
    mine = {r["request"] for r in requests}
    runs = [b for b in settled["stats"]["background"] if b["request"] in mine]
    assert len(runs) == 10
    for run in runs:
        # they run after the response was sent, still in the request's scope, its session open
        assert run["in_request_scope"] and not run["request_closed_before"]
    # the sync one runs in the thread pool, handed off: the proxy gives the request's session
    assert all(run["proxy"] == run["request"] for run in runs if run["kind"] == "sync")
    closed = settled["stats"]["closed"]
    assert all(run["proxy"] in closed for run in runs)


def test_yield_dependency_exit_runs_in_the_scope_and_its_commit_is_kept(
    server: Server, pg_table: str
) -> None:
    # FastAPI runs a yield dependency's exit after the response is sent: the scope must still
    # be open then, or the commit there would find its work rolled back by the close.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for n in range(3):
            params = {"table": pg_table, "owner": f"owner-{n}"}
            assert client.post("/insert", params=params).status_code == 200
        exits = sequential(server, "/sync-yield", 3)
    import psycopg2

    conn = psycopg2.connect(require_postgres(), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(f"select count(*) from {pg_table}")
            assert cur.fetchone() == (3,)
    finally:
        conn.close()
    settled = assert_nothing_left(server)
    seen = {e["request"]: e for e in settled["stats"]["yield_exits"]}
    for response in exits:
        assert response["endpoint"] == response["request"]
        assert seen[response["request"]]["proxy"] == response["request"]
        assert not seen[response["request"]]["closed_before_exit"]


def test_app_that_raises_leaves_nothing_checked_out_or_idle_in_transaction(
    server: Server,
) -> None:
    codes = []
    for path in ["/boom", "/aboom"] * 10:  # uvicorn closes a connection whose app raised
        with httpx.Client(base_url=server.url, timeout=30) as client:
            codes.append(client.get(path).status_code)
    assert codes == [500] * 20
    assert_nothing_left(server)


def test_websocket_connection_is_one_scope(server: Server) -> None:
    from websockets.sync.client import connect

    serials = []
    for _ in range(3):
        with connect(f"ws://{HOST}:{server.port}/ws", open_timeout=10) as ws:
            mine = []
            for _ in range(4):
                ws.send("?")
                mine.append(int(ws.recv(timeout=10)))
            serials.append(mine)
    assert all(len(set(mine)) == 1 for mine in serials)  # one session per connection
    assert len({mine[0] for mine in serials}) == 3  # and one per connection only
    settled = assert_nothing_left(server)
    assert {mine[0] for mine in serials} <= set(settled["stats"]["closed"])


def test_lifespan_events_pass_through_untouched(server: Server) -> None:
    assert server.stats()["lifespan"] == {"startup": True, "scope_is_a_request_scope": False}


# -- the controls: the same server without the middleware, and stock SQLAlchemy -------------


@pytest.mark.parametrize("mode", ["no-middleware", "stock"])
def test_without_the_middleware_a_def_endpoint_hands_one_session_to_many_requests(
    mode: str,
) -> None:
    with uvicorn_server(mode) as control:
        seen = sequential(control, "/sync", 60)
        backends = control.backends()
    distinct = len({r["endpoint"] for r in seen})
    # the pool thread's own session (its main greenlet / thread-local) serves request after
    # request, and stays in the transaction the last one left open
    assert distinct < 60, distinct
    assert backends.get("idle in transaction", 0) >= 1, backends


def test_stock_async_scoped_session_without_remove_keeps_every_connection_checked_out() -> None:
    with uvicorn_server("stock") as control:
        seen = sequential(control, "/async", 8)
        stats = control.stats()
    assert len({r["endpoint"] for r in seen}) == 8
    assert stats["async_checked_out"] == 8  # the whole pool, held by finished requests


# -- in-process: the hand-off rules ---------------------------------------------------------


class Recorder(Session):
    closes: ClassVar[List[Dict[str, Any]]] = []

    def close(self) -> None:
        Recorder.closes.append({"session": self, "thread": threading.get_ident()})
        super().close()


@pytest.fixture
def Db() -> Iterator[Any]:
    engine = create_engine("sqlite://")
    Recorder.closes = []
    yield greenscope.scoped_session(sessionmaker(engine, class_=Recorder))
    engine.dispose()


def serve(app: Callable[..., Any]) -> Callable[[], Any]:
    """One HTTP request through the middleware, without a server: returns the coroutine."""

    async def request() -> None:
        async def receive() -> Dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Dict[str, Any]) -> None:
            pass

        await ScopeMiddleware(app)({"type": "http", "asgi": {"version": "3.0"}}, receive, send)

    return request


async def respond(send: Callable[..., Any]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_child_task_created_inside_the_request_gets_its_own_session(Db: Any) -> None:
    seen: Dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()

        async def child() -> Any:
            return Db()

        seen["child"] = await asyncio.create_task(child())
        seen["child_scope"] = await asyncio.create_task(_scope())
        seen["scope"] = greenscope.current_scope()
        await respond(send)

    async def _scope() -> Any:
        return greenscope.current_scope()

    asyncio.run(serve(app)())
    assert seen["child"] is not seen["request"]
    assert type(seen["scope"]) is ScopeKey and seen["child_scope"] is not seen["scope"]
    assert len(Db.registry) == 0


def test_thread_pool_work_dispatched_by_a_child_task_is_still_handed_the_request(
    Db: Any,
) -> None:
    # What the docs warn about: a child task has its own scope, but the thread work it dispatches
    # runs in a copy of its context, which holds the request's scope: two such calls at once
    # share the request's one Session between two threads.
    seen: Dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()

        async def child() -> Any:
            return Db(), await asyncio.to_thread(Db)

        seen["child"], seen["child_thread"] = await asyncio.create_task(child())
        await respond(send)

    asyncio.run(serve(app)())
    assert seen["child"] is not seen["request"]
    assert seen["child_thread"] is seen["request"]


def test_threads_see_the_request_only_through_a_hand_off(Db: Any) -> None:
    seen: Dict[str, Any] = {}
    pool = ThreadPoolExecutor(2)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()
        loop = asyncio.get_running_loop()
        seen["anyio"] = await anyio.to_thread.run_sync(Db)  # Starlette's run_in_threadpool
        seen["to_thread"] = await asyncio.to_thread(Db)
        seen["handoff"] = await loop.run_in_executor(pool, greenscope.handoff(Db))
        seen["submit"] = pool.submit(greenscope.handoff(Db)).result()
        seen["executor"] = await loop.run_in_executor(pool, Db)
        seen["plain_submit"] = pool.submit(Db).result()
        got: List[Any] = []
        thread = threading.Thread(target=lambda: got.append(Db()))
        thread.start()
        thread.join()
        seen["thread"] = got[0]
        await respond(send)

    try:
        asyncio.run(serve(app)())
    finally:
        pool.shutdown()
    for name in ("anyio", "to_thread", "handoff", "submit"):
        assert seen[name] is seen["request"], name
    for name in ("executor", "plain_submit", "thread"):
        assert seen[name] is not seen["request"], name


def test_thread_still_running_after_the_request_ended_does_not_see_it(Db: Any) -> None:
    seen: Dict[str, Any] = {}
    ended, done = threading.Event(), threading.Event()
    pool = ThreadPoolExecutor(1)

    def late() -> None:
        ended.wait(10)
        seen["scope"] = greenscope.current_scope()
        seen["late"] = Db()
        seen["late_has_entry_in_thread"] = Db.registry.has()
        done.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()
        seen["key"] = greenscope.current_scope()
        pool.submit(greenscope.handoff(late))  # not waited for: outlives the request
        await respond(send)

    try:
        asyncio.run(serve(app)())
        ended.set()
        assert done.wait(10)
    finally:
        pool.shutdown()
    assert seen["key"].ended
    assert seen["scope"] is not seen["key"]
    assert seen["late"] is not seen["request"]
    assert seen["late_has_entry_in_thread"]  # under the thread's own scope ...
    assert seen["key"]._ends == []  # ... nothing registered under the dead request's key


def test_thread_racing_the_requests_end_never_registers_a_session_under_the_dead_key() -> None:
    # The thread resolves the request's scope, and the scope ends while the session is being
    # created (between scopefunc() and the registry storing it): it must land in the thread's
    # own scope, not under the key whose end hooks have already run.
    key = ScopeKey(object(), handoff=True)

    def create() -> Session:
        key.end()
        return Session()

    registry = greenscope.WeakScopeRegistry(create)
    result: Dict[str, Any] = {}

    def in_thread() -> None:
        result["scope"] = greenscope.current_scope()
        result["value"] = registry()
        result["has"] = registry.has()
        result["again"] = registry()

    context = contextvars.copy_context()
    context.run(scope_var.set, key)
    thread = threading.Thread(target=context.run, args=(in_thread,))
    thread.start()
    thread.join()
    assert result["scope"] is key  # it saw the request's scope ...
    assert result["has"] and result["again"] is result["value"]  # ... but stored in its own
    assert key._ends == [] and key.ended


def test_sync_session_holding_a_transaction_is_closed_off_the_event_loop(Db: Any) -> None:
    loop_thread: Dict[str, int] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loop_thread["id"] = threading.get_ident()
        Db.execute(text("select 1"))  # a transaction to roll back
        await respond(send)

    asyncio.run(serve(app)())
    assert len(Recorder.closes) == 1
    assert Recorder.closes[0]["thread"] != loop_thread["id"]


def test_sessions_stay_open_after_the_response_until_the_app_returns(Db: Any) -> None:
    seen: Dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()
        await respond(send)
        seen["closed_after_response"] = list(Recorder.closes)
        seen["after"] = Db()  # what a background task gets: the request's session, still open
        seen["scope"] = greenscope.current_scope()

    asyncio.run(serve(app)())
    assert seen["closed_after_response"] == []
    assert seen["after"] is seen["request"]
    assert type(seen["scope"]) is ScopeKey
    assert [c["session"] for c in Recorder.closes] == [seen["request"]]
    assert len(Db.registry) == 0


def test_app_cancelled_mid_request_closes_its_sessions(Db: Any) -> None:
    seen: Dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["request"] = Db()
        Db.execute(text("select 1"))
        await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(serve(app)())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [c["session"] for c in Recorder.closes] == [seen["request"]]
    assert len(Db.registry) == 0


class SlowClose(Session):
    finished: ClassVar[List[Any]] = []

    def close(self) -> None:
        time.sleep(0.2)  # a slow ROLLBACK, in the loop's executor
        super().close()
        SlowClose.finished.append(self)


def test_cancelled_while_closing_finishes_every_close_then_raises(tmp_path: Path) -> None:
    """A cancellation (a server's request timeout) arriving while the request's sessions
    close: every close runs to its end, connections back in the pool, then it is raised."""
    engine = create_engine(f"sqlite:///{tmp_path / 'slow.db'}")  # QueuePool: checkedout()
    first = greenscope.scoped_session(sessionmaker(engine, class_=SlowClose))
    second = greenscope.scoped_session(sessionmaker(engine, class_=SlowClose))
    SlowClose.finished = []
    seen: Dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["sessions"] = [first(), second()]
        for session in seen["sessions"]:
            session.execute(text("select 1"))  # in a transaction: closed off the loop
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.05, task.cancel)
        await respond(send)

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(serve(app)())
        seen["finished_when_raised"] = list(SlowClose.finished)
        seen["checked_out"] = engine.pool.checkedout()  # type: ignore[attr-defined]

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
    assert sorted(map(id, seen["finished_when_raised"])) == sorted(map(id, seen["sessions"]))
    assert seen["checked_out"] == 0
    assert len(first.registry) == len(second.registry) == 0


def test_lifespan_passes_through_without_a_scope() -> None:
    seen: List[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(greenscope.current_scope())
        seen.append(await receive())

    async def main() -> None:
        async def receive() -> Dict[str, Any]:
            return {"type": "lifespan.startup"}

        async def send(message: Any) -> None:
            pass

        await ScopeMiddleware(app)({"type": "lifespan"}, receive, send)
        seen.append(asyncio.current_task())

    asyncio.run(main())
    assert seen[0] is seen[2]  # the task's own scope, no request scope
    assert seen[1] == {"type": "lifespan.startup"}


def test_handoff_outside_any_explicit_scope_raises() -> None:
    with pytest.raises(RuntimeError, match="outside any explicit scope"):
        greenscope.handoff(print)


def test_handoff_in_a_sync_scope_shares_it_with_a_pool_thread_until_it_ends(Db: Any) -> None:
    with ThreadPoolExecutor(1) as pool:
        with greenscope.scope():
            mine = Db()
            shared = pool.submit(greenscope.handoff(Db)).result()
            wrapped = greenscope.handoff(Db)
        after = pool.submit(wrapped).result()
    assert shared is mine
    assert after is not mine


def test_scope_var_left_unchanged_after_a_request(Db: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        Db()
        await respond(send)

    async def main() -> Optional[ScopeKey]:
        await serve(app)()
        return scope_var.get()

    assert asyncio.run(main()) is None


@pytest.mark.parametrize("order", ["scope-outside", "scope-inside"])
def test_base_http_middleware_runs_the_endpoint_in_another_task(Db: Any, order: str) -> None:
    # Starlette's BaseHTTPMiddleware runs everything downstream of it in a child task: an async
    # endpoint there is not the task that opened the request scope (DESIGN rule 4), while the
    # thread pool still runs in copies of the request's context.
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    seen: Dict[str, Any] = {}

    class Dispatch(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            seen["dispatch"] = Db()
            return await call_next(request)

    async def endpoint(request: Any) -> PlainTextResponse:
        seen["async"] = Db()
        seen["thread"] = await run_in_threadpool(Db)
        return PlainTextResponse("ok")

    stack = [Middleware(ScopeMiddleware), Middleware(Dispatch)]  # the first is the outermost
    app = Starlette(
        routes=[Route("/", endpoint)], middleware=stack if order == "scope-outside" else stack[::-1]
    )

    async def main() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/")).status_code

    assert asyncio.run(main()) == 200
    if order == "scope-outside":
        # the dispatch code and the thread pool share the request's session; the async
        # endpoint, in the child task, has its own (closed when that task ends)
        assert seen["thread"] is seen["dispatch"] and seen["async"] is not seen["dispatch"]
    else:
        # the scope opens in the child task: the endpoint and the thread pool share it; the
        # dispatch code, outside it, has the request task's own session
        assert seen["thread"] is seen["async"] and seen["dispatch"] is not seen["async"]
    assert len(Db.registry) == 0
