"""FastAPI with a ``def`` endpoint using a greenscope session, no greenscope.asgi.ScopeMiddleware.

FastAPI runs ``def`` endpoints in anyio's worker threads, reused from request to request: the
session belongs to the thread, so requests share it.
"""

from __future__ import annotations

from typing import Dict

from fastapi import FastAPI
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import greenscope

engine = create_engine("sqlite://")
Session = greenscope.scoped_session(sessionmaker(engine))
app = FastAPI()


@app.get("/session")
def which_session() -> Dict[str, object]:
    inherited = Session.registry.has()
    return {"session": id(Session()), "inherited": inherited}


@app.get("/ping")
async def ping() -> Dict[str, str]:
    return {"ping": "pong"}


__all__ = ["Session", "app", "engine"]
