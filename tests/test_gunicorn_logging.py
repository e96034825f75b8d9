"""greenscope's warnings from gunicorn hooks are gunicorn's own error-log lines.

A library logs to its logger and leaves handlers to the application (``NullHandler`` on
``greenscope``); inside gunicorn, the hooks of :mod:`greenscope.gunicorn` write to gunicorn's
error log (``worker.log`` / ``server.log``), so a warning carries gunicorn's timestamp, pid and
level, and goes wherever ``--error-logfile`` sends it.
"""

from __future__ import annotations

import logging
import re
import textwrap
import time
from pathlib import Path

from conftest import gunicorn_app

# gunicorn's default error-log format: "[2026-12-02 07:30:00 +0000] [1234] [WARNING] message"
GUNICORN_LINE = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[%s\] %s"

APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"{}"]
"""

# A conf that takes greenscope's post_worker_init but forgets to chain pre_fork/post_fork:
# post_worker_init warns that it has to dispose every engine.
CONF = """
from greenscope.gunicorn import post_worker_init, worker_class  # noqa: F401
"""


def test_hook_warning_is_written_in_gunicorns_error_log_format(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text(textwrap.dedent(APP))
    (tmp_path / "partial_conf.py").write_text(textwrap.dedent(CONF))
    args = ["-w", "1", "--preload", "-c", str(tmp_path / "partial_conf.py")]
    with gunicorn_app(tmp_path, "plainapp:app", args=args) as server:
        server.get("/")
        log = server.log()

    warning = GUNICORN_LINE % (
        "WARNING",
        re.escape("greenscope: pre_fork/post_fork hooks were not chained; disposing every engine"),
    )
    assert re.search(warning, log, re.MULTILINE), log
    ready = GUNICORN_LINE % ("INFO", r"greenscope: worker \d+ ready: gevent patched=True")
    assert re.search(ready, log, re.MULTILINE), log


LEAKY_APP = """
import gevent
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

import greenscope

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))


def forgetful():
    Session.execute(text("select 1"))  # and no remove(): greenscope closes it, and says so


def app(environ, start_response):
    if environ["PATH_INFO"] == "/leak":
        gevent.spawn(forgetful).join()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"{}"]
"""


def test_library_warnings_in_a_worker_are_written_in_gunicorns_error_log_format(
    tmp_path: Path,
) -> None:
    (tmp_path / "leakyapp.py").write_text(textwrap.dedent(LEAKY_APP))
    args = ["-k", "gevent", "-w", "1", "-c", "python:greenscope.gunicorn"]
    env = {"GREENSCOPE_TRACE": "1"}  # a session closed for want of remove() is then a WARNING
    with gunicorn_app(tmp_path, "leakyapp:app", args=args, env=env) as server:
        server.get("/leak")
        for _ in range(50):  # the close runs in a greenlet of its own: wait for its line
            if "whose scope ended without remove()" in server.log():
                break
            time.sleep(0.1)
        log = server.log()

    closing = GUNICORN_LINE % ("WARNING", r"greenscope: closing .*whose scope ended without remove")
    assert re.search(closing, log, re.MULTILINE), log


def test_greenscope_logger_has_a_null_handler_as_libraries_should() -> None:
    import greenscope  # noqa: F401

    handlers = logging.getLogger("greenscope").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers
