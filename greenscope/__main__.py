"""``python -m greenscope``: the command line. One command today: ``doctor``.

``python -m greenscope doctor [--patch | --preload] [module:app]`` imports the app the way
gunicorn would and reports unsafe session scoping; see :mod:`greenscope.diagnostics`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = "usage: python -m greenscope doctor [--patch | --preload] [module:app]  (--help for more)"


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; return its exit code."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] != "doctor":
        print(f"greenscope: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from .diagnostics import main as doctor

    return doctor(args[1:])


if __name__ == "__main__":
    sys.exit(main())
