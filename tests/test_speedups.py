"""The compiled hit path (``greenscope/_speedups.c``) and its pure-Python twin.

Both must take exactly the same decisions: the hit-path tests (tests/test_hot_path.py) and the
registry and session tests run here once more with ``GREENSCOPE_PURE=1``, in a subprocess, while
the main run uses the compiled module. Under ``CI`` the module must have been built: a compiler
problem must not quietly turn the fast path off.
"""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import weakref
from typing import Any, List

import gevent
import greenlet
import pytest
from conftest import ROOT, run_python
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope import registry as registry_module
from greenscope.registry import WeakScopeRegistry

speedups = registry_module.speedups
needs_speedups = pytest.mark.skipif(
    speedups is None and not os.environ.get("CI"),
    reason="greenscope._speedups was not built here (no C compiler?)",
)


closes: List[int] = []


class Value:
    def close(self) -> None:
        closes.append(1)


def test_compiled_hit_path_is_built_and_in_use_under_ci() -> None:
    if not os.environ.get("CI"):
        pytest.skip("only CI insists on the compiled module")
    assert speedups is not None, "greenscope._speedups did not build: see the pip install output"
    assert isinstance(WeakScopeRegistry.__dict__["__call__"], speedups.HotCall)
    assert isinstance(greenscope.scoped_session.__dict__["_proxied"], speedups.HotProperty)


def test_pure_python_mode_is_selected_by_the_environment_variable() -> None:
    out = run_python(
        """
        import json
        from greenscope import registry, session
        print(json.dumps([registry.speedups is None,
                          type(registry.WeakScopeRegistry.__dict__["__call__"]).__name__,
                          type(session.scoped_session.__dict__["_proxied"]).__name__]))
        """,
        env={"GREENSCOPE_PURE": "1"},
    )
    assert out == [True, "function", "property"]


def test_hit_path_tests_pass_with_the_pure_python_path_too() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_hot_path.py",
            "tests/test_registry.py",
            "tests/test_session.py",
            "tests/test_sqlalchemy_scoping_port.py",
            "tests/test_asyncio_sqlalchemy_port.py",
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "GREENSCOPE_PURE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@needs_speedups
def test_compiled_call_is_a_method_like_the_function_it_wraps() -> None:
    registry = WeakScopeRegistry(Value)
    value = registry()
    assert WeakScopeRegistry.__call__(registry) is value  # unbound, as slot_tp_call calls it
    assert registry.__call__() is value  # bound
    assert callable(registry.__call__)
    with pytest.raises(TypeError):
        registry(1)  # extra arguments reach the Python function, which refuses them
    wrapped = WeakScopeRegistry.__dict__["__call__"].__wrapped__
    assert inspect.isfunction(wrapped) and wrapped.__name__ == "__call__"
    assert (
        str(inspect.signature(greenscope.scoped_session.__call__)) == "(self, **kw: 'Any') -> '_S'"
    )
    assert "Return the current Session" in (greenscope.scoped_session.__call__.__doc__ or "")
    registry.clear()


@needs_speedups
def test_compiled_proxied_is_read_only_and_falls_back_for_a_stock_registry() -> None:
    from sqlalchemy.util import ScopedRegistry

    scoped = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    with pytest.raises(AttributeError):
        scoped._proxied = None  # type: ignore[misc]
    assert isinstance(type(scoped).__dict__["_proxied"], speedups.HotProperty)
    scoped.registry = ScopedRegistry(scoped.session_factory, greenlet.getcurrent)  # type: ignore[assignment]
    session = scoped()
    assert scoped.info is session.info and scoped() is session
    scoped.remove()


@needs_speedups
def test_subclass_of_the_registry_gets_the_compiled_hit_path() -> None:
    class Mine(WeakScopeRegistry[Value]):
        __slots__ = ("extra",)

    registry = Mine(Value)
    registry.extra = 1
    value = registry()
    assert registry() is value
    jobs = [gevent.spawn(registry) for _ in range(3)]
    gevent.joinall(jobs)
    assert len({id(job.value) for job in jobs} | {id(value)}) == 4
    registry.clear()


@needs_speedups
def test_compiled_cache_cell_joins_the_gc_and_takes_weak_references() -> None:
    fast = speedups.Fast(object(), Value())
    ref = weakref.ref(fast)
    fast.owner = fast  # a cycle through the cell itself
    del fast
    gc.collect()
    assert ref() is None
    with pytest.raises(TypeError):
        speedups.Fast(1)  # type: ignore[call-arg]


@needs_speedups
def test_greenlet_that_ends_holding_the_compiled_cell_leaves_nothing_behind() -> None:
    registry = WeakScopeRegistry(Value)
    refs: List[Any] = []
    closes.clear()

    def work() -> None:
        registry()
        refs.append(weakref.ref(greenlet.getcurrent()))

    for _ in range(50):
        glet = greenlet.greenlet(work)
        glet.switch()
        del glet
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(registry) == 0
    registry()  # closes the parked values
    assert len(closes) == 50
    registry.clear()


@needs_speedups
def test_setup_refuses_a_class_without_the_slot() -> None:
    class NoSlot:
        _hot_var = None

    with pytest.raises(TypeError, match="__slots__ member"):
        speedups.setup(NoSlot, greenlet.getcurrent, lambda: None, lambda loop: None)
    with pytest.raises(TypeError, match="kind 0, 1 or 2"):
        speedups.HotCall(print, 7)
