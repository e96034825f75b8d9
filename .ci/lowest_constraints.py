"""Write a pip constraints file pinning every dependency to the lowest version pyproject allows.

    python .ci/lowest_constraints.py > lowest.txt
    pip install -c lowest.txt -e '.[dev]'

Read from ``pyproject.toml`` at run time, so whatever a branch adds to ``dependencies`` or to an
extra is in the lowest run without editing this file: ``name>=X`` becomes ``name==X`` (markers
kept); a name bounded in several places takes its highest lower bound. The ``dev`` extra is left
out: it holds contributor tools (mypy, mkdocs, build...), not promises to users, and they take
the newest release that fits the pinned libraries. A requirement without a lower bound is an
error: "any version" is a promise no run can check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Tuple

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's dependency there
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_EXTRAS = {"dev"}


def lower_bound(requirement: Requirement) -> Version:
    """The lowest version a requirement admits, from its ``>=``, ``~=`` or ``==`` clause."""
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "~=", "==")]
    if not bounds:
        raise SystemExit(f"{requirement}: no lower bound (>=, ~= or ==) to pin for the lowest run")
    return max(bounds)


def lowest(pyproject: Path = ROOT / "pyproject.toml") -> List[str]:
    """``name==version[; marker]`` lines, one per dependency (extras' self-references skipped)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    name = project["name"]
    strings: List[str] = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
        if extra not in SKIPPED_EXTRAS:
            strings.extend(items)
    pins: Dict[Tuple[str, str], Version] = {}
    for text in strings:
        requirement = Requirement(text)
        if requirement.name == name:  # greenscope[gevent,...]: those extras are listed anyway
            continue
        key = (requirement.name.lower(), str(requirement.marker or ""))
        bound = lower_bound(requirement)
        pins[key] = max(pins.get(key, bound), bound)
    lines = []
    for (package, marker), version in sorted(pins.items()):
        lines.append(f"{package}=={version}" + (f"; {marker}" if marker else ""))
    return lines


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in lowest()))
