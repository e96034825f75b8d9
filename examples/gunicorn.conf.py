"""A user's own gunicorn configuration built on greenscope's.

    gunicorn -c examples/gunicorn.conf.py --pythonpath examples app:app

``from greenscope.gunicorn import *`` takes the settings (``worker_class = "gevent"``,
``worker_connections``, ``keepalive``) and the hooks (``pre_fork``, ``post_fork``,
``post_worker_init``, ``worker_exit``). Anything assigned below overrides them; a hook of your
own must call greenscope's, as ``post_worker_init`` does here.
"""

from __future__ import annotations

import os
from typing import Any

import greenscope.gunicorn
from greenscope.gunicorn import *  # noqa: F403

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
preload_app = True  # the engine is created once, in the master; greenscope rebuilds its pool
worker_connections = 200  # greenlets per worker; most wait for one of the pool's connections


def post_worker_init(worker: Any) -> None:
    greenscope.gunicorn.post_worker_init(worker)  # first: pools rebuilt, psycopg2 cooperative
    worker.log.info("worker %s ready (your own start-up code goes here)", worker.pid)
