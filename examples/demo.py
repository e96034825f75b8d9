"""``make demo``: stock ``scoped_session`` versus greenscope under real gunicorn, side by side.

    python examples/demo.py                 # embedded SQLite (a file in a temporary directory)
    DATABASE_URL=postgresql+psycopg2://postgres@127.0.0.1:5432/test python examples/demo.py
    python examples/demo.py --json          # also one JSON object on the last line

Part 1 runs ``examples/failures.py`` (three stock failures reproduced in one process, if present).
Part 2 starts ``examples/app.py`` twice under ``gunicorn -k gevent --preload
-c python:greenscope.gunicorn`` on a free loopback port - once with ``GREENSCOPE_DEMO_MODE=stock``
(``sqlalchemy.orm.scoped_session`` built at import, handlers that never call ``remove()``), once
with ``greenscope`` (``greenscope.scoped_session`` and ``ScopeMiddleware``) - and drives the same
bounded load at each: 400 requests from 50 client threads, 20 keep-alive connections of 5 requests
each, and 20 requests to a handler that raises after using its session. It prints requests,
distinct sessions, requests that saw another request's session, connections left checked out and
requests/s, and exits 1 if greenscope shows any cross-talk, failure or leak.

The same server configuration serves both columns (greenscope.gunicorn's hooks rebuild the pool
after patching and make psycopg2 cooperative in both), so the difference is session scoping only.
The functions here (:func:`gunicorn_server`, :func:`drive_load`) are reused by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HOST = "127.0.0.1"  # loopback only: the load never leaves this machine

REQUESTS = 400
CONCURRENCY = 50
KEEPALIVE_CONNECTIONS = 20
KEEPALIVE_REQUESTS = 5
BOOM_REQUESTS = 20
HANDLER_SLEEP = 0.005  # seconds each request holds its session, cooperatively
HTTP_TIMEOUT = 30.0
START_DEADLINE = 30.0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- the server ----------------------------------------------------------------------------


@dataclass
class Server:
    """A running gunicorn: its port, process and log file."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: str
    #: the whole log, kept when the server has stopped (worker_exit lines included)
    final_log: str = ""

    def log(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def get_json(self, path: str) -> Tuple[int, Any]:
        """One request on a fresh connection: (status, parsed JSON body or text)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=HTTP_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def stats(self) -> Dict[str, Any]:
        status, body = self.get_json("/stats")
        if status != 200:
            raise RuntimeError(f"/stats answered {status}: {body}")
        return body  # type: ignore[no-any-return]


def _no_control_socket() -> List[str]:
    """``--no-control-socket`` on gunicorn 25.1+ (no socket under ``$HOME``); older ones lack it."""
    from gunicorn.config import KNOWN_SETTINGS

    known = any("--no-control-socket" in (getattr(s, "cli", None) or []) for s in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


@contextlib.contextmanager
def gunicorn_server(
    mode: str,
    *,
    port: Optional[int] = None,
    database_url: Optional[str] = None,
    workers: Optional[int] = 1,
    config: Optional[str] = "python:greenscope.gunicorn",
    worker_class: Optional[str] = "gevent",
    extra_env: Optional[Dict[str, str]] = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Server]:
    """Run ``examples/app.py`` under real gunicorn with ``--preload``; always killed at exit.

    ``config=None`` runs without greenscope's configuration (to show what it changes);
    ``workers=None`` and ``worker_class=None`` leave those to the configuration.
    """
    port = port or free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GREENSCOPE_DEMO_MODE"] = mode
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra_env or {})
    command = [sys.executable, "-m", "gunicorn", "--preload", *_no_control_socket()]
    if config:
        command += ["-c", config]
    if worker_class:
        command += ["-k", worker_class]
    command += ["-b", f"{HOST}:{port}", "--graceful-timeout", "5"]
    if workers is not None:  # None: the configuration's own setting
        command += ["-w", str(workers)]
    command += ["--pythonpath", str(EXAMPLES), *extra_args, "app:app"]
    log_fd, log_path = tempfile.mkstemp(prefix="greenscope-gunicorn-", suffix=".log")
    process = subprocess.Popen(
        command,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,  # its own process group: the workers are killed with it
    )
    os.close(log_fd)
    server = Server(port, process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(process)
        server.final_log = server.log()
        os.unlink(log_path)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited {server.process.returncode}:\n{server.log()}")
        try:
            if server.get_json("/stats")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn not ready after {START_DEADLINE} s:\n{server.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # quick shutdown: the master stops its workers
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        # The master is still alive, so its process group (made for it) is still ours to kill.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# -- the load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What the client saw; every figure is counted, none is timed except ``per_second``."""

    mode: str
    requests: int = 0
    failed: int = 0
    distinct_sessions: int = 0
    crosstalk: int = 0
    keepalive_connections: int = 0
    keepalive_reused: int = 0
    keepalive_one_greenlet: int = 0
    boom_requests: int = 0
    boom_status: List[int] = field(default_factory=list)
    checkedout_after: int = -1
    per_second: float = 0.0
    errors: List[str] = field(default_factory=list)
    responses: List[Dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> Dict[str, Any]:
        data = asdict(self)
        data.pop("responses")
        data["errors"] = self.errors[:5]
        data["boom_status"] = sorted(set(self.boom_status))
        return data


class _Progress:
    """A counter, shown as one updating line on stderr while the load runs (if a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._show, daemon=True)
            self._thread.start()

    def step(self) -> None:
        with self._lock:
            self.done += 1

    def _show(self) -> None:
        while not self._stop.wait(0.1):
            sys.stderr.write(f"\r  {self.label}: {self.done}/{self.total} requests")
            sys.stderr.flush()

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sys.stderr.write(f"\r  {self.label}: {self.done}/{self.total} requests, done\n")
        sys.stderr.flush()


def _query(conn: http.client.HTTPConnection, pause: float) -> Dict[str, Any]:
    request_id = uuid.uuid4().hex
    conn.request("GET", f"/query?sleep={pause}", headers={"X-Request-Id": request_id})
    response = conn.getresponse()
    data = response.read()
    try:
        body: Dict[str, Any] = json.loads(data)
    except ValueError:
        body = {"error": data[:200].decode(errors="replace")}
    body["status"] = response.status
    body["sent_id"] = request_id
    sock = conn.sock
    body["client_port"] = sock.getsockname()[1] if sock is not None else None
    return body


def _client_error(error: Exception) -> Dict[str, Any]:
    """A request the server never answered (reset, timed out): counted as failed."""
    return {"status": 0, "error": f"client: {type(error).__name__}: {error}", "client_port": None}


def _one_request(port: int, pause: float) -> List[Dict[str, Any]]:
    conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)
    try:
        return [_query(conn, pause)]
    except (OSError, http.client.HTTPException) as error:
        return [_client_error(error)]
    finally:
        conn.close()


def _keepalive_connection(
    port: int, count: int, pause: float, progress: _Progress
) -> List[Dict[str, Any]]:
    conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)
    seen = []
    try:
        for _ in range(count):
            try:
                body = _query(conn, pause)
            except (OSError, http.client.HTTPException) as error:
                body = _client_error(error)
            body["keepalive"] = True
            seen.append(body)
            progress.step()
        return seen
    finally:
        conn.close()


def _boom(port: int) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", "/boom")
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def drive_load(
    server: Server,
    mode: str,
    *,
    requests: int = REQUESTS,
    concurrency: int = CONCURRENCY,
    keepalive_connections: int = KEEPALIVE_CONNECTIONS,
    keepalive_requests: int = KEEPALIVE_REQUESTS,
    boom_requests: int = BOOM_REQUESTS,
    pause: float = HANDLER_SLEEP,
    label: Optional[str] = None,
) -> LoadResult:
    """Drive bounded concurrent and keep-alive load at ``server``; count what came back."""
    total = requests + keepalive_connections * keepalive_requests
    progress = _Progress(label or mode, total)
    result = LoadResult(mode=mode)
    connections: List[List[Dict[str, Any]]] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(_keepalive_connection, server.port, keepalive_requests, pause, progress)
            for _ in range(keepalive_connections)
        ]
        singles = [pool.submit(_one_request, server.port, pause) for _ in range(requests)]
        for future in singles:
            result.responses += future.result()
            progress.step()
        for future in futures:
            connection = future.result()
            connections.append(connection)
            result.responses += connection
    elapsed = time.perf_counter() - started
    progress.finish()
    with ThreadPoolExecutor(max_workers=min(concurrency, max(boom_requests, 1))) as pool:
        result.boom_status = list(pool.map(lambda _: _boom(server.port), range(boom_requests)))
    result.boom_requests = boom_requests

    result.requests = len(result.responses)
    result.per_second = result.requests / elapsed if elapsed > 0 else 0.0
    tokens = [r.get("token") for r in result.responses if r.get("token")]
    result.distinct_sessions = len(set(tokens))
    result.crosstalk = sum(1 for r in result.responses if r.get("others", 0) > 0)
    for r in result.responses:
        if r["status"] != 200:
            result.failed += 1
            result.errors.append(str(r.get("error"))[:200])
    result.keepalive_connections = len(connections)
    for connection in connections:
        client_ports = {r["client_port"] for r in connection}
        server_ports = {r.get("remote_port") for r in connection}
        if len(client_ports) == 1 and len(server_ports) == 1 and None not in client_ports:
            result.keepalive_reused += 1
        if len({r.get("greenlet") for r in connection}) == 1:
            result.keepalive_one_greenlet += 1
    result.checkedout_after = int(server.stats()["checkedout"])
    return result


# -- the report ----------------------------------------------------------------------------

ROWS = [
    ("requests", lambda r: r.requests),
    ("  failed (HTTP 5xx or no answer)", lambda r: r.failed),
    ("distinct sessions", lambda r: r.distinct_sessions),
    ("requests that saw another request's session", lambda r: r.crosstalk),
    (
        "keep-alive connections kept open",
        lambda r: f"{r.keepalive_reused}/{r.keepalive_connections}",
    ),
    (
        "  all requests in one greenlet",
        lambda r: f"{r.keepalive_one_greenlet}/{r.keepalive_connections}",
    ),
    ("connections left checked out", lambda r: r.checkedout_after),
    ("requests/s", lambda r: f"{r.per_second:.0f}"),
]


def table(stock: LoadResult, green: LoadResult, correct: Optional[LoadResult] = None) -> str:
    """The side-by-side table: stock as written (no ``remove()``), greenscope, and, when given,
    stock done right (a patched thread-local and ``remove()`` at the end of every request)."""
    width = max(len(name) for name, _ in ROWS) + 2
    header = f"{'':<{width}}{'stock scoped_session':>22}{'greenscope':>14}"
    if correct is not None:
        header += f"{'stock + remove()':>20}"
    lines = [header]
    for name, get in ROWS:
        line = f"{name:<{width}}{get(stock)!s:>22}{get(green)!s:>14}"
        if correct is not None:
            line += f"{get(correct)!s:>20}"
        lines.append(line)
    return "\n".join(lines)


def problems(green: LoadResult) -> List[str]:
    """What makes the demo fail: any cross-talk, failure or leak under greenscope."""
    found = []
    if green.crosstalk:
        found.append(f"{green.crosstalk} requests saw another request's session")
    if green.distinct_sessions != green.requests:
        found.append(f"{green.requests} requests but {green.distinct_sessions} sessions")
    if green.failed:
        found.append(f"{green.failed} requests failed: {green.errors[:3]}")
    if green.checkedout_after:
        found.append(f"{green.checkedout_after} connections left checked out")
    if any(status != 500 for status in green.boom_status):
        found.append(f"the raising handler answered {sorted(set(green.boom_status))}")
    return found


def _run_failures(show: bool) -> Optional[Dict[str, Any]]:
    script = EXAMPLES / "failures.py"
    if not script.exists():
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(ROOT),
    )
    lines = proc.stdout.strip().splitlines()
    if show:
        print("\n".join(lines[:-1]) if lines else proc.stderr)
    try:
        return json.loads(lines[-1]) if lines else None  # type: ignore[no-any-return]
    except ValueError:
        return {"ok": False, "output": proc.stdout[-500:], "stderr": proc.stderr[-500:]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--skip-failures", action="store_true", help="skip part 1")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)

    database_url = os.environ.get("DATABASE_URL")
    directory = None
    if not database_url:  # embedded SQLite: one file per server run, removed at the end
        directory = tempfile.mkdtemp(prefix="greenscope-demo-")
    started = time.monotonic()
    try:
        failures = None
        if not args.skip_failures:
            print("Part 1: stock failures reproduced in one process (examples/failures.py)\n")
            failures = _run_failures(show=True)
            print()
        where = database_url.split("://")[0] if database_url else "embedded SQLite"
        print(
            "Part 2: examples/app.py under gunicorn -k gevent --preload "
            f"-c python:greenscope.gunicorn\n  1 worker, pool of 5, on {where}"
        )
        print(
            f"  load per server: {args.requests} requests from {args.concurrency} threads, "
            f"{KEEPALIVE_CONNECTIONS} keep-alive connections x {KEEPALIVE_REQUESTS} requests,\n"
            f"  then {BOOM_REQUESTS} requests to a handler that raises\n"
        )
        results = {}
        for mode in ("stock", "greenscope", "stock_remove"):
            url = database_url
            if directory is not None:
                url = "sqlite:///" + os.path.join(directory, f"{mode}.db")
            with gunicorn_server(mode, database_url=url) as server:
                results[mode] = drive_load(
                    server, mode, requests=args.requests, concurrency=args.concurrency
                )
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    stock, green = results["stock"], results["greenscope"]
    print()
    print(table(stock, green, results["stock_remove"]))
    print(
        "(stock as written never waits for the pool of 5: its requests all share one session and "
        "one connection;\n stock + remove() is stock done right: a thread-local made after "
        "gevent patched and remove() at the end of every request)"
    )
    found = problems(green)
    print()
    if found:
        print("FAIL: greenscope " + "; ".join(found))
    else:
        print(
            "greenscope: every request got its own session, closed at the end of the request; "
            "nothing left checked out"
        )
    if failures is not None and not failures.get("ok", False):
        found.append("examples/failures.py reported a case greenscope does not fix")
        print("FAIL: examples/failures.py reported a case greenscope does not fix")
    print(f"(demo ran in {time.monotonic() - started:.1f} s)")
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not found,
                    "problems": found,
                    "stock": stock.summary(),
                    "greenscope": green.summary(),
                    "stock_remove": results["stock_remove"].summary(),
                    "failures": failures,
                }
            )
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
