"""``python -m greenscope doctor`` on fixture apps, and the runtime report.

Every fixture in ``tests/fixtures_doctor/`` holds one configuration; the doctor runs on it in a
subprocess (it monkeypatches) and the tests assert the verdict line, the finding and the exit
code. The same fixture is often checked in two import orders, so a check that always said UNSAFE
(or always OK) would fail one of them.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from typing import List, Tuple

import greenlet
import pytest
from conftest import PG_URL, ROOT, collect, run_python
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as stock_scoped_session

import greenscope
from greenscope import diagnostics
from greenscope.diagnostics import Finding, Report, classify_scopefunc
from greenscope.diagnostics.checks._common import name_of
from greenscope.diagnostics.findings import Context

FIXTURES = ROOT / "tests" / "fixtures_doctor"


def doctor(*args: str) -> Tuple[int, str, str]:
    """Run ``python -m greenscope doctor ARGS`` from the fixtures directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["GREENSCOPE_PG_URL"] = PG_URL
    env.pop("GREENSCOPE_TRACE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "greenscope", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(FIXTURES),
    )
    return proc.returncode, proc.stdout, proc.stderr


def lines(output: str, level: str) -> List[str]:
    return [line for line in output.splitlines() if line.startswith(level + " ")]


# -- each unsafe configuration, and the correct one -----------------------------------------


def test_doctor_flags_stock_scoped_session_built_before_the_app_patches_gevent() -> None:
    code, out, err = doctor("doctor_stock_before_patch:app")
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert unsafe.startswith("UNSAFE   scoped_session doctor_stock_before_patch.Session:")
    assert "threading.local was created before gevent patched threading" in unsafe
    assert "OK       gevent: threading.local is patched" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: UNSAFE (1 unsafe")


@pytest.mark.parametrize(
    ("flags", "code", "level", "says"),
    [
        ((), 0, "OK", "stock thread-local: one Session per OS thread"),
        (("--patch",), 0, "WARNING", "nothing closes a Session whose greenlet ended"),
        (("--preload",), 1, "UNSAFE", "threading.local was created before gevent patched"),
    ],
    ids=["threads", "gevent-worker", "gevent-worker-preload"],
)
def test_doctor_judges_a_stock_thread_local_session_by_when_gevent_patches(
    flags: Tuple[str, ...], code: int, level: str, says: str
) -> None:
    rc, out, err = doctor(*flags, "doctor_stock_threadlocal:app")
    assert rc == code, out + err
    found = [line for line in lines(out, level) if "doctor_stock_threadlocal.Session" in line]
    assert len(found) == 1 and says in found[0], out
    assert out.rstrip().splitlines()[-1].startswith(f"verdict: {level} ")


def test_doctor_flags_id_based_scopefunc_in_every_import_order() -> None:
    for flags in ((), ("--patch",)):
        code, out, err = doctor(*flags, "doctor_id_scopefunc:app")
        assert code == 1, out + err
        (unsafe,) = lines(out, "UNSAFE")
        assert "doctor_id_scopefunc.Session" in unsafe and "is id()-based" in unsafe


def test_doctor_flags_getcurrent_keyed_stock_registry() -> None:
    code, out, err = doctor("--patch", "doctor_getcurrent_scopefunc:app")
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert "doctor_getcurrent_scopefunc.Session" in unsafe
    assert "keys a plain dict on the greenlet" in unsafe


def test_doctor_flags_flask_sqlalchemy_db_session_keyed_on_app_context_id() -> None:
    code, out, err = doctor("doctor_flask_sqlalchemy")  # default variable: app
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert unsafe.startswith("UNSAFE   scoped_session doctor_flask_sqlalchemy.db.session:")
    assert "_app_ctx_id" in unsafe and "is id()-based" in unsafe


def test_doctor_passes_flask_sqlalchemy_through_greenscope_flask() -> None:
    code, out, err = doctor("--patch", "doctor_greenscope_flask:app")
    assert code == 0, out + err
    assert lines(out, "UNSAFE") == [] and lines(out, "WARNING") == []
    assert (
        "OK       scoped_session doctor_greenscope_flask.db.session: greenscope registry "
        "(scope: greenscope.flask.app_context_scope)"
    ) in out


def test_doctor_flags_engine_whose_pool_lock_predates_patching() -> None:
    code, out, err = doctor("doctor_engine_before_patch:app")
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert unsafe.startswith("UNSAFE   engine sqlite:")
    assert "QueuePool's lock was created before gevent patched threading" in unsafe
    # patched before the import (the gevent worker without --preload): the same app is fine
    code, out, err = doctor("--patch", "doctor_engine_before_patch:app")
    assert code == 0, out + err
    assert lines(out, "UNSAFE") == []
    assert any(line.startswith("OK       engine sqlite:") for line in lines(out, "OK"))


def test_doctor_flags_psycopg2_without_wait_callback_under_gevent() -> None:
    code, out, err = doctor("--patch", "doctor_psycopg2_unpatched:app")
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert unsafe.startswith("UNSAFE   psycopg2: no wait callback under gevent")
    # without gevent a blocking driver is what threads expect: nothing to report
    code, out, err = doctor("doctor_psycopg2_unpatched:app")
    assert code == 0, out + err
    assert not [line for line in out.splitlines() if "psycopg2:" in line]


def test_doctor_passes_greenscope_with_psycogreen_under_the_gevent_worker() -> None:
    code, out, err = doctor("--patch", "doctor_correct:app")
    assert code == 0, out + err
    assert lines(out, "UNSAFE") == [] and lines(out, "WARNING") == []
    assert "OK       scoped_session doctor_correct.Session: greenscope registry" in out
    assert "OK       psycopg2: wait callback psycogreen.gevent.gevent_wait_callback" in out
    assert out.rstrip().splitlines()[-1] == "verdict: OK (0 unsafe, 0 warning(s), 4 ok)"


def test_doctor_preload_needs_the_pools_rebuilt_in_the_worker() -> None:
    code, out, err = doctor("--preload", "doctor_correct:app")
    assert code == 1, out + err
    (unsafe,) = lines(out, "UNSAFE")
    assert unsafe.startswith("UNSAFE   engine postgresql+psycopg2://")
    code, out, err = doctor("--preload", "--greenscope-gunicorn", "doctor_correct:app")
    assert code == 0, out + err
    assert lines(out, "UNSAFE") == []


# -- usage and import errors ---------------------------------------------------------------


def test_doctor_exits_2_when_the_app_cannot_be_imported() -> None:
    code, _out, err = doctor("no_such_module_here:app")
    assert code == 2
    assert "cannot import 'no_such_module_here:app'" in err and "ModuleNotFoundError" in err
    code, _out, err = doctor("doctor_correct:missing")
    assert code == 2 and "has no attribute 'missing'" in err


def test_doctor_exits_2_on_usage_errors() -> None:
    code, _out, err = doctor("--patch", "--preload", "doctor_correct:app")
    assert code == 2 and "not allowed with argument" in err
    proc = subprocess.run(
        [sys.executable, "-m", "greenscope", "frobnicate"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


# -- the pieces, in process ---------------------------------------------------------------


def _ident_scope() -> object:
    import threading

    return threading.get_ident()


def test_classify_scopefunc_recognises_ids_greenlets_tasks_and_current_scope() -> None:
    import asyncio

    assert classify_scopefunc(lambda: id(greenlet.getcurrent())) == "id"
    assert classify_scopefunc(_ident_scope) == "id"
    assert classify_scopefunc(functools.partial(id, 1)) == "id"
    assert classify_scopefunc(greenlet.getcurrent) == "greenlet"
    assert classify_scopefunc(lambda: greenlet.getcurrent()) == "greenlet"
    assert classify_scopefunc(asyncio.current_task) == "task"
    assert classify_scopefunc(greenscope.current_scope) == "current_scope"
    # an attribute named ``id`` is not the builtin id()
    assert classify_scopefunc(lambda: greenlet.getcurrent().id) == "greenlet"
    assert classify_scopefunc(lambda: greenlet.getcurrent().id()) == "greenlet"
    assert classify_scopefunc(lambda: "one") == "other"


def test_report_verdict_and_exit_code_follow_the_worst_finding() -> None:
    report = Report("as-is", [Finding("OK", "a", "fine")])
    assert (report.verdict, report.exit_code) == ("OK", 0)
    report.findings.append(Finding("WARNING", "b", "look"))
    assert (report.verdict, report.exit_code) == ("WARNING", 0)
    report.findings.append(Finding("UNSAFE", "c", "broken", "fix it"))
    assert (report.verdict, report.exit_code) == ("UNSAFE", 1)
    assert "UNSAFE   c: broken\n         fix: fix it" in report.format()


def test_check_in_process_classifies_every_live_scoped_session() -> None:
    # Without gevent patched, a stock id()-keyed session is unsafe and greenscope's is fine.
    stock = stock_scoped_session(sessionmaker(), scopefunc=lambda: id(greenlet.getcurrent()))
    ours = greenscope.scoped_session(sessionmaker())
    findings = {f.subject: f for f in diagnostics.check_scoped_sessions(Context())}
    stock_finding = findings[f"scoped_session {name_of(stock)}"]
    assert stock_finding.level == "UNSAFE" and "id()-based" in stock_finding.message
    ours_finding = findings[f"scoped_session {name_of(ours)}"]
    assert ours_finding.level == "OK" and "greenscope registry" in ours_finding.message


def test_check_in_process_flags_stock_task_keyed_async_session_but_not_greenscope_one() -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker

    from greenscope.asyncio import async_scoped_session as greenscope_async_scoped_session

    stock = async_scoped_session(async_sessionmaker(), scopefunc=asyncio.current_task)
    ours = greenscope_async_scoped_session(async_sessionmaker())
    findings = {f.subject: f for f in diagnostics.check_scoped_sessions(Context())}
    stock_finding = findings[f"async_scoped_session {name_of(stock)}"]
    assert (
        stock_finding.level == "UNSAFE" and "keys a plain dict on the Task" in stock_finding.message
    )
    ours_finding = findings[f"async_scoped_session {name_of(ours)}"]
    assert ours_finding.level == "OK"


def test_runtime_report_counts_live_scopes_and_sessions_ended_without_remove() -> None:
    Registry = greenscope.WeakScopeRegistry(Session)
    for _ in range(3):  # raw greenlets that never call remove(): collected when they end
        greenlet.greenlet(Registry).switch()
    collect()
    Registry()  # one live scope: this greenlet

    def mine() -> dict:  # type: ignore[type-arg]
        report = diagnostics.runtime_report()
        (entry,) = [r for r in report["registries"] if r["registry"] == repr(Registry)]
        assert report["live_scopes"] >= entry["live_scopes"]
        return entry  # type: ignore[return-value]

    entry = mine()
    assert (entry["live_scopes"], entry["ended_without_remove"]) == (1, 3)
    assert entry["origins"] == []  # GREENSCOPE_TRACE is off in this process
    Registry.clear()
    assert mine()["live_scopes"] == 0


def test_log_runtime_report_warns_about_registries_that_lost_sessions() -> None:
    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("greenscope.test_diagnostics")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    Registry = greenscope.WeakScopeRegistry(Session)
    greenlet.greenlet(Registry).switch()
    collect()
    report = diagnostics.log_runtime_report(logger)
    assert report["ended_without_remove"] >= 1
    assert records[0].levelno == logging.INFO
    assert "closed because their scope ended without remove()" in records[0].getMessage()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(repr(Registry) in message for message in warnings)
    Registry.clear()


def test_runtime_report_with_trace_shows_where_live_sessions_were_created() -> None:
    result = run_python(
        """
        import json, logging
        from sqlalchemy.orm import Session
        import greenscope
        from greenscope import diagnostics

        Registry = greenscope.scoped_session(Session)

        def handler_that_forgets_remove():
            return Registry()

        handler_that_forgets_remove()
        messages = []
        class Keep(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())
        log = logging.getLogger("trace-test")
        log.addHandler(Keep())
        log.setLevel(logging.INFO)
        report = diagnostics.log_runtime_report(log)
        print(json.dumps({"report": report, "messages": messages}))
        """,
        env={"GREENSCOPE_TRACE": "1"},
    )
    report = result["report"]
    assert report["trace"] is True
    (entry,) = report["registries"]
    assert entry["live_scopes"] == 1
    (origin,) = entry["origins"]
    assert "handler_that_forgets_remove" in origin
    assert any("live entry created at:" in m and "handler_that" in m for m in result["messages"])
