"""The WSGI callable every fixture exposes as ``app`` (the doctor only imports it)."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
