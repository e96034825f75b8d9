"""Flask-SQLAlchemy's own test suite, run on ``greenscope.flask.SQLAlchemy`` beside the stock suite.

For each supported release (the newest of each minor series in ``pyproject.toml``'s ``flask``
extra), the test suite is taken from the release's sdist on PyPI, fetched at test time with pip
into the pytest cache (``.pytest_cache/d/flask-sqlalchemy-suites/``; nothing of it is
committed), and run twice in subprocesses, each against that very release (installed with
``pip install --no-deps --target`` and put first on ``PYTHONPATH``; Flask and SQLAlchemy are
the venv's):

- ``stock``: the suite as released;
- ``greenscope``: a copy, made afresh in the test's ``tmp_path``, whose every
  ``from flask_sqlalchemy import SQLAlchemy`` (the one way the suite, ``conftest.py`` fixtures
  included, constructs the extension) is ``from greenscope.flask import SQLAlchemy``.

The two JUnit XML reports are compared test id by test id: the test fails if any test that
passes stock fails, errors, is skipped or is missing swapped. Tests that fail even stock (154 of
3.1.1's on SQLAlchemy 2.1.9, all with a ``MappedAsDataclass`` base: Flask-SQLAlchemy's own
incompatibility) are compared, not fixed. With ``CI`` set, a download that fails is a failure,
never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: the newest release of each supported minor series
RELEASES = ("3.0.5", "3.1.1")
STOCK_IMPORT = "from flask_sqlalchemy import SQLAlchemy"
SWAPPED_IMPORT = "from greenscope.flask import SQLAlchemy"


class Release(NamedTuple):
    version: str
    site: Path  # the release installed, alone (``pip install --no-deps --target``)
    stock: Path  # its sdist's tests/ and pyproject.toml (pytest configuration)


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(cwd),
    )
    if proc.returncode != 0:
        message = f"pip {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {message}", pytrace=False)
        pytest.skip(message)


def _extract_suite(sdist: Path, version: str, into: Path) -> None:
    """Copy the sdist's ``tests/`` and ``pyproject.toml`` (regular files only) into ``into``."""
    prefix = f"flask_sqlalchemy-{version}/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            wanted = name == "pyproject.toml" or name.startswith("tests/")
            if not (wanted and member.isfile()) or ".." in Path(name).parts:
                continue
            source = tar.extractfile(member)
            assert source is not None
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    assert (into / "tests" / "conftest.py").is_file(), f"{sdist.name} has no tests/conftest.py"


def swap_imports(stock: Path, swapped: Path) -> None:
    """Write the copy of the suite that constructs ``greenscope.flask.SQLAlchemy``."""
    swaps = 0
    for path in sorted(stock.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        target = swapped / path.relative_to(stock)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".py":
            text, count = re.subn(
                rf"^{re.escape(STOCK_IMPORT)}$", SWAPPED_IMPORT, text, flags=re.MULTILINE
            )
            swaps += count
        target.write_text(text, encoding="utf-8")
    files = [p for p in stock.rglob("*.py") if STOCK_IMPORT in p.read_text("utf-8")]
    assert swaps == len(files) > 0, f"swapped {swaps} imports in {len(files)} files"
    leftover = [
        str(p) for p in swapped.rglob("*.py") if "flask_sqlalchemy import SQLA" in p.read_text()
    ]
    assert not leftover, f"the suite still constructs flask_sqlalchemy.SQLAlchemy: {leftover}"


def fetch(version: str, cache: Path) -> Release:
    """The release installed and its suite as released: from PyPI, once (then cached)."""
    root = cache / version
    release = Release(version, root / "site", root / "stock")
    if (root / "ready").is_file():
        return release
    for part in (root / "dist", *release[1:]):
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    requirement = f"flask-sqlalchemy=={version}"
    _pip("download", "--no-binary", ":all:", "--no-deps", "-d", "dist", requirement, cwd=root)
    _pip("install", "--no-deps", "--no-compile", "--target", "site", requirement, cwd=root)
    (sdist,) = (root / "dist").glob("*.tar.gz")
    _extract_suite(sdist, version, release.stock)
    (root / "ready").write_text(version)
    return release


def _env(release: Release) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(release.site)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the cached suite stays as released
    return env


def _check_installed(release: Release) -> None:
    """The subprocesses import this release, from its own directory."""
    code = (
        "import importlib.metadata, flask_sqlalchemy;"
        "print(importlib.metadata.version('flask-sqlalchemy'), flask_sqlalchemy.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(release),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out[0] == release.version and Path(out[1]).is_relative_to(release.site), out


Outcomes = Dict[str, str]


def outcomes(report: Path) -> Outcomes:
    """Test id -> ``passed``, ``failed``, ``error`` or ``skipped``, from a JUnit XML report."""
    result: Outcomes = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            tag = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if tag and rank[tag] > rank[outcome]:
                outcome = tag
        # a teardown error is reported as a second testcase with the same id: keep the worst
        if rank[outcome] >= rank[result.get(test_id, "passed")]:
            result[test_id] = outcome
    return result


def added_failures(stock: Outcomes, swapped: Outcomes) -> List[str]:
    """Tests that pass stock but do not pass swapped (missing from the swapped run included)."""
    return sorted(
        f"{test_id}: {swapped.get(test_id, 'missing')}"
        for test_id, outcome in stock.items()
        if outcome == "passed" and swapped.get(test_id) != "passed"
    )


def _summary(outcome: Outcomes) -> str:
    counts: Dict[str, int] = {}
    for value in outcome.values():
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(
        f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped") if k in counts
    )


class Run(NamedTuple):
    outcomes: Outcomes
    log: str  # the terminal output: one line per failure (``--tb=line``) and the summary


def run_suites(release: Release, workdir: Path) -> Tuple[Run, Run, float]:
    """Run the stock and the swapped suite side by side; return both runs and the time taken."""
    _check_installed(release)
    swapped = workdir / "swapped"
    swap_imports(release.stock, swapped)
    started = time.monotonic()
    procs = []
    for name, suite in (("stock", release.stock), ("greenscope", swapped)):
        report = workdir / f"{name}.xml"
        log = (workdir / f"{name}.log").open("w")
        # --tb=line: full tracebacks of the ~150 known failures cost 4x the run's CPU time
        command = [sys.executable, "-m", "pytest", "-q", "--tb=line", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(suite), f"--junitxml={report}", "tests"]
        proc = subprocess.Popen(
            command, cwd=str(suite), env=_env(release), stdout=log, stderr=subprocess.STDOUT
        )
        procs.append((proc, report, log))
    runs = []
    for proc, report, log in procs:
        try:
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        text = Path(log.name).read_text()
        # 0: all passed, 1: some failed; anything else (usage, internal error, nothing collected)
        assert code in (0, 1), f"pytest exited {code}:\n{text[-4000:]}"
        runs.append(Run(outcomes(report), text))
    return runs[0], runs[1], time.monotonic() - started


@pytest.fixture(scope="module")
def suite_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return tmp_path_factory.mktemp("flask-sqlalchemy-suites")
    return Path(cache.mkdir("flask-sqlalchemy-suites"))


@pytest.mark.parametrize("version", RELEASES)
def test_flask_sqlalchemy_suite_adds_no_failure_on_greenscope(
    version: str,
    suite_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release = fetch(version, suite_cache)
    stock, swapped, seconds = run_suites(release, tmp_path)
    added = added_failures(stock.outcomes, swapped.outcomes)
    fixed = [t for t, o in swapped.outcomes.items() if o == "passed" != stock.outcomes.get(t)]
    with capsys.disabled():
        print(
            f"\nFlask-SQLAlchemy {version} suite ({seconds:.1f} s): "
            f"stock {_summary(stock.outcomes)}; greenscope {_summary(swapped.outcomes)}; "
            f"added failures {len(added)}; passing only on greenscope {len(fixed)}"
        )
    assert sum(o == "passed" for o in stock.outcomes.values()) >= 100, stock.log[-4000:]
    assert set(swapped.outcomes) == set(stock.outcomes), set(swapped.outcomes) ^ set(stock.outcomes)
    names = [test_id.split("::", 1)[1].split(":", 1)[0] for test_id in added]
    details = [line for line in swapped.log.splitlines() if any(n in line for n in names)]
    assert added == [], "\n".join([*added, "--- on greenscope:", *details])


def test_added_failures_counts_every_test_that_stops_passing() -> None:
    stock = {"a": "passed", "b": "failed", "c": "passed", "d": "passed"}
    swapped = {"a": "passed", "b": "passed", "c": "error", "e": "passed"}
    assert added_failures(stock, swapped) == ["c: error", "d: missing"]


def test_outcomes_keeps_the_worst_report_of_a_test(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_x" name="test_ok"/>'
        '<testcase classname="tests.test_x" name="test_teardown"/>'
        '<testcase classname="tests.test_x" name="test_teardown"><error message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_skip"><skipped message="no"/></testcase>'
        '<testcase classname="tests.test_x" name="test_bad"><failure message="no"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert outcomes(report) == {
        "tests.test_x::test_ok": "passed",
        "tests.test_x::test_teardown": "error",
        "tests.test_x::test_skip": "skipped",
        "tests.test_x::test_bad": "failed",
    }


def test_supported_range_in_pyproject_is_what_the_suite_runs() -> None:
    """The ``flask`` extra's bounds: from the oldest release run here to the next minor series."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text("utf-8")
    (spec,) = re.findall(r'"flask-sqlalchemy>=([\d.]+),<([\d.]+)"', text)

    def key(version: str) -> Tuple[int, ...]:
        return tuple(map(int, version.split(".")))

    major, minor = key(max(RELEASES, key=key))[:2]
    assert spec == (min(RELEASES, key=key), f"{major}.{minor + 1}")
    series = {v.rsplit(".", 1)[0] for v in RELEASES}
    assert len(series) == len(RELEASES)  # one release per minor series: the newest of each
