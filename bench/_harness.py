"""The interleaved timing harness every figure in ``bench/`` goes through.

Timings on a shared machine drift (frequency scaling, neighbours, the other engineers' test
runs), so a figure is never one absolute time. Every candidate runs once per *round*, in an order
rotated from round to round, and each candidate's time is divided by the baseline's time **of the
same round**. What we report per candidate is the median of those per-round ratios and their
spread (inter-quartile range and min-max), plus the median absolute time for orientation.

Example::

    >>> from bench._harness import compare
    >>> res = compare({"a": lambda: None, "b": lambda: None}, baseline="a", rounds=3, number=1000)
    >>> sorted(res["candidates"])
    ['a', 'b']
"""

from __future__ import annotations

import statistics
import time
import timeit
from typing import Any, Callable, Dict, List, Mapping, Optional


def quantiles(values: List[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of ``values``."""
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
    }


def summarize(times: Mapping[str, List[float]], baseline: str) -> Dict[str, Any]:
    """Per-candidate medians of absolute times and of per-round ratios to ``baseline``."""
    base = times[baseline]
    out: Dict[str, Any] = {}
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, base)]
        out[name] = {
            "time": quantiles(values),
            "ratio": quantiles(ratios),
            "rounds": len(values),
            "samples": values,  # per round, in round order: any other ratio can be derived
        }
    return out


def ratio_between(result: Mapping[str, Any], candidate: str, baseline: str) -> Dict[str, float]:
    """Per-round ratios ``candidate / baseline`` of one ``compare``/``compare_runs`` result."""
    cands = result["candidates"]
    pairs = zip(cands[candidate]["samples"], cands[baseline]["samples"])
    return quantiles([c / b for c, b in pairs])


def _loop_timer(fn: Callable[[], Any]) -> timeit.Timer:
    # The compiled statement is ``f()`` inside timeit's own ``for`` loop: every candidate pays
    # the same loop and call overhead, which is exactly what a caller of ``Session()`` pays.
    return timeit.Timer("f()", globals={"f": fn})


def compare(
    candidates: Mapping[str, Callable[[], Any]],
    baseline: str,
    rounds: int = 30,
    number: int = 20000,
    repeat: int = 3,
    unit: float = 1e9,
) -> Dict[str, Any]:
    """Time ``candidates`` (callables) interleaved; the result is in ``unit`` per call (ns).

    Each round runs every candidate ``repeat`` times ``number`` calls and keeps the fastest of
    the repeats (the least disturbed); candidates are rotated each round so none always runs
    right after the same neighbour.
    """
    names = list(candidates)
    timers = {name: _loop_timer(fn) for name, fn in candidates.items()}
    for timer in timers.values():  # warm up (specialising interpreter, caches)
        timer.timeit(min(number, 2000))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            best = min(timers[name].repeat(repeat=repeat, number=number))
            times[name].append(best / number * unit)
    return {"baseline": baseline, "unit": "ns/call", "candidates": summarize(times, baseline)}


def compare_runs(
    candidates: Mapping[str, Callable[[], float]],
    baseline: str,
    rounds: int = 7,
    higher_is_better: bool = True,
    between: Optional[Callable[[], None]] = None,
) -> Dict[str, Any]:
    """Interleave whole runs: each callable runs once per round and returns its own figure.

    Used for throughput (ops/s) where one run is already many operations. ``between`` runs
    after every candidate (e.g. ``gc.collect()``), outside the measurement.
    """
    names = list(candidates)
    values: Dict[str, List[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(candidates[name]())
            if between is not None:
                between()
    result = summarize(values, baseline)
    return {
        "baseline": baseline,
        "higher_is_better": higher_is_better,
        "candidates": result,
    }


def throughput(fn: Callable[[int], None], count: int) -> float:
    """Operations per second of ``fn(count)``."""
    start = time.perf_counter()
    fn(count)
    return count / (time.perf_counter() - start)
