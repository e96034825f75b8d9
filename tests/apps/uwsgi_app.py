"""A greenscope WSGI app for uWSGI with ``--gevent``, loaded in the master (not ``--lazy-apps``).

gevent patches and psycopg2 is made cooperative at import, in the master; the engine connects
once there (an app creating its tables), so the workers inherit that connection in their pool.
Each request reports the backend it ran on and whether its session had been used before.
``GS_APPLICATION_NAME`` tags this run's connections in ``pg_stat_activity``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import uuid  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from psycogreen.gevent import patch_psycopg  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

import greenscope  # noqa: E402
import greenscope.fork  # noqa: E402
from greenscope.wsgi import ScopeMiddleware  # noqa: E402

patch_psycopg()
PG_URL = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
engine = sa.create_engine(
    "postgresql+psycopg2://" + PG_URL.split("://", 1)[1],
    pool_size=5,
    max_overflow=0,
    pool_timeout=10,
    connect_args={"application_name": os.environ.get("GS_APPLICATION_NAME", "gs-uwsgi")},
)
Session = greenscope.scoped_session(sessionmaker(engine))
PID = sa.text("select pg_backend_pid()")
with engine.connect() as conn:
    MASTER_BACKEND = conn.execute(PID).scalar()

if os.environ.get("GS_UWSGI_POSTFORK") == "1":  # for a uWSGI run without its fork hooks
    import uwsgidecorators

    uwsgidecorators.postfork(greenscope.fork.ensure_child_state)


def _app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    session = Session()
    inherited = session.info.get("used", False)
    session.info["used"] = True
    session.info.setdefault("marker", uuid.uuid4().hex)
    backend = session.execute(PID).scalar()
    session.execute(sa.text("select pg_sleep(0.01)"))  # a little I/O, cooperative
    body = json.dumps(
        {
            "backend": backend,
            "master_backend": MASTER_BACKEND,
            "worker_pid": os.getpid(),
            "marker": session.info["marker"],
            "inherited": inherited,
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


application = ScopeMiddleware(_app)
