"""The FastAPI app of ``doctor_fastapi_def_endpoint`` with greenscope.asgi.ScopeMiddleware."""

from __future__ import annotations

from doctor_fastapi_def_endpoint import Session, app, engine

from greenscope.asgi import ScopeMiddleware

app.add_middleware(ScopeMiddleware)

__all__ = ["Session", "app", "engine"]
