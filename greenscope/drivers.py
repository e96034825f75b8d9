"""Make the PostgreSQL drivers cooperative under the green runtime that patched this process.

A driver written in C waits for the server inside C: under gevent or eventlet one query then stops
every greenlet of the process until it returns (20 greenlets running ``select pg_sleep(0.5)``
take 10 s instead of 0.5 s). Each driver has its own cure:

- **psycopg2** waits through a *wait callback*: psycogreen's ``patch_psycopg()``
  (``psycogreen.gevent`` or ``psycogreen.eventlet``) sets one that waits on the hub. The callback
  is read at query time, so the import order does not matter; it only has to be set.
- **psycopg 3** picks its wait function once, when ``psycopg`` is imported: its C ``wait_c``
  unless gevent has patched ``select`` by then. Imported first (gunicorn ``--preload``, a
  ``conftest.py``, a module that imports the models before patching), it keeps ``wait_c``
  for good. :func:`patch_drivers` rebinds ``psycopg.waiting.wait`` (and every psycopg module
  that bound that name) to psycopg's own pure-Python wait on the patched ``select``
  (``wait_poll`` on gevent, ``wait_select`` on eventlet, which removes ``poll``), and
  ``psycopg.waiting.DefaultSelector`` (used while connecting) to the patched
  ``selectors.DefaultSelector``. That is what psycopg itself chooses when imported after
  patching; psycopg looks ``waiting.wait`` up on every query, so no connection has to be
  reopened. psycopg 3's asyncio mode is not touched: it waits on the event loop. Checked with
  psycopg 3.1.20, 3.2.13 and 3.3.9, C and pure-Python implementations, both import orders.

Installed drivers are imported: a driver the application imports later (a lazy
``create_engine``, a Celery task) must find the callback or the wait function already in
place. Each :class:`DriverStatus` says whether the driver had been imported before the call
(``imported_before``): a report (the doctor) must not call a driver "OK" for an application
that never uses it. Nothing is done, and nothing is imported, when neither gevent nor eventlet
has patched the process.

Run it in each process after monkeypatching (``greenscope.gunicorn`` does it in every worker)::

    from gevent import monkey

    monkey.patch_all()

    import greenscope

    for status in greenscope.patch_drivers().values():
        print(status)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import selectors
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["DriverPatchError", "DriverStatus", "green_runtime", "patch_drivers"]

_log = logging.getLogger("greenscope")

#: the drivers this module knows, in the order they are reported
DRIVERS = ("psycopg2", "psycopg")


class DriverPatchError(RuntimeError):
    """A driver was patched and is still not cooperative afterwards (see the message)."""


@dataclass(frozen=True)
class DriverStatus:
    """What :func:`patch_drivers` found and did for one driver.

    :param driver: the import name, ``"psycopg2"`` or ``"psycopg"`` (psycopg 3).
    :param runtime: ``"gevent"``, ``"eventlet"`` or ``None`` (nothing patched the process).
    :param installed: the driver can be imported here.
    :param imported_before: it had been imported before the call (by the app, by SQLAlchemy,
        by ``eventlet.monkey_patch()``, which patches psycopg2 itself, or by an earlier call);
        ``False`` means this call imported it, so the application may never use it.
    :param cooperative: its queries now wait through the runtime's hub.
    :param action: ``"patched"`` (this call changed something), ``"already"`` (it was
        cooperative), or ``"skipped"`` (see ``detail``).
    :param detail: what exactly, in one line.

    Example::

        >>> from greenscope.drivers import DriverStatus
        >>> DriverStatus("psycopg2", None, True, False, False, "skipped", "no runtime").action
        'skipped'
    """

    driver: str
    runtime: Optional[str]
    installed: bool
    imported_before: bool
    cooperative: bool
    action: str
    detail: str


def green_runtime() -> Optional[str]:
    """The green runtime that monkeypatched ``socket`` in this process, if any.

    Only modules already imported are looked at: asking never imports gevent or eventlet.

    Example (no runtime patched this process)::

        >>> from greenscope.drivers import green_runtime
        >>> green_runtime() is None
        True
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        return "gevent"
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("socket"):
        return "eventlet"
    return None


def patch_drivers(*, log: Optional[Any] = None) -> Dict[str, DriverStatus]:
    """Make every installed PostgreSQL driver cooperative under the running green runtime.

    Call it after ``monkey.patch_all()`` (gevent) or ``eventlet.monkey_patch()``, in every
    process (each gunicorn worker, each Celery worker); whatever imported the drivers first.
    Calling it again is harmless: a cooperative driver is reported as ``"already"``.

    :param log: where warnings go (a ``logging.Logger`` or gunicorn's ``worker.log``); the
        ``greenscope`` logger by default.
    :return: one :class:`DriverStatus` per known driver, keyed by import name.
    :raises DriverPatchError: a driver was patched and still does not wait cooperatively.

    Example (without a runtime patched, nothing is done)::

        >>> import greenscope
        >>> statuses = greenscope.patch_drivers()
        >>> statuses["psycopg2"].action, statuses["psycopg2"].runtime
        ('skipped', None)
    """
    runtime = green_runtime()
    logger = log if log is not None else _log
    result: Dict[str, DriverStatus] = {}
    for driver in DRIVERS:
        imported_before = driver in sys.modules
        installed = imported_before or _installed(driver)
        if runtime is None:
            status = DriverStatus(
                driver,
                None,
                installed,
                imported_before,
                False,
                "skipped",
                "neither gevent nor eventlet has patched this process",
            )
        elif not installed:
            status = DriverStatus(driver, runtime, False, False, False, "skipped", "not installed")
        else:
            patch = _patch_psycopg2 if driver == "psycopg2" else _patch_psycopg
            unusable = False
            try:
                cooperative, action, detail = patch(runtime)
            except ImportError as error:  # installed but unusable (psycopg 3 without a libpq)
                cooperative, action, detail = False, "skipped", f"cannot be imported: {error}"
                unusable = True
            status = DriverStatus(
                driver, runtime, True, imported_before, cooperative, action, detail
            )
            if not cooperative and not unusable:
                logger.warning("greenscope: %s: %s", driver, detail)
        result[driver] = status
    return result


# -- psycopg2 ---------------------------------------------------------------------------------


def _patch_psycopg2(runtime: str) -> Tuple[bool, str, str]:
    extensions = importlib.import_module("psycopg2.extensions")
    current = extensions.get_wait_callback()
    if current is not None:
        return True, "already", f"wait callback {_qualname(current)}"
    try:
        psycogreen = importlib.import_module(f"psycogreen.{runtime}")
    except ImportError:
        return (
            False,
            "skipped",
            "psycogreen is not installed: every query blocks the whole process; "
            "pip install 'greenscope[gevent]'",
        )
    psycogreen.patch_psycopg()
    current = extensions.get_wait_callback()
    if current is None:
        raise DriverPatchError(
            f"greenscope: psycogreen.{runtime}.patch_psycopg() left psycopg2 without a wait "
            "callback"
        )
    return True, "patched", f"wait callback {_qualname(current)}"


# -- psycopg 3 --------------------------------------------------------------------------------


def _patch_psycopg(runtime: str) -> Tuple[bool, str, str]:
    waiting: Any = importlib.import_module("psycopg.waiting")
    name = "poll" if _select_patched(runtime, "poll") else "select"
    wanted: Optional[Callable[..., Any]] = getattr(waiting, f"wait_{name}", None)
    if wanted is None or not _select_patched(runtime, name):
        raise DriverPatchError(
            f"greenscope: cannot make psycopg cooperative under {runtime}: select.{name} is not "
            f"monkeypatched or psycopg.waiting has no wait_{name}; patch select (patch_all() does)"
        )
    done = []
    old = waiting.wait
    replaced = not _psycopg_wait_cooperative(waiting, runtime)
    if replaced:
        for module in _psycopg_modules():
            if getattr(module, "wait", None) is old:
                module.wait = wanted
        done.append(f"wait {_qualname(old)} -> wait_{name}")
    selector = _default_selector()
    if getattr(waiting, "DefaultSelector", selector) is not selector:
        done.append(f"connect selector {waiting.DefaultSelector.__name__} -> {selector.__name__}")
        waiting.DefaultSelector = selector
    stale = [m.__name__ for m in _psycopg_modules() if replaced and getattr(m, "wait", None) is old]
    if not _psycopg_wait_cooperative(waiting, runtime) or stale:
        raise DriverPatchError(
            f"greenscope: psycopg still waits with {_qualname(waiting.wait)} after patching "
            f"(modules still bound to the blocking wait: {stale})"
        )
    impl = getattr(sys.modules.get("psycopg.pq"), "__impl__", "?")
    if done:
        return True, "patched", "; ".join(done) + f" (implementation {impl})"
    return True, "already", f"wait {_qualname(waiting.wait)} (implementation {impl})"


def _psycopg_modules() -> List[Any]:
    """psycopg's loaded modules (``psycopg`` and ``psycopg.*``, not ``psycopg2``)."""
    return [m for n, m in list(sys.modules.items()) if n.split(".")[0] == "psycopg" and m]


def _psycopg_wait_cooperative(waiting: Any, runtime: str) -> bool:
    """psycopg's current wait function waits through the patched ``select`` module."""
    wait = waiting.wait
    for name in ("poll", "select"):
        if wait is getattr(waiting, f"wait_{name}", None):
            return _select_patched(runtime, name)
    if wait is getattr(waiting, "wait_selector", None):
        return bool(waiting.DefaultSelector is _default_selector()) and _selectors_patched(runtime)
    return False  # wait_c, wait_epoll (the epoll object is made unpatched), or unknown


def _select_patched(runtime: str, name: str) -> bool:
    if runtime == "gevent":
        return bool(sys.modules["gevent.monkey"].is_object_patched("select", name))
    patcher = sys.modules["eventlet.patcher"]
    select = sys.modules.get("select")
    original = getattr(patcher.original("select"), name, None)
    current = getattr(select, name, None)
    return current is not None and current is not original


def _selectors_patched(runtime: str) -> bool:
    if runtime == "gevent":
        return bool(sys.modules["gevent.monkey"].is_object_patched("selectors", "DefaultSelector"))
    return bool(sys.modules["eventlet.patcher"].is_monkey_patched("select"))


# -- helpers ----------------------------------------------------------------------------------


def _default_selector() -> Any:
    """``selectors.DefaultSelector`` as it is now (gevent and eventlet replace it)."""
    return vars(selectors)["DefaultSelector"]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _qualname(function: Any) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}.{getattr(function, '__qualname__', repr(function))}"
