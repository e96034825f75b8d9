"""``make test-matrix``: the suite under every other supported CPython, then at the lowest deps.

    python .ci/test_matrix.py                      # 3.9 3.10 3.12 3.13, then lowest on 3.9
    python .ci/test_matrix.py --versions 3.12 --no-lowest
    python .ci/test_matrix.py --versions --lowest 3.9   # the lowest run only

Each version gets its own virtualenv (``.venv-3.9`` ...), bootstrapped by the Makefile's own
``venv`` rule (``make PYTHON=... VENV=...``, the same ``.[dev]`` install as ``.venv``) and reused
while ``pyproject.toml`` is unchanged. The lowest run (``.venv-lowest``) installs with
``PIP_CONSTRAINT`` set to the constraints ``.ci/lowest_constraints.py`` derives from
``pyproject.toml`` (every ``>=`` bound turned into ``==``), checks that pip really installed
those versions, and runs the same tests. The slow soak tests run on the main version only
(``make test``): here ``-m "not slow"``.

Interpreters come from pyenv (the newest ``$(pyenv root)/versions/X.Y.N``), else ``pythonX.Y``
on PATH. A missing one fails the run when ``CI`` is set and is skipped, loudly, otherwise.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Deque, Dict, List, Optional, Tuple

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ["3.9", "3.10", "3.12", "3.13"]
LOWEST = "3.9"
PYTEST_ARGS = '-m "not slow" -p no:cacheprovider'


def pyenv_root() -> Optional[Path]:
    pyenv = shutil.which("pyenv")
    if pyenv:
        proc = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return Path(proc.stdout.strip())
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    return root if root.is_dir() else None


def find_interpreter(version: str) -> Optional[Path]:
    """The newest pyenv CPython X.Y.N (no free-threaded or dev builds), else pythonX.Y on PATH."""
    root = pyenv_root()
    found: List[Tuple[Tuple[int, ...], Path]] = []
    if root is not None:
        for path in (root / "versions").glob(f"{version}.*"):
            match = re.fullmatch(re.escape(version) + r"\.(\d+)", path.name)
            python = path / "bin" / "python3"
            if match and python.exists():
                found.append(((int(match.group(1)),), python))
    if found:
        return max(found)[1]
    on_path = shutil.which(f"python{version}")
    return Path(on_path) if on_path else None


def run_streamed(command: List[str], env: Dict[str, str]) -> Tuple[int, str]:
    """Run a command, echoing its output, and return its exit code and the output's tail."""
    print("+", " ".join(command), flush=True)
    tail: Deque[str] = collections.deque(maxlen=50)
    with subprocess.Popen(
        command,
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
        rc = proc.wait()
    sys.stdout.flush()
    return rc, "".join(tail)


def counts(output: str) -> str:
    """pytest's closing counts (``123 passed, 2 skipped``), or ``?`` when there is none."""
    for line in reversed(output.splitlines()):
        if re.search(r"\d+ (passed|failed|error)", line) and " in " in line:
            return line.strip("= \n").rsplit(" in ", 1)[0]
    return "?"


def installed(venv: Path, names: List[str]) -> Dict[str, str]:
    code = (
        "import sys\nfrom importlib.metadata import version\n"
        "for name in sys.argv[1:]:\n    print(name, version(name))\n"
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *names],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def check_lowest_installed(venv: Path, constraints: List[str]) -> List[str]:
    """Every pinned package installed at its pinned version (a marker-excluded pin is ignored)."""
    pins = {}
    for line in constraints:
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        if marker.strip():
            continue  # markers are rare here; the pins without one are the promises checked
        pins[name] = version
    have = installed(venv, sorted(pins))
    problems = []
    for name, version in sorted(pins.items()):
        got = have.get(name, "missing")
        print(f"    {name:20} lowest {version:10} installed {got}")
        if got == "missing" or Version(got) != Version(version):
            problems.append(f"{name}: pinned {version}, installed {got}")
    return problems


def run_one(label: str, python: Path, venv: str, constraints: Optional[Path]) -> Tuple[int, str]:
    # a clean make: nothing inherited from a parent make's command line (VENV=..., -j)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    make = ["make", f"PYTHON={python}", f"VENV={venv}"]
    if constraints is not None:
        env["PIP_CONSTRAINT"] = str(constraints)
    rc, _ = run_streamed([*make, "venv"], env)
    if rc != 0:
        return rc, f"{label}: virtualenv bootstrap failed"
    rc, output = run_streamed([*make, "pytest", f"PYTEST_ARGS={PYTEST_ARGS}"], env)
    return rc, counts(output)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--versions", nargs="*", default=VERSIONS, help="X.Y, each in its venv")
    parser.add_argument("--lowest", default=LOWEST, help="X.Y of the lowest-dependency run")
    parser.add_argument("--no-lowest", action="store_true", help="skip the lowest run")
    args = parser.parse_args(argv)
    ci = bool(os.environ.get("CI"))
    rows: List[Tuple[str, str, str, str]] = []  # label, interpreter, result, seconds
    failed = False
    jobs = [(v, v, f".venv-{v}", False) for v in args.versions]
    if not args.no_lowest:
        jobs.append((f"{args.lowest} lowest", args.lowest, ".venv-lowest", True))
    for label, version, venv, lowest in jobs:
        print(f"\n=== test-matrix: CPython {label} ({venv}) ===", flush=True)
        python = find_interpreter(version)
        if python is None:
            message = f"CPython {version} not found (pyenv install {version}, or pythonX.Y on PATH)"
            if ci:
                print(f"FAIL: CI is set and {message}", flush=True)
                rows.append((label, "-", "MISSING (failure under CI)", "-"))
                failed = True
            else:
                print(f"SKIPPED: {message}", flush=True)
                rows.append((label, "-", "SKIPPED: interpreter missing", "-"))
            continue
        constraints = None
        lines: List[str] = []
        if lowest:
            sys.path.insert(0, str(ROOT / ".ci"))
            from lowest_constraints import lowest as lowest_pins

            lines = lowest_pins()
            (ROOT / venv).mkdir(exist_ok=True)
            constraints = ROOT / venv / "lowest-constraints.txt"
            constraints.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            print("lowest pins (from pyproject.toml):", ", ".join(lines), flush=True)
        started = time.monotonic()
        rc, result = run_one(label, python, venv, constraints)
        if lowest and rc == 0:
            problems = check_lowest_installed(ROOT / venv, lines)
            if problems:
                rc, result = 1, "not installed at the lowest: " + "; ".join(problems)
        seconds = f"{time.monotonic() - started:.0f}"
        failed = failed or rc != 0
        rows.append((label, str(python), result if rc == 0 else f"FAILED: {result}", seconds))
    print("\n=== test-matrix summary ===")
    for label, where, result, seconds in rows:
        print(f"  CPython {label:11} {seconds:>5} s  {result}  ({where})")
    total = {"passed": 0, "failed": 0}
    for _, _, result, _ in rows:
        for key, words in (("passed", ("passed",)), ("failed", ("failed", "error", "errors"))):
            for word in words:
                found = re.search(rf"(\d+) {word}\b", result)
                total[key] += int(found.group(1)) if found else 0
    print(f"test-matrix: {total['passed']} passed, {total['failed']} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
