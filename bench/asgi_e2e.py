"""End to end on asyncio: FastAPI under uvicorn + PostgreSQL (asyncpg), stock versus greenscope.

    .venv/bin/python bench/asgi_e2e.py [--quick] [--smoke] [--scenario normal|pressure]

For each scenario, starts one ``uvicorn`` (1 process, asyncio loop, h11) per configuration of
``bench/asgi_e2e_app.py`` on free loopback ports, all at once, then alternates bounded keep-alive
load bursts from a separate process (``bench/loadgen.py``) between them, round after round, in an
order rotated every round, so drift hits all alike:

- ``stock``: ``async_scoped_session(scopefunc=current_task)`` + ``await Session.remove()`` in a
  pure ASGI middleware (the correct stock configuration, and the baseline of every ratio);
- ``greenscope``: greenscope's ``async_scoped_session`` + ``greenscope.asgi.ScopeMiddleware``,
  no ``remove()``;
- ``greenscope_remove``: greenscope's session ended by the same ``remove()`` middleware.

Scenarios: ``normal`` (a pooled connection per client: the cost of scoping) and ``pressure``
(pool smaller than the clients, a short pool timeout: does any request starve?). Prints one JSON
object: per scenario, per-round requests/s, p50, p99 and max latency, CPU per request, errors and
pool timeouts per configuration, with medians, spread and per-round ratios to ``stock``. Every
process started here is killed in a ``finally``; the table is dropped. Figures from a shared
machine are noise: read the ratios of a full run on a quiet one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._harness import summarize  # noqa: E402

PG_URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SYNC_URL = "postgresql+psycopg2://" + PG_URL.split("://", 1)[1]
ASYNC_URL = "postgresql+asyncpg://" + PG_URL.split("://", 1)[1]
QUICK = "--quick" in sys.argv
SMOKE = "--smoke" in sys.argv
if SMOKE:
    ROUNDS, SECONDS = 1, 0.5
elif QUICK:
    ROUNDS, SECONDS = 3, 1.5
else:
    ROUNDS, SECONDS = 10, 3.0
MODES = ["stock", "greenscope", "greenscope_remove"]
#: clients, pool size, pool timeout (s)
SCENARIOS: Dict[str, Dict[str, float]] = {
    "normal": {"connections": 8, "pool_size": 8, "pool_timeout": 30.0},
    "pressure": {"connections": 8, "pool_size": 2, "pool_timeout": 2.0},
}
SERVER_ARGS = ["--loop", "asyncio", "--http", "h11", "--lifespan", "off", "--no-access-log"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(port: int, path: str) -> Dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited early: {proc.returncode}")
        try:
            get_json(port, "/?id=1")
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"uvicorn on port {port} not ready in {timeout} s")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by one process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def run_scenario(name: str, table: str) -> Dict[str, Any]:
    settings = SCENARIOS[name]
    connections = int(settings["connections"])
    procs: Dict[str, subprocess.Popen[bytes]] = {}
    ports: Dict[str, int] = {}
    logs = {}
    ok = False
    try:
        for mode in MODES:
            ports[mode] = free_port()
            env = dict(
                os.environ,
                BENCH_MODE=mode,
                BENCH_TABLE=table,
                DATABASE_URL=ASYNC_URL,
                POOL_SIZE=str(int(settings["pool_size"])),
                POOL_TIMEOUT=str(settings["pool_timeout"]),
                PYTHONPATH=str(ROOT),
            )
            log_path = f"/tmp/greenscope-bench-asgi-{name}-{mode}-{os.getpid()}.log"
            logs[mode] = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
            procs[mode] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    *SERVER_ARGS,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[mode]),
                    "--app-dir",
                    str(ROOT / "bench"),
                    "--log-level",
                    "warning",
                    "asgi_e2e_app:app",
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
        figures = ("rps", "p50_ms", "p99_ms", "max_ms", "cpu_us")
        samples: Dict[str, Dict[str, List[float]]] = {f: {m: [] for m in MODES} for f in figures}
        errors = {m: 0 for m in MODES}
        timeouts_before = {m: get_json(ports[m], "/stats")["pool_timeouts"] for m in MODES}
        for rnd in range(ROUNDS):
            shift = rnd % len(MODES)
            order = MODES[shift:] + MODES[:shift]
            if rnd % 2:
                order = order[::-1]
            for mode in order:
                cpu_before = process_cpu(procs[mode].pid)
                res = load(ports[mode], SECONDS, connections)
                cpu = process_cpu(procs[mode].pid) - cpu_before
                samples["cpu_us"][mode].append(cpu / max(res["requests"], 1) * 1e6)
                for figure in ("rps", "p50_ms", "p99_ms", "max_ms"):
                    samples[figure][mode].append(res[figure])
                errors[mode] += res["errors"]
        pool_timeouts = {
            m: get_json(ports[m], "/stats")["pool_timeouts"] - timeouts_before[m] for m in MODES
        }
        units = {
            "rps": ("requests/s", True),
            "p50_ms": ("ms", False),
            "p99_ms": ("ms", False),
            "max_ms": ("ms, the slowest request of each round", False),
            "cpu_us": ("CPU us per request in the uvicorn process", False),
        }
        result: Dict[str, Any] = {
            "baseline": "stock",
            "config": {
                "server": "uvicorn, 1 process, " + " ".join(SERVER_ARGS),
                "connections": connections,
                "pool_size": int(settings["pool_size"]),
                "pool_timeout_s": settings["pool_timeout"],
                "seconds_per_burst": SECONDS,
                "rounds": ROUNDS,
            },
            "errors": errors,
            "pool_timeouts": pool_timeouts,
        }
        for figure, (unit, higher) in units.items():
            result[figure] = {
                "higher_is_better": higher,
                "unit": unit,
                "candidates": summarize(samples[figure], "stock"),
            }
        ok = True
        return result
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

    chosen = list(SCENARIOS)
    if "--scenario" in sys.argv:
        chosen = [sys.argv[sys.argv.index("--scenario") + 1]]
    table = f"gs_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(SYNC_URL, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {table} (id serial primary key, owner text, n int)")
        conn.exec_driver_sql(
            f"insert into {table} (owner, n) select 'bench', g from generate_series(1, 100) g"
        )
    try:
        mode = "smoke" if SMOKE else "quick" if QUICK else "full"
        out: Dict[str, Any] = {"mode": mode, "baseline": "stock", "scenarios": chosen}
        for name in chosen:  # flat keys, as bench/e2e.py: "pressure.max_ms", ...
            for figure, data in run_scenario(name, table).items():
                if figure != "baseline":
                    out[f"{name}.{figure}"] = data
        print(json.dumps(out))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"drop table if exists {table}")
        engine.dispose()


if __name__ == "__main__":
    main()
