"""``python -m greenscope doctor [--patch | --preload] [module:app]``: import the app, report.

When the app is imported matters as much as what it does. gunicorn's gevent worker patches
*before* importing the app (``--patch`` here), unless ``--preload`` makes the master import it
first and the workers patch later (``--preload`` here); without either flag the doctor imports
the app as it is (what a threaded server, or the app's own ``monkey.patch_all()``, gives).

The doctor records which modules importing the app added, so it reports only the drivers the
app uses; it imports none itself. Exit codes: 0 safe (warnings allowed), 1 unsafe, 2 usage or
import error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any, FrozenSet, Optional, Sequence

from .checks import check
from .checks._common import gevent_patched, objects_of

__all__ = ["load_app", "main"]


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
    """What ``-c python:greenscope.gunicorn`` does in each worker, for ``--greenscope-gunicorn``:
    make the drivers cooperative, and under ``--preload`` rebuild the pools made before forking.
    """
    if not gevent_patched():
        return
    from ..drivers import DriverPatchError, patch_drivers

    with contextlib.suppress(DriverPatchError):  # a driver left blocking: the checks report it
        patch_drivers()
    if mode == "preload" and "sqlalchemy.engine" in sys.modules:
        from sqlalchemy.engine import Engine

        for engine in objects_of(Engine):
            engine.dispose(close=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m greenscope doctor [module:app]``: print the report, return the exit code.

    Exit codes: 0 safe (warnings allowed), 1 unsafe, 2 usage or import error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m greenscope doctor",
        description="Import a WSGI/ASGI/Celery app the way gunicorn (or the worker) does and "
        "report unsafe SQLAlchemy session scoping, pools and drivers under gevent and eventlet.",
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
        help="also apply what -c python:greenscope.gunicorn does in each worker (cooperative "
        "drivers; pools rebuilt after patching under --preload)",
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
    app: Any = None
    app_modules: FrozenSet[str] = frozenset()
    if args.app:
        before = set(sys.modules)
        try:
            app = load_app(args.app)
        except Exception as error:
            print(f"greenscope doctor: cannot import {args.app!r}: {error!r}", file=sys.stderr)
            return 2
        app_modules = frozenset(set(sys.modules) - before)
    if mode == "preload":
        _patch_all()
    if args.greenscope_gunicorn:
        _greenscope_worker_steps(mode)
    report = check(mode, args.app, app=app, app_modules=app_modules)
    print(report.format())
    return report.exit_code
