"""What several checks need: is a green runtime patched, which objects are alive, their names.

Nothing here imports gevent, eventlet or a driver: a check looks at ``sys.modules`` only, so the
doctor never reports (or changes) something the application did not load.
"""

from __future__ import annotations

import functools
import gc
import importlib
import inspect
import sys
import types
from typing import Any, Iterator, List, Optional

__all__ = [
    "callable_name",
    "eventlet_patched",
    "gevent_patched",
    "green_runtime",
    "greenscope_registries",
    "inner_apps",
    "is_asgi",
    "is_async_callable",
    "is_os_thread_local",
    "is_unpatched_local",
    "is_unpatched_lock",
    "name_of",
    "objects_of",
    "original",
    "patch_order_fix",
]


def gevent_patched() -> bool:
    """True when gevent is imported and has patched ``threading.local`` (never imports it)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_object_patched("threading", "local"))


def eventlet_patched() -> bool:
    """True when eventlet is imported and has monkeypatched threads (never imports it)."""
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return False
    try:
        return bool(patcher.is_monkey_patched("thread"))
    except Exception:  # pragma: no cover - a very old or broken eventlet
        return False


def green_runtime() -> Optional[str]:
    """``"gevent"`` or ``"eventlet"`` when one has patched threads, else None."""
    if gevent_patched():
        return "gevent"
    if eventlet_patched():
        return "eventlet"
    return None


def original(module: str, name: str) -> Any:
    """The stdlib object gevent replaced (or the current one when gevent is not imported)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def is_os_thread_local(obj: object) -> bool:
    """Is ``obj`` a C ``_thread._local`` (one value per OS thread), whoever patched what?

    gevent's and eventlet's locals are other types (``gevent.local.local``,
    ``eventlet.corolocal.local``), so the type's name is enough and nothing is imported.
    """
    cls = type(obj)
    return cls.__module__ == "_thread" and cls.__name__ == "_local"


def is_unpatched_local(obj: object) -> bool:
    """Is ``obj`` a C ``_thread._local`` (per OS thread), not gevent's per-greenlet local?"""
    return type(obj) is original("_thread", "_local")


def is_unpatched_lock(lock: object) -> bool:
    """Is ``lock`` an OS-level lock/RLock (blocks the whole hub) rather than a gevent one?"""
    raw_lock = type(original("_thread", "allocate_lock")())
    raw_rlock = original("_thread", "RLock")
    if type(lock) is raw_lock or type(lock) is raw_rlock:
        return True
    block = getattr(lock, "_block", None)  # threading._RLock (pure Python) wraps a lock
    return block is not None and type(block) is raw_lock


def objects_of(cls: type) -> List[Any]:
    """Every live object of ``cls`` (or a subclass) the garbage collector tracks."""
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, cls):
                found.append(obj)
        except Exception:  # pragma: no cover - exotic proxies raising from __class__
            continue
    return found


def name_of(obj: object) -> str:
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


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function (or its repr)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


def greenscope_registries(default_scope_only: bool = False) -> List[Any]:
    """Live greenscope registries (``default_scope_only``: those keyed on ``current_scope``,
    the greenlet, task or thread when no explicit scope is open)."""
    if "greenscope.registry" not in sys.modules:
        return []
    from ...registry import _all_registries
    from ...scoping import current_scope

    registries = list(_all_registries)
    if default_scope_only:
        registries = [r for r in registries if getattr(r, "scopefunc", None) is current_scope]
    return registries


def patch_order_fix(mode: str, what: str, runtime: Optional[str] = "gevent") -> str:
    """How to get ``what`` created after ``runtime`` patched, for the way the app was imported.

    ``--preload`` is the one case where gunicorn itself imports the app before patching; in
    as-is mode the app patches itself, too late.

    Example::

        >>> patch_order_fix("preload", "the engine")
        'or create the engine after patching: drop --preload'
    """
    if mode == "preload" and runtime == "gevent":
        return f"or create {what} after patching: drop --preload"
    patch = "eventlet.monkey_patch()" if runtime == "eventlet" else "gevent.monkey.patch_all()"
    return (
        f"or call {patch} before {what} is created (the first lines of the entry point, before "
        "any other import)"
    )


#: where WSGI and ASGI wrappers keep the app they wrap
WRAPPER_ATTRIBUTES = ("wsgi_app", "app", "application", "wrapped", "_app", "__wrapped__")


def inner_apps(app: Any, depth: int = 12) -> Iterator[Any]:
    """``app`` and every app it wraps, outermost first (each object once, bounded depth).

    Example::

        >>> class Outer:
        ...     def __init__(self, app):
        ...         self.app = app
        >>> inner = len  # any callable
        >>> list(inner_apps(Outer(inner)))[-1] is inner
        True
    """
    seen = set()
    todo = [(app, 0)]
    while todo:
        obj, level = todo.pop(0)
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        yield obj
        if level >= depth or isinstance(obj, type):
            continue
        for attribute in WRAPPER_ATTRIBUTES:
            try:  # context-local proxies and properties may raise
                inner = getattr(obj, attribute, None)
            except Exception:
                continue
            if inner is not None and callable(inner):
                todo.append((inner, level + 1))


def is_async_callable(fn: Any) -> bool:
    """Is ``fn`` (a function, partial, or object with ``__call__``) a coroutine function?"""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a class instance with async __call__
    return not inspect.isfunction(fn) and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


def is_asgi(app: Any) -> bool:
    """Is ``app`` an ASGI application (its ``__call__`` is a coroutine function)?

    Example::

        >>> async def app(scope, receive, send): ...
        >>> is_asgi(app), is_asgi(lambda environ, start_response: [])
        (True, False)
    """
    return app is not None and not isinstance(app, type) and is_async_callable(app)
