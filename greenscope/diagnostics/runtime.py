"""The runtime view: what live greenscope registries hold, for a running process.

What the doctor cannot see at import time shows here: sessions that outlived their scope,
sessions greenscope closed because their scope ended without ``remove()``, and sessions left
in an open transaction ("idle in transaction" on the server) with the age of the oldest. With
``GREENSCOPE_TRACE=1`` every entry records where it was created, so the report names the code
that left it. ``greenscope.gunicorn`` logs it at worker exit through gunicorn's logger.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, List, Optional, Tuple, TypedDict

from .. import _transactions

__all__ = ["RegistryReport", "RuntimeReport", "log_runtime_report", "runtime_report"]


class RegistryReport(TypedDict):
    """One live greenscope registry in :func:`runtime_report`."""

    registry: str
    createfunc: str
    live_scopes: int
    ended_without_remove: int
    origins: List[str]
    #: live sessions whose transaction began at the database and has not ended
    in_transaction: int
    #: seconds since the oldest of those began (None: no session in a transaction)
    oldest_transaction_age: Optional[float]
    #: where that session was created (``GREENSCOPE_TRACE=1``), else None
    oldest_transaction_origin: Optional[str]


class RuntimeReport(TypedDict):
    """What :func:`runtime_report` returns."""

    pid: int
    trace: bool
    live_scopes: int
    ended_without_remove: int
    in_transaction: int
    oldest_transaction_age: Optional[float]
    registries: List[RegistryReport]


def _values(registry: Any) -> List[Tuple[Any, Optional[str]]]:
    """(value, origin) of every live entry: weakly keyed ones, then strongly held keys."""
    found = [
        (getattr(entry, "value", None), getattr(entry, "origin", None))
        for entry in list(getattr(registry, "_entries", {}).values())
    ]
    strong = getattr(registry, "registry", None)
    if isinstance(strong, dict):
        found += [(value, None) for value in list(strong.values())]
    return [(value, origin) for value, origin in found if value is not None]


def _registry_report(registry: Any, now: float) -> RegistryReport:
    values = _values(registry)
    began = ((_transactions.began_at(value), origin) for value, origin in values)
    open_ = [(t, origin) for t, origin in began if t is not None]
    oldest = min(open_, key=lambda item: item[0]) if open_ else None
    return RegistryReport(
        registry=repr(registry),
        createfunc=repr(registry.createfunc),
        live_scopes=len(registry),
        ended_without_remove=getattr(registry, "ended_without_remove", 0),
        origins=[origin for _value, origin in values if origin is not None],
        in_transaction=len(open_),
        oldest_transaction_age=None if oldest is None else round(now - oldest[0], 3),
        oldest_transaction_origin=None if oldest is None else oldest[1],
    )


def runtime_report() -> RuntimeReport:
    """Describe every live greenscope registry in this process.

    Per registry: live scopes (``len(registry)``), values greenscope closed because their scope
    ended without ``remove()`` (``ended_without_remove``), values waiting to be closed, live
    sessions in a database transaction (``in_transaction``) and how many seconds the oldest has
    been open (``oldest_transaction_age``), and with ``GREENSCOPE_TRACE=1`` where the live
    entries - and the oldest transaction's session - were created (the core also logs the
    creation site of each value it closes for want of ``remove()``).

    Example::

        >>> import greenlet, greenscope
        >>> from sqlalchemy.orm import Session
        >>> registry = greenscope.WeakScopeRegistry(Session)
        >>> session = greenlet.greenlet(registry).switch()  # a greenlet that never calls remove()
        >>> import gc; _ = gc.collect()
        >>> mine = [r for r in runtime_report()["registries"] if r["registry"] == repr(registry)]
        >>> mine[0]["live_scopes"], mine[0]["ended_without_remove"], mine[0]["in_transaction"]
        (0, 1, 0)
    """
    from .. import registry as registry_module

    now = time.monotonic()
    registries = [
        _registry_report(registry, now)
        for registry in sorted(registry_module._all_registries, key=id)
    ]
    ages = [r["oldest_transaction_age"] for r in registries]
    known = [age for age in ages if age is not None]
    return RuntimeReport(
        pid=os.getpid(),
        trace=bool(getattr(registry_module, "_TRACE", False)),
        live_scopes=sum(r["live_scopes"] for r in registries),
        ended_without_remove=sum(r["ended_without_remove"] for r in registries),
        in_transaction=sum(r["in_transaction"] for r in registries),
        oldest_transaction_age=max(known) if known else None,
        registries=registries,
    )


def _transactions_text(in_transaction: int, age: Optional[float]) -> str:
    if not in_transaction or age is None:
        return "0 in a transaction"
    return f"{in_transaction} in a transaction (oldest open {age:.1f} s)"


def log_runtime_report(logger: Optional[logging.Logger] = None) -> RuntimeReport:
    """Log :func:`runtime_report` (``greenscope`` logger by default) and return it.

    One INFO line per process; a WARNING per registry that closed sessions for want of
    ``remove()`` or holds sessions in a transaction, with the creation sites of live entries
    when ``GREENSCOPE_TRACE=1``. Call it at worker exit (``greenscope.gunicorn`` does).

    Example::

        >>> report = log_runtime_report()
        >>> report["pid"] == __import__("os").getpid()
        True
    """
    log = logger or logging.getLogger("greenscope")
    report = runtime_report()
    log.info(
        "greenscope runtime (pid %d): %d registries, %d live scopes, %s, %d sessions closed "
        "because their scope ended without remove()%s",
        report["pid"],
        len(report["registries"]),
        report["live_scopes"],
        _transactions_text(report["in_transaction"], report["oldest_transaction_age"]),
        report["ended_without_remove"],
        "" if report["trace"] else " (GREENSCOPE_TRACE=1 records where sessions are created)",
    )
    for entry in report["registries"]:
        if entry["ended_without_remove"] or entry["origins"] or entry["in_transaction"]:
            oldest = entry["oldest_transaction_origin"]
            others = list(entry["origins"])
            if oldest in others:  # printed once, under its own heading
                others.remove(oldest)
            log.warning(
                "greenscope: registry %s (%s): %d live scopes, %s, %d closed without remove()%s%s",
                entry["registry"],
                entry["createfunc"],
                entry["live_scopes"],
                _transactions_text(entry["in_transaction"], entry["oldest_transaction_age"]),
                entry["ended_without_remove"],
                "" if oldest is None else "\noldest transaction's session created at:\n" + oldest,
                "".join("\nlive entry created at:\n" + origin for origin in others),
            )
    return report
