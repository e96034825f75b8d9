"""Database drivers under gevent or eventlet: does a query let other greenlets run?

Only drivers the application uses are reported: one that importing the app brought into
``sys.modules``, or that one of its engines uses. The doctor never imports a driver itself (it
once imported psycopg2 to check it, and then reported "OK psycopg2" for apps without it).

- **psycopg2** needs a wait callback (psycogreen) under gevent and eventlet, or every query
  blocks the whole worker.
- **psycopg 3** picks its wait function when ``psycopg.waiting`` is imported: ``wait_c`` (C,
  blocking) unless gevent had already patched ``select``. Imported before ``patch_all()`` -
  gunicorn ``--preload``, or an import order - every query blocks the worker (measured by
  tests/test_diagnostics.py: 5 greenlets x ``pg_sleep(0.3)`` took 1.58 s, and 0.33 s with psycopg
  imported after patching). Its connect path waits on
  ``psycopg.waiting.DefaultSelector``, also bound at import: a stdlib selector there blocks the
  worker for as long as the server takes to answer a new connection (measured: a connect to a
  listener that never answered froze every other greenlet for its 1 s ``connect_timeout``).
  The check reads that module state, so it judges ``greenscope.patch_drivers()`` (or anything
  else that fixed it) by its effect.
"""

from __future__ import annotations

import sys
import types
from typing import Any, List, Optional, Tuple

from ..findings import OK, UNSAFE, WARNING, Context, Finding
from ._common import green_runtime, objects_of, original

__all__ = ["check_psycopg", "check_psycopg2", "psycopg_wait_state"]


def _engine_drivers() -> List[str]:
    """Top-level module names of the DBAPIs live engines use."""
    if "sqlalchemy.engine" not in sys.modules:
        return []
    from sqlalchemy.engine import Engine

    names = []
    for engine in objects_of(Engine):
        dialect = engine.dialect
        dbapi = getattr(dialect, "loaded_dbapi", None) or getattr(dialect, "dbapi", None)
        name = getattr(dbapi, "__name__", "")
        if name:
            names.append(name.split(".")[0])
    return names


def _app_uses(ctx: Context, module: str) -> bool:
    return ctx.app_imported(module) or (module in sys.modules and module in _engine_drivers())


def check_psycopg2(ctx: Context) -> List[Finding]:
    """Under gevent or eventlet, psycopg2 needs a wait callback (psycogreen).

    Example (no green runtime patched, so a blocking driver is what threads expect)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_psycopg2(Context())
        []
    """
    green = green_runtime()
    if green is None or not _app_uses(ctx, "psycopg2"):
        return []
    extensions = sys.modules.get("psycopg2.extensions")
    if extensions is None:  # pragma: no cover - psycopg2 always imports it
        return []
    callback = extensions.get_wait_callback()
    if callback is None:
        if green == "gevent":
            fix = (
                "call greenscope.patch_drivers() (or psycogreen.gevent.patch_psycopg()) in each "
                "worker before the first query (gunicorn -c python:greenscope.gunicorn does)"
            )
        else:
            fix = "call psycogreen.eventlet.patch_psycopg() right after eventlet.monkey_patch()"
        return [
            Finding(
                UNSAFE,
                "psycopg2",
                f"no wait callback under {green}: every query blocks the whole worker, and one "
                "slow query stalls every request in it",
                fix,
            )
        ]
    name = getattr(callback, "__module__", "") + "." + getattr(callback, "__name__", "?")
    return [Finding(OK, "psycopg2", f"wait callback {name.lstrip('.')} makes it cooperative")]


def _monkey() -> Any:
    return sys.modules.get("gevent.monkey")


def _psycopg_wait_blocks(waiting: types.ModuleType, fn: Any) -> Optional[str]:
    """Why ``fn`` (a psycopg 3 query wait function) blocks the hub; None if it cooperates,
    ``"?"`` if the doctor cannot tell."""
    monkey = _monkey()
    if fn is getattr(waiting, "wait_c", None) or not isinstance(fn, types.FunctionType):
        return (
            f"{getattr(fn, '__name__', repr(fn))} (C): psycopg chose it at import because "
            "select was not patched yet"
        )
    if fn.__module__ != waiting.__name__:
        return None  # someone's cooperative replacement (greenscope.patch_drivers(), a user's)
    uses = {
        "wait_select": ("select", "select"),
        "wait_poll": ("select", "poll"),
        "wait_epoll": ("select", "epoll"),
    }
    if fn.__name__ in uses:
        module, name = uses[fn.__name__]
        if monkey is not None and monkey.is_object_patched(module, name):
            return None
        return f"{fn.__name__}, on the unpatched select.{name}"
    if fn.__name__ == "wait_selector":
        return _selector_blocks(waiting)
    return "?"


def _selector_blocks(waiting: types.ModuleType) -> Optional[str]:
    selector = getattr(waiting, "DefaultSelector", None)
    if selector is None:
        return None
    if selector is original("selectors", "DefaultSelector") or selector.__module__ == "selectors":
        return f"psycopg.waiting.DefaultSelector is {selector.__module__}.{selector.__name__}"
    return None


def psycopg_wait_state() -> Tuple[List[Tuple[str, Optional[str]]], Optional[str]]:
    """How psycopg 3 waits, read from its modules: ``([(where, why it blocks or None)], why
    connecting blocks or None)``. Call only when psycopg is imported and gevent is patched.

    ``where`` is ``psycopg.waiting.wait`` (what ``Connection.wait`` calls) and, on old psycopg
    versions that bound it at import, ``psycopg.connection.wait``.
    """
    waiting = sys.modules["psycopg.waiting"]
    funcs = [("psycopg.waiting.wait", waiting.wait)]
    connection = sys.modules.get("psycopg.connection")
    bound = getattr(connection, "wait", None)
    if bound is not None and bound is not waiting.wait:
        funcs.append(("psycopg.connection.wait", bound))
    queries = [(where, _psycopg_wait_blocks(waiting, fn)) for where, fn in funcs]
    wait_conn = getattr(waiting, "wait_conn", None)
    connect: Optional[str] = None
    if isinstance(wait_conn, types.FunctionType) and wait_conn.__module__ == waiting.__name__:
        connect = _selector_blocks(waiting)
    return queries, connect


def _psycopg_fix(mode: str) -> str:
    order = (
        "or drop --preload"
        if mode == "preload"
        else "or import psycopg only after gevent.monkey.patch_all()"
    )
    return (
        "call greenscope.patch_drivers() in each worker after patching (gunicorn -c "
        f"python:greenscope.gunicorn does), {order}"
    )


def check_psycopg(ctx: Context) -> List[Finding]:
    """Under gevent, psycopg 3 must wait through a cooperative function (see the module doc).

    Example (gevent is not patched here: nothing to say)::

        >>> from greenscope.diagnostics.findings import Context
        >>> check_psycopg(Context())
        []
    """
    if green_runtime() != "gevent" or not _app_uses(ctx, "psycopg"):
        return []
    if "psycopg.waiting" not in sys.modules:  # pragma: no cover - psycopg imports it
        return []
    queries, connect = psycopg_wait_state()
    blocking = [f"{where} is {why}" for where, why in queries if why not in (None, "?")]
    if blocking:
        return [
            Finding(
                UNSAFE,
                "psycopg 3",
                "; ".join(blocking) + ": every query blocks the whole worker (measured: 5 "
                "greenlets x pg_sleep(0.3) took 1.58 s, 0.33 s with psycopg imported after "
                "patching)",
                _psycopg_fix(ctx.mode),
            )
        ]
    unknown = [where for where, why in queries if why == "?"]
    if unknown:
        return [
            Finding(
                WARNING,
                "psycopg 3",
                f"{', '.join(unknown)} is a psycopg wait function the doctor does not know: it "
                "cannot tell whether queries yield to other greenlets",
                _psycopg_fix(ctx.mode),
            )
        ]
    if connect is not None:
        return [
            Finding(
                WARNING,
                "psycopg 3",
                f"queries are cooperative, but connecting is not: {connect}, bound when psycopg "
                "was imported before patching; each new connection blocks the whole worker until "
                "the server answers",
                _psycopg_fix(ctx.mode),
            )
        ]
    waiting = sys.modules["psycopg.waiting"]
    wait = waiting.wait
    return [
        Finding(
            OK,
            "psycopg 3",
            f"waits with {wait.__module__}.{wait.__name__} and "
            f"{waiting.DefaultSelector.__module__}.{waiting.DefaultSelector.__name__}: "
            "cooperative under gevent",
        )
    ]
