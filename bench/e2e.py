"""End to end: gunicorn ``-k gevent`` + PostgreSQL, stock-correct versus greenscope.

    .venv/bin/python bench/e2e.py [--quick] [--smoke]

Starts one gunicorn (1 gevent worker, pool of 16) per configuration of ``bench/e2e_app.py`` on
free loopback ports, both at once, then alternates bounded load bursts from a separate process
(``bench/loadgen.py``) between them, round after round, so drift hits both alike. Prints one JSON
object: per-round requests/s and p99 latency, medians and the ratios to the stock configuration.
Every process started here is killed in a ``finally``; the table is dropped.

The two servers differ only in what a user changes to adopt greenscope: the app
(``BENCH_MODE``: ``ScopeMiddleware`` and ``greenscope.scoped_session`` instead of ``remove()``)
and ``-c python:greenscope.gunicorn``. Every setting that config module sets (worker class,
``worker_connections``, ``keepalive``) is also given on both command lines, with the config's
values; the command line wins over a config file in gunicorn, so both run the same settings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._harness import summarize  # noqa: E402

PG_URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SA_URL = "postgresql+psycopg2://" + PG_URL.split("://", 1)[1]
QUICK = "--quick" in sys.argv
SMOKE = "--smoke" in sys.argv
if SMOKE:
    ROUNDS, SECONDS, CONNECTIONS = 1, 0.5, 4
elif QUICK:
    ROUNDS, SECONDS, CONNECTIONS = 4, 2.0, 16
else:
    ROUNDS, SECONDS, CONNECTIONS = 10, 3.0, 16
MODES = ["stock", "greenscope"]
#: what a user adds to run greenscope under gunicorn; nothing else differs between the servers
MODE_ARGS = {"stock": [], "greenscope": ["-c", "python:greenscope.gunicorn"]}
#: the settings ``greenscope.gunicorn`` sets, pinned on both command lines
SERVER_ARGS = ["-k", "gevent", "-w", "1", "--worker-connections", "1000", "--keep-alive", "5"]
#: one pooled connection per client connection: no request waits for the pool, so the figure
#: is the cost of scoping, not of queueing (2 servers x 16 = 32 PostgreSQL connections)
POOL = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /?id=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn on port {port} not ready in {timeout} s")


def worker_cpu(master: int) -> float:
    """CPU seconds (user + system) used so far by the workers of one gunicorn master (Linux).

    The worker is the bottleneck of this benchmark, so its CPU time per request is the same
    comparison as requests/s, without the noise of whatever else shares the machine."""
    total = 0.0
    for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def load(port: int, seconds: float) -> Dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            str(port),
            "--connections",
            str(CONNECTIONS),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    import sqlalchemy

    table = f"gs_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(SA_URL, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {table} (id serial primary key, owner text, n int)")
        conn.exec_driver_sql(
            f"insert into {table} (owner, n) select 'bench', g from generate_series(1, 100) g"
        )
    ok = False
    procs: Dict[str, subprocess.Popen[bytes]] = {}
    ports: Dict[str, int] = {}
    logs = {}
    try:
        for mode in MODES:
            ports[mode] = free_port()
            env = dict(
                os.environ,
                BENCH_MODE=mode,
                BENCH_TABLE=table,
                DATABASE_URL=SA_URL,
                POOL_SIZE=str(POOL),
                PYTHONPATH=str(ROOT),
            )
            log_path = f"/tmp/greenscope-bench-e2e-{mode}-{os.getpid()}.log"
            logs[mode] = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
            procs[mode] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    *MODE_ARGS[mode],
                    *SERVER_ARGS,
                    "-b",
                    f"127.0.0.1:{ports[mode]}",
                    "--pythonpath",
                    str(ROOT / "bench"),
                    "--log-level",
                    "warning",
                    "e2e_app:app",
                ],
                env=env,
                cwd=str(ROOT),
                stdout=logs[mode],
                stderr=subprocess.STDOUT,
            )
        for mode in MODES:
            wait_ready(ports[mode], procs[mode])
        for mode in MODES:  # warm-up: pools filled, code paths specialised
            load(ports[mode], min(SECONDS, 1.0))
        rps: Dict[str, List[float]] = {m: [] for m in MODES}
        p99: Dict[str, List[float]] = {m: [] for m in MODES}
        p50: Dict[str, List[float]] = {m: [] for m in MODES}
        cpu_us: Dict[str, List[float]] = {m: [] for m in MODES}
        errors = {m: 0 for m in MODES}
        for rnd in range(ROUNDS):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                cpu_before = worker_cpu(procs[mode].pid)
                res = load(ports[mode], SECONDS)
                cpu = worker_cpu(procs[mode].pid) - cpu_before
                cpu_us[mode].append(cpu / max(res["requests"], 1) * 1e6)
                rps[mode].append(res["rps"])
                p99[mode].append(res["p99_ms"])
                p50[mode].append(res["p50_ms"])
                errors[mode] += res["errors"]
        result = {
            "baseline": "stock",
            "config": {
                "workers": 1,
                "pool_size": POOL,
                "connections": CONNECTIONS,
                "seconds_per_burst": SECONDS,
                "rounds": ROUNDS,
            },
            "rps": {
                "higher_is_better": True,
                "unit": "requests/s",
                "candidates": summarize(rps, "stock"),
            },
            "p99_ms": {
                "higher_is_better": False,
                "unit": "ms",
                "candidates": summarize(p99, "stock"),
            },
            "p50_ms": {
                "higher_is_better": False,
                "unit": "ms",
                "candidates": summarize(p50, "stock"),
            },
            "worker_cpu_us": {
                "higher_is_better": False,
                "unit": "CPU us per request in the gunicorn worker",
                "candidates": summarize(cpu_us, "stock"),
            },
            "errors": errors,
        }
        print(json.dumps(result))
        ok = True
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()
            if ok:  # the servers' logs are kept only when something went wrong
                os.unlink(log.name)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"drop table if exists {table}")
        engine.dispose()


if __name__ == "__main__":
    main()
