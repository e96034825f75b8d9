"""End to end: gunicorn ``-k gevent`` + PostgreSQL, stock-correct versus greenscope, in two
scenarios: ``normal`` (a pooled connection per keep-alive client) and ``pressure`` (a pool of 2
for 8 keep-alive clients: requests queue for a connection, which is where a scope that returns
its connection late, or a greenlet that takes it straight back, starves the others).

    .venv/bin/python bench/e2e.py [--quick] [--smoke]

For each scenario, starts one gunicorn (1 gevent worker) per configuration of
``bench/e2e_app.py`` (``stock``, ``greenscope``, ``greenscope_remove``) on free loopback ports, all
at once, then alternates bounded load bursts from a separate process (``bench/loadgen.py``)
between them, round after round, so drift hits all alike. Prints one JSON object with, per
scenario, per-round requests/s, p99 and max latency and worker CPU per request, medians and the
ratios to the stock configuration (keys ``normal.rps``, ``pressure.max_ms``, ...), and the errors
(pool timeouts answer 500). Every process started here is killed in a ``finally``; the table is
dropped.

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
    ROUNDS, SECONDS = 1, 0.5
elif QUICK:
    ROUNDS, SECONDS = 4, 2.0
else:
    ROUNDS, SECONDS = 10, 3.0
MODES = ["stock", "greenscope", "greenscope_remove"]
#: what a user adds to run greenscope under gunicorn; nothing else differs between the servers
MODE_ARGS = {
    "stock": [],
    "greenscope": ["-c", "python:greenscope.gunicorn"],
    "greenscope_remove": ["-c", "python:greenscope.gunicorn"],
}
#: scenario -> (pool size, keep-alive client connections, pool timeout in s). ``normal``: one
#: pooled connection per client, so the figure is the cost of scoping, not of queueing;
#: ``pressure``: 4 clients per connection, a timeout a starving request can hit (a 500).
SCENARIOS = {"normal": (16, 16, 30.0), "pressure": (2, 8, 2.0)}
if SMOKE:
    SCENARIOS = {"normal": (4, 4, 30.0), "pressure": (2, 4, 2.0)}
#: the settings ``greenscope.gunicorn`` sets, pinned on both command lines
SERVER_ARGS = ["-k", "gevent", "-w", "1", "--worker-connections", "1000", "--keep-alive", "5"]


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


def load(port: int, seconds: float, connections: int) -> Dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            str(port),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_scenario(table: str, pool: int, connections: int, timeout: float) -> Dict[str, Any]:
    """Start the three servers, run the interleaved rounds, stop them; the scenario's figures."""
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
                POOL_SIZE=str(pool),
                POOL_TIMEOUT=str(timeout),
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
            load(ports[mode], min(SECONDS, 1.0), connections)
        figures = ("rps", "p99_ms", "max_ms", "p50_ms", "worker_cpu_us")
        samples: Dict[str, Dict[str, List[float]]] = {f: {m: [] for m in MODES} for f in figures}
        errors = {m: 0 for m in MODES}
        for rnd in range(ROUNDS):
            order = MODES[rnd % len(MODES) :] + MODES[: rnd % len(MODES)]  # rotate who goes first
            for mode in order:
                cpu_before = worker_cpu(procs[mode].pid)
                res = load(ports[mode], SECONDS, connections)
                cpu = worker_cpu(procs[mode].pid) - cpu_before
                samples["worker_cpu_us"][mode].append(cpu / max(res["requests"], 1) * 1e6)
                for figure in ("rps", "p99_ms", "max_ms", "p50_ms"):
                    samples[figure][mode].append(res[figure])
                errors[mode] += res["errors"]
        units = {
            "rps": (True, "requests/s"),
            "p99_ms": (False, "ms"),
            "max_ms": (False, "ms (the slowest request of the round)"),
            "p50_ms": (False, "ms"),
            "worker_cpu_us": (False, "CPU us per request in the gunicorn worker"),
        }
        out: Dict[str, Any] = {
            "config": {
                "workers": 1,
                "pool_size": pool,
                "connections": connections,
                "pool_timeout_s": timeout,
                "seconds_per_burst": SECONDS,
                "rounds": ROUNDS,
            },
            "errors": errors,
        }
        for figure, (higher, unit) in units.items():
            out[figure] = {
                "higher_is_better": higher,
                "unit": unit,
                "candidates": summarize(samples[figure], "stock"),
            }
        ok = True
        return out
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


def main() -> None:
    import sqlalchemy

    table = f"gs_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(SA_URL, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {table} (id serial primary key, owner text, n int)")
        conn.exec_driver_sql(
            f"insert into {table} (owner, n) select 'bench', g from generate_series(1, 100) g"
        )
    try:
        result: Dict[str, Any] = {"baseline": "stock", "scenarios": list(SCENARIOS)}
        for name, (pool, connections, timeout) in SCENARIOS.items():
            scenario = run_scenario(table, pool, connections, timeout)
            result[f"{name}.config"] = scenario.pop("config")
            result[f"{name}.errors"] = scenario.pop("errors")
            for figure, data in scenario.items():
                result[f"{name}.{figure}"] = data
        print(json.dumps(result))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"drop table if exists {table}")
        engine.dispose()


if __name__ == "__main__":
    main()
