"""A job-loop worker: one long-lived greenlet, every job in its own ``greenscope.scope()``.

A worker greenlet lives for hours, so greenlet scope is the wrong scope for its jobs: with a
stock ``scoped_session`` and no ``remove()``, every job inherits the previous job's Session (its
identity map, and whatever it left pending). Here each job runs under ``@greenscope.scope()``:
a fresh session per job, closed and removed when the job returns or raises.

Run it::

    python examples/job_worker.py                 # embedded SQLite in a temp directory
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python examples/job_worker.py
    python examples/job_worker.py --jobs 500 --stock   # the stock scoped_session, for contrast

Every tenth job fails half-way through (an update, then an exception). It prints one JSON line:
jobs, failed jobs, jobs done, failed jobs' updates that got committed anyway (by a later job that
shared the session), distinct sessions, jobs that got a session an earlier job had used, sessions
still open and connections still checked out at the end. It exits 1 if the greenscope run shows
any sharing or leak.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after patching, as in any gevent program
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import gevent  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.orm import Session, scoped_session, sessionmaker  # noqa: E402

import greenscope  # noqa: E402


def make_engine() -> Engine:
    """SQLite in a temp directory by default; ``DATABASE_URL`` switches to PostgreSQL."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        path = os.path.join(tempfile.mkdtemp(prefix="greenscope-jobs-"), "jobs.db")
        return create_engine(f"sqlite:///{path}", pool_size=5, max_overflow=0, pool_timeout=10)
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    greenscope.patch_drivers()  # psycopg2 / psycopg 3 wait cooperatively during queries
    return create_engine(url, pool_size=5, max_overflow=0, pool_timeout=10)


def run(jobs: int, stock: bool) -> Dict[str, Any]:
    engine = make_engine()
    table = f"greenscope_jobs_{uuid.uuid4().hex[:10]}"  # unique: other runs share the database
    with engine.begin() as conn:
        conn.exec_driver_sql(f"create table {table} (id integer primary key, done_by integer)")
        conn.execute(
            text(f"insert into {table} (id) values (:id)"), [{"id": n} for n in range(jobs)]
        )
    factory = sessionmaker(engine)
    Session_: Any = scoped_session(factory) if stock else greenscope.scoped_session(factory)
    sessions: List[Session] = []  # kept alive so that distinct objects have distinct ids
    inherited = 0

    def job(n: int) -> None:
        nonlocal inherited
        session = Session_()
        if "job" in session.info:  # a session some earlier job already used
            inherited += 1
        session.info["job"] = n
        sessions.append(session)
        if n % 10 == 9:  # every tenth job fails half-way, its update never committed
            session.execute(text(f"update {table} set done_by = -1 where id = :n"), {"n": n})
            raise RuntimeError(f"job {n} failed")
        session.execute(text(f"update {table} set done_by = :n where id = :n"), {"n": n})
        session.commit()

    scoped_job = job if stock else greenscope.scope()(job)

    failed = 0

    def worker() -> None:
        nonlocal failed
        for n in range(jobs):
            try:
                scoped_job(n)
            except RuntimeError:
                failed += 1  # a real worker would log it and move on to the next job

    try:
        gevent.spawn(worker).get()  # the long-lived worker greenlet
        with engine.connect() as conn:
            done = conn.execute(text(f"select count(*) from {table} where done_by = id")).scalar()
            leaked = conn.execute(text(f"select count(*) from {table} where done_by = -1")).scalar()
        return {
            "database": engine.dialect.name,
            "registry": "stock" if stock else "greenscope",
            "jobs": jobs,
            "failed_jobs": failed,
            "done": done,
            # a failed job's update, committed later by the next job that shared its session
            "failed_updates_committed": leaked,
            "distinct_sessions": len({id(s) for s in sessions}),
            "jobs_that_inherited_a_session": inherited,
            "sessions_open_at_end": len({id(s) for s in sessions if s.in_transaction()}),
            # greenscope only: the stock thread-local registry cannot count its entries
            "registered_at_end": None if stock else len(Session_.registry),
            "checked_out_at_end": engine.pool.checkedout(),  # type: ignore[attr-defined]
        }
    finally:
        for session in sessions:  # the stock run leaves sessions open: close them to clean up
            session.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"drop table if exists {table}")
        engine.dispose()


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--stock", action="store_true", help="use the stock scoped_session")
    args = parser.parse_args(argv)
    summary = run(args.jobs, args.stock)
    print(json.dumps(summary))
    healthy = (
        summary["distinct_sessions"] == summary["jobs"] == args.jobs
        and summary["done"] + summary["failed_jobs"] == args.jobs
        and summary["failed_updates_committed"] == 0
        and summary["jobs_that_inherited_a_session"] == 0
        and summary["sessions_open_at_end"] == 0
        and summary["checked_out_at_end"] == 0
    )
    return 0 if healthy or args.stock else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
