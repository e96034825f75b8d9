"""A bounded HTTP/1.1 keep-alive load generator (gevent), run as its own process.

    .venv/bin/python bench/loadgen.py PORT --connections 20 --seconds 3 --max-requests 200000

Only ever targets 127.0.0.1. Each connection sends ``GET /?id=N`` back to back on one
keep-alive socket and reads the response by its ``Content-Length``. Prints one JSON object:
``requests``, ``errors``, ``seconds``, ``rps``, ``p50_ms``, ``p99_ms``, ``max_ms``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import List  # noqa: E402

import gevent  # noqa: E402


def client(
    port: int, deadline: float, budget: List[int], latencies: List[float], errors: List[int]
) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    n = 0
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            n += 1
            start = time.perf_counter()
            sock.sendall(f"GET /?id={n} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status = reader.readline()
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reader.read(length)
            if not status.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
                if not status:
                    return
            latencies.append(time.perf_counter() - start)
    finally:
        reader.close()
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args()
    latencies: List[float] = []
    errors = [0]
    budget = [args.max_requests]
    start = time.perf_counter()
    deadline = start + args.seconds
    jobs = [
        gevent.spawn(client, args.port, deadline, budget, latencies, errors)
        for _ in range(args.connections)
    ]
    gevent.joinall(jobs, timeout=args.seconds + 60)
    elapsed = time.perf_counter() - start
    for job in jobs:
        if job.exception is not None:
            errors[0] += 1
    gevent.killall(jobs)
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0
        )

    print(
        json.dumps(
            {
                "requests": len(latencies),
                "errors": errors[0],
                "seconds": elapsed,
                "rps": len(latencies) / elapsed,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "max_ms": latencies[-1] * 1000 if latencies else 0.0,
            }
        )
    )


if __name__ == "__main__":
    main()
