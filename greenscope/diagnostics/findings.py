"""What the doctor reports: a :class:`Finding` per thing it looked at, a :class:`Report` of them.

The levels mean one thing each: ``UNSAFE`` names a failure that can happen with this
configuration (the exit code is 1), ``WARNING`` one that needs a look (a fix exists, but the
failure depends on what the code does), ``OK`` a configuration that is right. Every UNSAFE and
WARNING carries its fix in one line.

:class:`Context` is what every check is given: how the app was imported relative to gevent's
patching, the object the doctor loaded, and which modules loading it imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional

__all__ = ["MODES", "OK", "UNSAFE", "WARNING", "Context", "Finding", "Report"]

OK = "OK"
WARNING = "WARNING"
UNSAFE = "UNSAFE"

#: How the app was imported relative to ``gevent.monkey.patch_all()``.
MODES: Dict[str, str] = {
    "as-is": "imported as is; the doctor patched nothing (a threaded server, or the app's own "
    "monkey.patch_all())",
    "patch": "gevent.monkey.patch_all() ran before the app was imported (gunicorn -k gevent "
    "without --preload)",
    "preload": "the app was imported first, then gevent.monkey.patch_all() ran (gunicorn -k "
    "gevent --preload: the master imports the app, each worker patches after fork)",
}


@dataclass(frozen=True)
class Finding:
    """One line of the doctor's report: a level (OK, WARNING, UNSAFE), a subject, why, and a fix.

    Example::

        >>> print(Finding("OK", "gevent", "not imported").format())
        OK       gevent: not imported
    """

    level: str
    subject: str
    message: str
    fix: Optional[str] = None

    def format(self) -> str:
        """The finding as report lines: ``LEVEL    subject: message`` and an indented fix."""
        text = f"{self.level:<8} {self.subject}: {self.message}"
        if self.fix:
            text += f"\n         fix: {self.fix}"
        return text


@dataclass
class Report:
    """Everything the doctor found, its verdict and the process exit code.

    Example::

        >>> report = Report("as-is", [Finding("WARNING", "x", "y")])
        >>> report.verdict, report.exit_code
        ('WARNING', 0)
    """

    mode: str
    findings: List[Finding] = field(default_factory=list)
    target: Optional[str] = None

    def count(self, level: str) -> int:
        """How many findings have ``level``."""
        return sum(1 for finding in self.findings if finding.level == level)

    @property
    def verdict(self) -> str:
        """UNSAFE if anything is unsafe, else WARNING if anything needs a look, else OK."""
        if self.count(UNSAFE):
            return UNSAFE
        if self.count(WARNING):
            return WARNING
        return OK

    @property
    def exit_code(self) -> int:
        """1 when the verdict is UNSAFE, else 0 (warnings do not fail a CI job)."""
        return 1 if self.verdict == UNSAFE else 0

    def format(self) -> str:
        """The whole report as text, ending with the verdict line."""
        lines = [f"greenscope doctor: {self.target or '(no app given)'}"]
        lines.append(f"mode: {self.mode}: {MODES.get(self.mode, '')}")
        lines.extend(finding.format() for finding in self.findings)
        lines.append(
            f"verdict: {self.verdict} ({self.count(UNSAFE)} unsafe, {self.count(WARNING)} "
            f"warning(s), {self.count(OK)} ok)"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class Context:
    """What every check is given.

    :param mode: ``as-is``, ``patch`` or ``preload`` (see :data:`MODES`).
    :param app: the object :func:`~greenscope.diagnostics.load_app` returned (None: no app given).
    :param app_modules: the modules that importing the app added to ``sys.modules``; None when
        unknown (``check()`` called from Python), and then every imported module counts.

    Example::

        >>> import sys
        >>> Context("as-is", app_modules=frozenset()).app_imported("sys")
        False
        >>> Context("as-is").app_imported("sys")
        True
    """

    mode: str = "as-is"
    app: Any = None
    app_modules: Optional[FrozenSet[str]] = None

    def app_imported(self, module: str) -> bool:
        """Is ``module`` imported, and (when known) did importing the app import it?

        The doctor imports no driver itself, but other tools in the same process might: a driver
        counts only when the app brought it in (or, see the driver checks, an engine uses it).
        """
        if module not in sys.modules:
            return False
        return self.app_modules is None or module in self.app_modules
