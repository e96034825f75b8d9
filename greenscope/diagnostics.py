"""Find unsafe session scoping in an application: ``python -m greenscope doctor module:app``.

Users usually arrive here after an incident: requests that saw each other's data, a pool that
ran dry, a worker that froze. Every one of those has a configuration that can be *seen* in a
running process, so the doctor imports the application the way gunicorn would and looks:

- has gevent patched ``threading.local``? (``gevent.monkey.is_object_patched``);
- every stock :class:`sqlalchemy.orm.scoped_session` (Flask-SQLAlchemy's ``db.session``
  included), found with :func:`gc.get_objects`: a ``threading.local`` created before gevent
  patched (one Session per OS thread, shared by every greenlet), a ``scopefunc`` built on
  ``id()`` (ids are reused), or keyed on the greenlet/task with nothing to clean up;
- every :class:`sqlalchemy.engine.Engine` whose pool holds locks created before patching
  (a greenlet waiting for a connection blocks the whole worker);
- psycopg2 without a wait callback under gevent (every query blocks the worker).

When the app is imported matters as much as what it does. gunicorn's gevent worker patches
*before* importing the app (``--patch`` here), unless ``--preload`` makes the master import it
first and the workers patch later (``--preload`` here); without either flag the doctor imports
the app as it is (what a threaded server, or the app's own ``monkey.patch_all()``, gives).

The runtime half, :func:`runtime_report` and :func:`log_runtime_report`, describes live
greenscope registries: live scopes, sessions greenscope closed because their scope ended
without ``remove()``, and with ``GREENSCOPE_TRACE=1`` where the still-live ones were created.
``greenscope.gunicorn`` logs it at worker exit.
"""

from __future__ import annotations

import argparse
import dis
import functools
import gc
import importlib
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict

__all__ = [
    "Finding",
    "Report",
    "check",
    "load_app",
    "log_runtime_report",
    "main",
    "runtime_report",
]

OK = "OK"
WARNING = "WARNING"
UNSAFE = "UNSAFE"

#: How the app was imported relative to ``gevent.monkey.patch_all()``.
MODES: Dict[str, str] = {
    "as-is": "imported as is; the doctor patched nothing (a threaded server, or the app's own "
    "monkey.patch_all())",
    "patch": "gevent.monkey.patch_all() ran before the app was imported (gunicorn -k gevent "
    "without --preload)",
    "preload": "the app was imported first, then gevent.monkey.patch_all() ran (gunicorn -k "
    "gevent --preload: the master imports the app, each worker patches after fork)",
}


@dataclass(frozen=True)
class Finding:
    """One line of the doctor's report: a level (OK, WARNING, UNSAFE), a subject, why, and a fix.

    Example::

        >>> print(Finding("OK", "gevent", "not imported").format())
        OK       gevent: not imported
    """

    level: str
    subject: str
    message: str
    fix: Optional[str] = None

    def format(self) -> str:
        """The finding as report lines: ``LEVEL    subject: message`` and an indented fix."""
        text = f"{self.level:<8} {self.subject}: {self.message}"
        if self.fix:
            text += f"\n         fix: {self.fix}"
        return text


@dataclass
class Report:
    """Everything the doctor found, its verdict and the process exit code.

    Example::

        >>> report = Report("as-is", [Finding("WARNING", "x", "y")])
        >>> report.verdict, report.exit_code
        ('WARNING', 0)
    """

    mode: str
    findings: List[Finding] = field(default_factory=list)
    target: Optional[str] = None

    def count(self, level: str) -> int:
        """How many findings have ``level``."""
        return sum(1 for finding in self.findings if finding.level == level)

    @property
    def verdict(self) -> str:
        """UNSAFE if anything is unsafe, else WARNING if anything needs a look, else OK."""
        if self.count(UNSAFE):
            return UNSAFE
        if self.count(WARNING):
            return WARNING
        return OK

    @property
    def exit_code(self) -> int:
        """1 when the verdict is UNSAFE, else 0 (warnings do not fail a CI job)."""
        return 1 if self.verdict == UNSAFE else 0

    def format(self) -> str:
        """The whole report as text, ending with the verdict line."""
        lines = [f"greenscope doctor: {self.target or '(no app given)'}"]
        lines.append(f"mode: {self.mode}: {MODES.get(self.mode, '')}")
        lines.extend(finding.format() for finding in self.findings)
        lines.append(
            f"verdict: {self.verdict} ({self.count(UNSAFE)} unsafe, {self.count(WARNING)} "
            f"warning(s), {self.count(OK)} ok)"
        )
        return "\n".join(lines)


# -- gevent ------------------------------------------------------------------------------


def _gevent_patched() -> bool:
    """True when gevent is imported and has patched ``threading.local`` (never imports it)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_object_patched("threading", "local"))


def _original(module: str, name: str) -> Any:
    """The stdlib object gevent replaced (or the current one when gevent is not imported)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def _is_unpatched_local(obj: object) -> bool:
    """Is ``obj`` a C ``_thread._local`` (per OS thread), not gevent's per-greenlet local?"""
    return type(obj) is _original("_thread", "_local")


def _is_unpatched_lock(lock: object) -> bool:
    """Is ``lock`` an OS-level lock/RLock (blocks the whole hub) rather than a gevent one?"""
    raw_lock = type(_original("_thread", "allocate_lock")())
    raw_rlock = _original("_thread", "RLock")
    if type(lock) is raw_lock or type(lock) is raw_rlock:
        return True
    block = getattr(lock, "_block", None)  # threading._RLock (pure Python) wraps a lock
    return block is not None and type(block) is raw_lock


def check_gevent(mode: str) -> List[Finding]:
    """Report whether gevent is in use and has patched ``threading.local``."""
    if "gevent" not in sys.modules:
        hint = ""
        if mode == "as-is":
            hint = (
                " (run the doctor with --patch, or --preload, to check the app as gunicorn's "
                "gevent worker imports it)"
            )
        return [Finding(OK, "gevent", "not imported: OS threads only, nothing to patch" + hint)]
    if _gevent_patched():
        return [Finding(OK, "gevent", "threading.local is patched (per greenlet)")]
    return [
        Finding(
            WARNING,
            "gevent",
            "imported, but threading.local is NOT patched: thread-locals and locks are per OS "
            "thread, shared by every greenlet",
            "call gevent.monkey.patch_all() before anything else is imported (gunicorn -k "
            "gevent does it in each worker)",
        )
    ]


# -- scopefuncs ----------------------------------------------------------------------------

_ID_NAMES = frozenset({"get_ident", "get_native_id", "_get_ident"})
_GREENLET_NAMES = frozenset({"getcurrent"})
_TASK_NAMES = frozenset({"current_task", "_current_task"})


def _code_names(code: types.CodeType) -> Iterator[Tuple[str, str]]:
    """(opname, name) for every name a code object (and its nested code) loads."""
    for instruction in dis.get_instructions(code):
        if isinstance(instruction.argval, str):
            yield instruction.opname, instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def classify_scopefunc(scopefunc: Any) -> str:
    """What a ``scopefunc`` keys on: ``current_scope``, ``id``, ``greenlet``, ``task`` or ``other``.

    ``id`` covers ``id(...)`` and thread idents (gevent's ``get_ident`` is ``id(getcurrent())``):
    both are reused once their object dies, so a new greenlet inherits a dead one's Session.

    Example::

        >>> import greenlet
        >>> classify_scopefunc(lambda: id(greenlet.getcurrent()))
        'id'
        >>> classify_scopefunc(greenlet.getcurrent)
        'greenlet'
    """
    while isinstance(scopefunc, functools.partial):
        scopefunc = scopefunc.func
    from .scoping import current_scope

    if scopefunc is current_scope:
        return "current_scope"
    name = getattr(scopefunc, "__name__", "")
    if name in _ID_NAMES or scopefunc is id:
        return "id"
    if name in _GREENLET_NAMES:
        return "greenlet"
    if name in _TASK_NAMES:
        return "task"
    code = getattr(getattr(scopefunc, "__func__", scopefunc), "__code__", None)
    if not isinstance(code, types.CodeType):
        return "other"
    names = list(_code_names(code))
    if any(n == "id" and op in ("LOAD_GLOBAL", "LOAD_NAME") for op, n in names):  # builtin id
        return "id"
    loaded = {n for _op, n in names}
    if loaded & _ID_NAMES:
        return "id"
    if loaded & _GREENLET_NAMES:
        return "greenlet"
    if loaded & _TASK_NAMES:
        return "task"
    return "other"


# -- finding objects -----------------------------------------------------------------------


def _objects_of(cls: type) -> List[Any]:
    """Every live object of ``cls`` (or a subclass) the garbage collector tracks."""
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, cls):
                found.append(obj)
        except Exception:  # pragma: no cover - exotic proxies raising from __class__
            continue
    return found


def _name_of(obj: object) -> str:
    """A readable name for ``obj``: ``module.attr`` (or ``module.attr.session``), else repr."""
    names: List[str] = []
    for mod_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or mod_name.startswith(("greenscope.", "sqlalchemy")):
            continue
        for attr, value in list(namespace.items()):
            if value is obj:
                names.append(f"{mod_name}.{attr}")
            elif not isinstance(value, (type, types.ModuleType)):
                try:  # context-local proxies (werkzeug's) raise outside their context
                    inner = getattr(value, "__dict__", None)
                except Exception:
                    continue
                if isinstance(inner, dict) and inner.get("session") is obj:
                    names.append(f"{mod_name}.{attr}.session")  # Flask-SQLAlchemy's db.session
    if names:
        return " = ".join(sorted(set(names))[:3])
    return f"<{type(obj).__module__}.{type(obj).__qualname__} at {id(obj):#x}>"


def _scoped_session_classes() -> List[type]:
    from sqlalchemy.orm import scoped_session

    classes: List[type] = [scoped_session]
    if "sqlalchemy.ext.asyncio" in sys.modules:
        from sqlalchemy.ext.asyncio import async_scoped_session

        classes.append(async_scoped_session)
    return classes


def check_scoped_sessions(gevent_active: bool) -> List[Finding]:
    """Classify every ``scoped_session`` / ``async_scoped_session`` alive in the process."""
    if "sqlalchemy.orm" not in sys.modules:
        return []
    findings = []
    for cls in _scoped_session_classes():
        for proxy in _objects_of(cls):
            registry = getattr(proxy, "registry", None)
            subject = f"{type(proxy).__name__} {_name_of(proxy)}"
            findings.append(_classify_registry(subject, registry, gevent_active))
    return findings


_FIX_STOCK = (
    "use greenscope.scoped_session(session_factory) (greenscope.asyncio.async_scoped_session "
    "for asyncio; greenscope.flask.SQLAlchemy for Flask-SQLAlchemy)"
)


def _callable_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


def _classify_registry(subject: str, registry: Any, gevent_active: bool) -> Finding:
    from sqlalchemy.util import ThreadLocalRegistry

    from .registry import WeakScopeRegistry

    if isinstance(registry, WeakScopeRegistry):
        kind = classify_scopefunc(registry.scopefunc)
        if kind == "id":
            return Finding(
                UNSAFE,
                subject,
                f"greenscope registry with an id()-based scopefunc {registry.scopefunc!r}: "
                "ints are kept strongly and reused, so a new scope inherits a dead one's Session",
                "drop the scopefunc (the default, current_scope, is right) or return the "
                "object itself instead of its id",
            )
        scope_name = kind if kind != "other" else _callable_name(registry.scopefunc)
        return Finding(OK, subject, f"greenscope registry (scope: {scope_name})")
    if isinstance(registry, ThreadLocalRegistry):
        local = registry.registry
        if _is_unpatched_local(local):
            if gevent_active:
                return Finding(
                    UNSAFE,
                    subject,
                    "its threading.local was created before gevent patched threading: it is "
                    "per OS thread, so every greenlet of a worker shares one Session "
                    "(measured: 50 concurrent greenlets got 1 Session)",
                    _FIX_STOCK + "; or patch before importing the app (no --preload)",
                )
            if "gevent" in sys.modules:
                return Finding(
                    WARNING,
                    subject,
                    "thread-local created while gevent is imported but not patched: one "
                    "Session per OS thread, shared by greenlets if gevent runs them",
                    _FIX_STOCK,
                )
            return Finding(OK, subject, "stock thread-local: one Session per OS thread")
        return Finding(
            WARNING,
            subject,
            "stock thread-local patched by gevent: one Session per greenlet, but nothing closes "
            "a Session whose greenlet ended without remove(); its connection stays checked out "
            "until the garbage collector frees it (measured: 30 of 40 requests timed out)",
            _FIX_STOCK + "; or make sure every code path calls remove()",
        )
    scopefunc = getattr(registry, "scopefunc", None)
    kind = classify_scopefunc(scopefunc)
    if kind == "id":
        return Finding(
            UNSAFE,
            subject,
            f"scopefunc {scopefunc!r} is id()-based: ids are reused, so a new greenlet or "
            "context inherits a dead one's Session (measured: 9,998 of 10,000 sequential "
            "greenlets)",
            _FIX_STOCK,
        )
    if kind in ("greenlet", "task"):
        leaked = "greenlet" if kind == "greenlet" else "Task"
        return Finding(
            UNSAFE,
            subject,
            f"scopefunc {scopefunc!r} keys a plain dict on the {leaked}: every {leaked} and "
            "its Session stays alive until remove() (measured: with a pool of 10, 30 of 40 "
            "later requests timed out)",
            _FIX_STOCK,
        )
    return Finding(
        WARNING,
        subject,
        f"custom scopefunc {scopefunc!r} in a stock registry: the doctor cannot tell whether "
        "its keys are reused or outlive their scope; every entry lives until remove()",
        "greenscope.scoped_session(factory, scopefunc=...) holds keys weakly and closes "
        "sessions of ended scopes",
    )


def check_engines(gevent_active: bool) -> List[Finding]:
    """Under gevent, flag engines whose pool locks (or thread-local) predate patching."""
    if "sqlalchemy.engine" not in sys.modules:
        return []
    from sqlalchemy.engine import Engine

    findings = []
    for engine in _objects_of(Engine):
        subject = f"engine {engine.url.render_as_string(hide_password=True)}"
        if not gevent_active:
            continue
        pool = engine.pool
        queue = getattr(pool, "_pool", None)
        mutex = getattr(queue, "mutex", None)
        conn_local = getattr(pool, "_conn", None)
        if mutex is not None and _is_unpatched_lock(mutex):
            findings.append(
                Finding(
                    UNSAFE,
                    subject,
                    f"{type(pool).__name__}'s lock was created before gevent patched threading:"
                    " a greenlet waiting for a connection blocks the whole worker, and an "
                    "exhausted pool deadlocks it",
                    "create engines after patching, or rebuild the pool in each worker: "
                    "engine.dispose(close=False) (gunicorn -c python:greenscope.gunicorn does)",
                )
            )
        elif conn_local is not None and _is_unpatched_local(conn_local):
            findings.append(
                Finding(
                    UNSAFE,
                    subject,
                    f"{type(pool).__name__} keeps its connection in a threading.local created "
                    "before gevent patched threading: every greenlet shares one connection",
                    "create engines after patching, or engine.dispose(close=False) in each worker",
                )
            )
        else:
            findings.append(
                Finding(
                    OK,
                    subject,
                    f"{type(pool).__name__}: no OS lock or thread-local from before patching",
                )
            )
    return findings


def check_psycopg2(gevent_active: bool) -> List[Finding]:
    """Under gevent, psycopg2 needs a wait callback (psycogreen) or it blocks the worker."""
    if not gevent_active or "psycopg2" not in sys.modules:
        return []
    import psycopg2.extensions

    callback = psycopg2.extensions.get_wait_callback()
    if callback is None:
        return [
            Finding(
                UNSAFE,
                "psycopg2",
                "no wait callback under gevent: every query blocks the whole worker, and one "
                "slow query stalls every request in it",
                "call psycogreen.gevent.patch_psycopg() in each worker before the first query "
                "(gunicorn -c python:greenscope.gunicorn does)",
            )
        ]
    name = getattr(callback, "__module__", "") + "." + getattr(callback, "__name__", "?")
    return [Finding(OK, "psycopg2", f"wait callback {name.lstrip('.')} makes it cooperative")]


def check(mode: str = "as-is", target: Optional[str] = None) -> Report:
    """Check the current process (after the app is imported) and return the :class:`Report`.

    Example::

        >>> report = check()
        >>> report.verdict in ("OK", "WARNING", "UNSAFE")
        True
    """
    gc.collect()  # objects already unreachable are not the app's configuration
    gevent_active = _gevent_patched()
    findings = check_gevent(mode)
    findings += check_scoped_sessions(gevent_active)
    findings += check_engines(gevent_active)
    findings += check_psycopg2(gevent_active)
    return Report(mode, findings, target)


# -- importing the app the way gunicorn does -----------------------------------------------


def load_app(target: str) -> Any:
    """Import ``module:variable`` (or ``module:factory()``) like gunicorn; return the object.

    Without ``:variable`` the module's ``application``, else its ``app``, is used.

    Example::

        >>> load_app("greenscope:scope") is __import__("greenscope").scope
        True
    """
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        for candidate in ("application", "app"):
            if hasattr(module, candidate):
                return getattr(module, candidate)
        raise LookupError(f"module {module_name!r} has no 'application' or 'app'")
    call = attr.endswith("()")
    name = attr[:-2] if call else attr
    obj: Any = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"{module_name!r} has no attribute {name!r}") from None
    return obj() if call else obj


def _patch_all() -> None:
    from gevent import monkey

    monkey.patch_all()


def _greenscope_worker_steps(mode: str) -> None:
    """What ``-c python:greenscope.gunicorn`` does in each worker, for ``--greenscope-gunicorn``."""
    if not _gevent_patched():
        return
    try:
        import psycopg2  # noqa: F401
        from psycogreen.gevent import patch_psycopg
    except ImportError:
        pass
    else:
        patch_psycopg()
    if mode == "preload" and "sqlalchemy.engine" in sys.modules:
        from sqlalchemy.engine import Engine

        for engine in _objects_of(Engine):
            engine.dispose(close=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m greenscope doctor [module:app]``: print the report, return the exit code.

    Exit codes: 0 safe (warnings allowed), 1 unsafe, 2 usage or import error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m greenscope doctor",
        description="Import a WSGI/ASGI app the way gunicorn does and report unsafe "
        "SQLAlchemy session scoping, pools and drivers under gevent.",
    )
    parser.add_argument(
        "app", nargs="?", help="module:variable (default variable: application, app)"
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--patch",
        action="store_true",
        help="gevent.monkey.patch_all() before importing the app (gunicorn -k gevent)",
    )
    when.add_argument(
        "--preload",
        action="store_true",
        help="import the app, then patch_all() (gunicorn -k gevent --preload)",
    )
    parser.add_argument(
        "--greenscope-gunicorn",
        action="store_true",
        help="also apply what -c python:greenscope.gunicorn does in each worker (psycogreen; "
        "pools rebuilt after patching under --preload)",
    )
    parser.add_argument(
        "--pythonpath", action="append", default=[], help="directory to add to sys.path"
    )
    args = parser.parse_args(argv)
    mode = "patch" if args.patch else "preload" if args.preload else "as-is"
    for path in [*reversed(args.pythonpath), os.getcwd()]:
        if path not in sys.path:
            sys.path.insert(0, path)
    if mode == "patch":
        _patch_all()
    if args.app:
        try:
            load_app(args.app)
        except Exception as error:
            print(f"greenscope doctor: cannot import {args.app!r}: {error!r}", file=sys.stderr)
            return 2
    if mode == "preload":
        _patch_all()
    if args.greenscope_gunicorn:
        _greenscope_worker_steps(mode)
    report = check(mode, args.app)
    print(report.format())
    return report.exit_code


# -- the runtime view ----------------------------------------------------------------------


class RegistryReport(TypedDict):
    """One live greenscope registry in :func:`runtime_report`."""

    registry: str
    createfunc: str
    live_scopes: int
    ended_without_remove: int
    origins: List[str]


class RuntimeReport(TypedDict):
    """What :func:`runtime_report` returns."""

    pid: int
    trace: bool
    live_scopes: int
    ended_without_remove: int
    registries: List[RegistryReport]


def runtime_report() -> RuntimeReport:
    """Describe every live greenscope registry in this process.

    Per registry: live scopes (``len(registry)``), values greenscope closed because their scope
    ended without ``remove()`` (``ended_without_remove``), values waiting to be closed, and with
    ``GREENSCOPE_TRACE=1`` where the live entries were created (the core logs the creation site
    of each value it closes for want of ``remove()``).

    Example::

        >>> import greenlet, greenscope
        >>> from sqlalchemy.orm import Session
        >>> registry = greenscope.WeakScopeRegistry(Session)
        >>> session = greenlet.greenlet(registry).switch()  # a greenlet that never calls remove()
        >>> import gc; _ = gc.collect()
        >>> mine = [r for r in runtime_report()["registries"] if r["registry"] == repr(registry)]
        >>> mine[0]["live_scopes"], mine[0]["ended_without_remove"]
        (0, 1)
    """
    from . import registry as registry_module

    registries: List[RegistryReport] = []
    for registry in sorted(registry_module._all_registries, key=id):
        origins = [
            entry.origin for entry in list(registry._entries.values()) if entry.origin is not None
        ]
        registries.append(
            RegistryReport(
                registry=repr(registry),
                createfunc=repr(registry.createfunc),
                live_scopes=len(registry),
                ended_without_remove=registry.ended_without_remove,
                origins=origins,
            )
        )
    return RuntimeReport(
        pid=os.getpid(),
        trace=registry_module._TRACE,
        live_scopes=sum(r["live_scopes"] for r in registries),
        ended_without_remove=sum(r["ended_without_remove"] for r in registries),
        registries=registries,
    )


def log_runtime_report(logger: Optional[logging.Logger] = None) -> RuntimeReport:
    """Log :func:`runtime_report` (``greenscope`` logger by default) and return it.

    One INFO line per process; a WARNING per registry that closed sessions for want of
    ``remove()``, with the creation sites of live entries when ``GREENSCOPE_TRACE=1``.
    Call it at worker exit (``greenscope.gunicorn`` does).

    Example::

        >>> report = log_runtime_report()
        >>> report["pid"] == __import__("os").getpid()
        True
    """
    log = logger or logging.getLogger("greenscope")
    report = runtime_report()
    log.info(
        "greenscope runtime (pid %d): %d registries, %d live scopes, %d sessions closed because "
        "their scope ended without remove()%s",
        report["pid"],
        len(report["registries"]),
        report["live_scopes"],
        report["ended_without_remove"],
        "" if report["trace"] else " (GREENSCOPE_TRACE=1 records where sessions are created)",
    )
    for entry in report["registries"]:
        if entry["ended_without_remove"] or entry["origins"]:
            log.warning(
                "greenscope: registry %s (%s): %d live scopes, %d closed without remove()%s",
                entry["registry"],
                entry["createfunc"],
                entry["live_scopes"],
                entry["ended_without_remove"],
                "".join("\nlive entry created at:\n" + origin for origin in entry["origins"]),
            )
    return report
