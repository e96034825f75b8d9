"""``make dist-check``: the packages a release would ship, built and checked as a user gets them.

    python .ci/dist_check.py                 # build into a temporary directory, check, remove
    python .ci/dist_check.py --outdir dist   # keep the checked files (the release workflow)

1. ``python -m build``: the sdist, then the wheel built *from the unpacked sdist* in an isolated
   environment (build's default), so the sdist is proven to build a wheel on its own and nothing
   in the checkout (``build/``, a stale ``.so``, ``*.egg-info``) can reach the wheel.
2. ``twine check --strict`` on both; every classifier is a known trove classifier (PyPI rejects
   an upload with an unknown one, after the tag is pushed).
3. Contents against an allow-list: the wheel is ``py3-none-any`` and holds exactly the tracked
   files of ``greenscope/`` plus its ``.dist-info``; the sdist holds exactly those, the
   metadata files setuptools writes, ``pyproject.toml``, ``MANIFEST.in``, ``README.md``,
   ``LICENSE`` and ``CHANGELOG.md``. No tests: they need PostgreSQL, gunicorn, the examples,
   the docs and the benchmarks, i.e. the repository itself (``MANIFEST.in`` prunes them).
4. A fresh virtualenv installs the wheel (dependencies from the index), and a smoke run outside
   the checkout imports greenscope from that install and uses a ``scoped_session`` on SQLite.
"""

from __future__ import annotations

import argparse
import email.parser
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from pathlib import Path
from typing import List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent

SDIST_EXTRA = {
    "PKG-INFO",
    "setup.cfg",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "MANIFEST.in",
    "greenscope.egg-info/PKG-INFO",
    "greenscope.egg-info/SOURCES.txt",
    "greenscope.egg-info/dependency_links.txt",
    "greenscope.egg-info/requires.txt",
    "greenscope.egg-info/top_level.txt",
}
WHEEL_DIST_INFO = {"METADATA", "WHEEL", "RECORD", "top_level.txt", "licenses/LICENSE"}

SMOKE = """
import sys
from pathlib import Path

import greenscope
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

where = Path(greenscope.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, f"imported from {where}, not the install"
assert (where.parent / "py.typed").exists(), "py.typed is missing from the install"
Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))
assert Session.execute(text("select 1")).scalar() == 1
outer = Session()
assert Session() is outer
with greenscope.scope():
    assert Session() is not outer
assert Session() is outer
Session.remove()
print("smoke: a scoped_session on SQLite works, greenscope from", where.parent)
"""


def run(command: List[str], cwd: Optional[Path] = None, quiet: bool = False) -> None:
    """Run a command; ``quiet`` keeps its output unless it fails."""
    print("+", " ".join(command), flush=True)
    proc = subprocess.run(
        command, cwd=str(cwd or ROOT), capture_output=quiet, text=True, check=False
    )
    if proc.returncode != 0:
        if quiet:
            print(proc.stdout[-8000:], proc.stderr[-8000:], sep="\n")
        raise SystemExit(f"dist-check: failed ({proc.returncode}): {' '.join(command)}")


def tracked_package_files() -> Set[str]:
    proc = subprocess.run(
        ["git", "ls-files", "greenscope"], cwd=str(ROOT), capture_output=True, text=True, check=True
    )
    return set(proc.stdout.split())


def compare(what: str, got: Set[str], expected: Set[str]) -> List[str]:
    problems = [f"{what}: unexpected {name}" for name in sorted(got - expected)]
    problems += [f"{what}: missing {name}" for name in sorted(expected - got)]
    return problems


def check_contents(sdist: Path, wheel: Path, version: str) -> List[str]:
    package = tracked_package_files()
    problems = []
    if not wheel.name.endswith(f"-{version}-py3-none-any.whl"):
        problems.append(f"the wheel is not py3-none-any: {wheel.name}")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"greenscope-{version}.dist-info/METADATA").decode()
        wheel_info = archive.read(f"greenscope-{version}.dist-info/WHEEL").decode()
    dist_info = {f"greenscope-{version}.dist-info/{name}" for name in WHEEL_DIST_INFO}
    problems += compare("wheel", names, package | dist_info)
    if "Root-Is-Purelib: true" not in wheel_info:
        problems.append("the wheel is not purelib")
    with tarfile.open(sdist) as archive:
        prefix = f"greenscope-{version}/"
        members = {m.name[len(prefix) :] for m in archive.getmembers() if not m.isdir()}
    problems += compare("sdist", members, package | SDIST_EXTRA)
    fields = email.parser.Parser().parsestr(metadata)
    if fields["License-Expression"] != "MIT":
        problems.append(f"License-Expression is {fields['License-Expression']!r}, not 'MIT'")
    classifiers = fields.get_all("Classifier") or []
    try:
        from trove_classifiers import classifiers as known
    except ImportError:  # pragma: no cover - the dev extra installs it
        problems.append("trove-classifiers is not installed: cannot check the classifiers")
    else:
        problems += [f"unknown classifier {c!r}" for c in classifiers if c not in known]
    if any(c.startswith("License ::") for c in classifiers):
        problems.append("a License classifier next to License-Expression (PEP 639 forbids it)")
    return problems


def smoke(wheel: Path, work: Path) -> None:
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", str(wheel)])
    script = work / "smoke.py"
    script.write_text(textwrap.dedent(SMOKE), encoding="utf-8")
    run([python, "-I", str(script)], cwd=work)  # -I and cwd: the checkout is not on sys.path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--outdir", type=Path, help="keep the checked sdist and wheel here")
    parser.add_argument("--tag", help="fail unless this git tag is v<version>")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="greenscope-dist-"))
    try:
        dist = work / "dist"
        run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], quiet=True)
        sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
        if len(sdists) != 1 or len(wheels) != 1:
            print(f"expected one sdist and one wheel, got {sdists + wheels}")
            return 1
        sdist, wheel = sdists[0], wheels[0]
        version = sdist.name[len("greenscope-") : -len(".tar.gz")]
        run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)])
        problems = check_contents(sdist, wheel, version)
        if args.tag is not None and args.tag != f"v{version}":
            problems.append(f"tag {args.tag} does not match the version: expected v{version}")
        for problem in problems:
            print("dist-check:", problem)
        if problems:
            return 1
        print(f"dist-check: {sdist.name} and {wheel.name} hold exactly the expected files")
        smoke(wheel, work)
        if args.outdir is not None:
            args.outdir.mkdir(parents=True, exist_ok=True)
            for path in (sdist, wheel):
                shutil.copy2(path, args.outdir / path.name)
        print("dist-check: passed")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
