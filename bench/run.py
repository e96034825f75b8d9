"""Run every greenscope benchmark, compare with the peers, save JSON + chart + table.

    make bench                                  # full run (about 5 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick       # fast pass (about 1 minute)
    .venv/bin/python bench/run.py --quick --smoke --out-dir /tmp/x   # seconds; proves it runs

Each part runs in its own fresh interpreter (``bench/micro.py``, ``bench/churn.py``,
``bench/e2e.py``): patching is process-wide, and a clean process per part keeps one part's
garbage out of the next one's timings. Within a part, candidates are interleaved round by round
(``bench/_harness.py``) and every ratio is the median of per-round ratios, with its spread.

Writes ``<out-dir>/bench-results.json`` and ``<out-dir>/bench-chart.png``; a full run into
``docs/`` also rewrites the results table in ``docs/performance.md`` (between its markers).
The end-to-end part needs PostgreSQL (``GREENSCOPE_PG_URL``); without it that part is recorded
as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._harness import ratio_between  # noqa: E402

#: (label, part, figure, candidate, baseline, comparison, target)
TARGETS: List[Tuple[str, str, str, str, str, str, Optional[float]]] = [
    (
        "registry(), main greenlet",
        "micro",
        "main.registry",
        "greenscope",
        "stock_getcurrent",
        "<=",
        None,
    ),
    (
        "registry(), gevent Greenlet",
        "micro",
        "greenlet.registry",
        "greenscope",
        "stock_getcurrent",
        "<=",
        None,
    ),
    (
        "registry(), explicit scope",
        "micro",
        "scope.registry",
        "greenscope",
        "stock_getcurrent",
        "<=",
        None,
    ),
    (
        "registry(), patched, vs gevent.local",
        "micro_patched",
        "main.registry",
        "greenscope",
        "stock_threadlocal",
        "<=",
        None,
    ),
    (
        "registry(), patched Greenlet, vs gevent.local",
        "micro_patched",
        "greenlet.registry",
        "greenscope",
        "stock_threadlocal",
        "<=",
        None,
    ),
    (
        "Session(), main greenlet",
        "micro",
        "main.session",
        "greenscope",
        "stock_getcurrent",
        "<=",
        1.0,
    ),
    (
        "Session(), gevent Greenlet",
        "micro",
        "greenlet.session",
        "greenscope",
        "stock_getcurrent",
        "<=",
        1.0,
    ),
    (
        "Session(), explicit scope",
        "micro",
        "scope.session",
        "greenscope",
        "stock_getcurrent",
        "<=",
        1.0,
    ),
    (
        "Session(), patched, vs gevent.local",
        "micro_patched",
        "main.session",
        "greenscope",
        "stock_threadlocal",
        "<=",
        0.7,
    ),
    (
        "Session.<proxied>, main greenlet",
        "micro",
        "main.proxied",
        "greenscope",
        "stock_getcurrent",
        "<=",
        1.0,
    ),
    (
        "Session.<proxied>, patched, vs gevent.local",
        "micro_patched",
        "main.proxied",
        "greenscope",
        "stock_threadlocal",
        "<=",
        0.8,
    ),
    ("registry(), in a task", "micro", "task.registry", "greenscope", "stock_task", "<=", None),
    ("AsyncSession(), in a task", "micro", "task.session", "greenscope", "stock_task", "<=", 1.0),
    (
        "AsyncSession.<proxied>, in a task",
        "micro",
        "task.proxied",
        "greenscope",
        "stock_task",
        "<=",
        1.0,
    ),
    (
        "greenlet churn, no remove() vs gevent.local + remove()",
        "churn_greenlet",
        "greenlet_churn",
        "greenscope",
        "stock_threadlocal_remove",
        ">=",
        0.8,
    ),
    (
        "greenlet churn, no remove() vs getcurrent + remove()",
        "churn_greenlet",
        "greenlet_churn",
        "greenscope",
        "stock_getcurrent_remove",
        ">=",
        0.8,
    ),
    (
        "greenlet churn, both with remove()",
        "churn_greenlet",
        "greenlet_churn",
        "greenscope_remove",
        "stock_threadlocal_remove",
        ">=",
        None,
    ),
    (
        "task churn, no remove() vs current_task + remove()",
        "churn_task",
        "task_churn",
        "greenscope",
        "stock_task_remove",
        ">=",
        0.8,
    ),
    (
        "task churn, both with remove()",
        "churn_task",
        "task_churn",
        "greenscope_remove",
        "stock_task_remove",
        ">=",
        None,
    ),
    (
        "WSGI request in process (SQLite), requests/s",
        "request",
        "requests",
        "greenscope",
        "stock",
        ">=",
        None,
    ),
    (
        "gunicorn + PG, pool per client: requests/s vs stock + remove()",
        "e2e",
        "normal.rps",
        "greenscope",
        "stock",
        ">=",
        1.0,
    ),
    (
        "gunicorn + PG, pool per client: p99 vs stock + remove()",
        "e2e",
        "normal.p99_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool per client: max latency vs stock + remove()",
        "e2e",
        "normal.max_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool per client: requests/s vs greenscope + remove()",
        "e2e",
        "normal.rps",
        "greenscope",
        "greenscope_remove",
        ">=",
        1.0,
    ),
    (
        "gunicorn + PG, pool per client: p99 vs greenscope + remove()",
        "e2e",
        "normal.p99_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool per client: max latency vs greenscope + remove()",
        "e2e",
        "normal.max_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: requests/s vs stock + remove()",
        "e2e",
        "pressure.rps",
        "greenscope",
        "stock",
        ">=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: p99 vs stock + remove()",
        "e2e",
        "pressure.p99_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: max latency vs stock + remove()",
        "e2e",
        "pressure.max_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: requests/s vs greenscope + remove()",
        "e2e",
        "pressure.rps",
        "greenscope",
        "greenscope_remove",
        ">=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: p99 vs greenscope + remove()",
        "e2e",
        "pressure.p99_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "gunicorn + PG, pool pressure: max latency vs greenscope + remove()",
        "e2e",
        "pressure.max_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: requests/s vs stock + await remove()",
        "asgi_e2e",
        "normal.rps",
        "greenscope",
        "stock",
        ">=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: p99 vs stock + await remove()",
        "asgi_e2e",
        "normal.p99_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: max latency vs stock + await remove()",
        "asgi_e2e",
        "normal.max_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: requests/s vs greenscope + remove()",
        "asgi_e2e",
        "normal.rps",
        "greenscope",
        "greenscope_remove",
        ">=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: p99 vs greenscope + remove()",
        "asgi_e2e",
        "normal.p99_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool per client: max latency vs greenscope + remove()",
        "asgi_e2e",
        "normal.max_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: requests/s vs stock + await remove()",
        "asgi_e2e",
        "pressure.rps",
        "greenscope",
        "stock",
        ">=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: p99 vs stock + await remove()",
        "asgi_e2e",
        "pressure.p99_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: max latency vs stock + await remove()",
        "asgi_e2e",
        "pressure.max_ms",
        "greenscope",
        "stock",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: requests/s vs greenscope + remove()",
        "asgi_e2e",
        "pressure.rps",
        "greenscope",
        "greenscope_remove",
        ">=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: p99 vs greenscope + remove()",
        "asgi_e2e",
        "pressure.p99_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
    (
        "uvicorn + FastAPI + PG, pool pressure: max latency vs greenscope + remove()",
        "asgi_e2e",
        "pressure.max_ms",
        "greenscope",
        "greenscope_remove",
        "<=",
        1.0,
    ),
]


def run_part(args: List[str], timeout: float) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {' '.join(args)}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return result


def postgres_reachable() -> bool:
    try:
        import psycopg2

        url = os.environ.get("GREENSCOPE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
        psycopg2.connect(url, connect_timeout=5).close()
        return True
    except Exception:
        return False


def machine() -> Dict[str, Any]:
    import gevent
    import greenlet
    import gunicorn
    import sqlalchemy

    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "sqlalchemy": sqlalchemy.__version__,
        "gevent": gevent.__version__,
        "greenlet": greenlet.__version__,
        "gunicorn": gunicorn.__version__,
        "commit": commit,
    }


def evaluate(parts: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for label, part, figure, cand, base, op, target in TARGETS:
        data = parts.get(part)
        if not data or figure not in data or cand not in data[figure]["candidates"]:
            rows.append({"label": label, "skipped": True, "target": target, "op": op})
            continue
        ratio = ratio_between(data[figure], cand, base)
        ok = None
        if target is not None:
            ok = ratio["median"] <= target if op == "<=" else ratio["median"] >= target
        rows.append(
            {
                "label": label,
                "part": part,
                "figure": figure,
                "candidate": cand,
                "baseline": base,
                "op": op,
                "target": target,
                "ratio": ratio,
                "met": ok,
                "candidate_median": data[figure]["candidates"][cand]["time"]["median"],
                "baseline_median": data[figure]["candidates"][base]["time"]["median"],
                "unit": data[figure].get("unit", ""),
            }
        )
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| figure | greenscope | baseline | ratio (median) | IQR | min-max | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "-" if row["target"] is None else f"{row['op']} {row['target']}"
        if row.get("skipped"):
            lines.append(f"| {row['label']} | skipped | | | | | {target} | |")
            continue
        r = row["ratio"]
        unit = row["unit"] or "ns/call"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(
            f"| {row['label']} | {row['candidate_median']:.4g} {unit} | "
            f"{row['baseline']}: {row['baseline_median']:.4g} | **{r['median']:.3f}** | "
            f"{r['q1']:.3f}-{r['q3']:.3f} | {r['min']:.3f}-{r['max']:.3f} | {target} | {met} |"
        )
    return "\n".join(lines)


def chart(rows: List[Dict[str, Any]], parts: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if not r.get("skipped")]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(15, 0.42 * len(shown) + 2), gridspec_kw={"width_ratios": [3, 2]}
    )
    ys = list(range(len(shown)))[::-1]
    for y, row in zip(ys, shown):
        r = row["ratio"]
        color = "tab:gray" if row["met"] is None else ("tab:green" if row["met"] else "tab:red")
        ax1.barh(y, r["median"], color=color, alpha=0.75)
        ax1.errorbar(
            r["median"],
            y,
            xerr=[[r["median"] - r["q1"]], [r["q3"] - r["median"]]],
            color="black",
            capsize=3,
        )
        ax1.plot([r["min"], r["max"]], [y, y], color="black", lw=0.6)
        if row["target"] is not None:
            ax1.plot([row["target"]] * 2, [y - 0.4, y + 0.4], color="tab:blue", lw=2)
    ax1.set_yticks(ys)
    ax1.set_yticklabels([r["label"] for r in shown], fontsize=8)
    ax1.axvline(1.0, color="black", lw=0.5, ls=":")
    ax1.set_xlabel(
        "greenscope / baseline (median of per-round ratios; bar IQR, line min-max; "
        "blue tick = target)",
        fontsize=8,
    )
    ax1.set_title(
        "Ratios against the peers (green: target met, red: not, grey: no target)", fontsize=10
    )
    # absolute ns/call for the hot lookups, every candidate
    micro = parts.get("micro") or {}
    figs = [f for f in ("main.registry", "main.session", "main.proxied") if f in micro]
    names = ["floor", "stock_threadlocal", "stock_getcurrent", "stock_id", "greenscope"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [micro[f]["candidates"][name]["time"]["median"] for f in figs]
        ax2.bar([x + i * width for x in range(len(figs))], vals, width, label=name)
    patched = parts.get("micro_patched") or {}
    if "main.registry" in patched:
        gl = patched["main.registry"]["candidates"]["stock_threadlocal"]["time"]["median"]
        ax2.axhline(gl, color="tab:red", ls="--", lw=0.8, label="gevent.local (patched registry())")
    ax2.set_xticks([x + 0.4 - width / 2 for x in range(len(figs))])
    ax2.set_xticklabels(figs, fontsize=8)
    ax2.set_ylabel("ns per call (median, unpatched)")
    ax2.set_title("Hot lookups, absolute (noisy; ratios are the figures)", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, text: str) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if not doc.exists():
        return
    content = doc.read_text()
    if begin not in content or end not in content:
        return
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and counts")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: only proves it runs")
    parser.add_argument("--out-dir", default=str(ROOT / "docs"), help="where JSON and PNG go")
    parser.add_argument("--no-e2e", action="store_true", help="skip the gunicorn + PostgreSQL part")
    opts = parser.parse_args()
    flags = (["--quick"] if opts.quick else []) + (["--smoke"] if opts.smoke else [])
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["bench/run.py", *sys.argv[1:]])
    started = time.perf_counter()
    parts: Dict[str, Any] = {}
    print("greenscope benchmarks:", command, file=sys.stderr)
    parts["micro"] = run_part(["bench/micro.py", *flags], 900)
    parts["micro_patched"] = run_part(["bench/micro.py", "--patched", *flags], 900)
    parts["churn_greenlet"] = run_part(["bench/churn.py", "greenlet", *flags], 900)
    parts["churn_task"] = run_part(["bench/churn.py", "task", *flags], 900)
    parts["request"] = run_part(["bench/request.py", *flags], 900)
    if opts.no_e2e:
        parts["e2e"] = parts["asgi_e2e"] = {"skipped": "--no-e2e"}
    elif not postgres_reachable():
        parts["e2e"] = parts["asgi_e2e"] = {"skipped": "PostgreSQL unreachable"}
    else:
        parts["e2e"] = run_part(["bench/e2e.py", *flags], 900)
        parts["asgi_e2e"] = run_part(["bench/asgi_e2e.py", *flags], 900)
    rows = evaluate(parts)
    churn = parts["churn_greenlet"]
    results = {
        "command": command,
        "mode": "smoke" if opts.smoke else ("quick" if opts.quick else "full"),
        "machine": machine(),
        "seconds": time.perf_counter() - started,
        "targets": rows,
        "memory": churn.get("memory"),
        "flat": churn.get("flat"),
        "parts": parts,
    }
    (out_dir / "bench-results.json").write_text(json.dumps(results, indent=1))
    chart(rows, parts, out_dir / "bench-chart.png")
    text = table(rows)
    mem = churn.get("memory", {}).get("candidates", {})
    flat = churn.get("flat", {})
    m = results["machine"]
    extra = [
        "",
        f"Produced by `{command}` on {m['date']}: Python {m['python']} ({m['implementation']}), "
        f"SQLAlchemy {m['sqlalchemy']}, gevent {m['gevent']}, greenlet {m['greenlet']}, "
        f"gunicorn {m['gunicorn']}; {m['cpus']} x {m['cpu']}; {m['platform']}; "
        f"commit {m['commit']}; {results['seconds']:.0f} s.",
        "",
        "Memory per live greenlet holding a session (tracemalloc, "
        f"{churn.get('memory', {}).get('live')} live greenlets, patched): "
        + ", ".join(
            f"{k} {v['per_scope']:.0f} B (+{v['over_bare']:.0f} B over a bare greenlet)"
            for k, v in mem.items()
            if k != "bare"
        )
        + f"; a bare greenlet {mem.get('bare', {}).get('per_scope', 0):.0f} B.",
        "",
        f"Flat memory: {flat.get('greenlets', 0):,} greenlets through greenscope without remove() "
        f"in {flat.get('seconds', 0):.1f} s; RSS growth after the first tenth "
        f"{flat.get('rss_growth_after_first_tenth', 0) / 1024:.0f} KiB; live entries at the end "
        f"{(flat.get('checkpoints') or [{}])[-1].get('live_entries')}; sessions closed by "
        f"greenscope {flat.get('ended_without_remove')}.",
    ]
    for part, what in (("e2e", "gunicorn gevent"), ("asgi_e2e", "uvicorn + FastAPI")):
        if "skipped" in parts[part]:
            extra.append(f"\nEnd to end ({what}): skipped ({parts[part]['skipped']}).")
            continue
        e2e = parts[part]
        for name in e2e["scenarios"]:
            rps = e2e[f"{name}.rps"]["candidates"]
            worst = e2e[f"{name}.max_ms"]["candidates"]
            timeouts = e2e.get(f"{name}.pool_timeouts", e2e.get(f"{name}.errors"))
            extra.append(
                f"\nEnd to end, {what}, {name} ({e2e[f'{name}.config']}): requests/s "
                + ", ".join(f"{m} {rps[m]['time']['median']:.0f}" for m in rps)
                + "; median per-round max latency ms "
                + ", ".join(f"{m} {worst[m]['time']['median']:.0f}" for m in worst)
                + f"; errors and pool timeouts {e2e.get(f'{name}.errors')} {timeouts}."
            )
    text += "\n" + "\n".join(extra)
    print(text)
    if not opts.smoke and out_dir.resolve() == (ROOT / "docs").resolve():
        update_doc(ROOT / "docs" / "performance.md", text)


if __name__ == "__main__":
    main()
