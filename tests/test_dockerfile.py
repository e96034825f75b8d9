"""The Dockerfile: what can be checked without a container engine.

The instructions are parsed (pinned base image, non-root user, healthcheck, the gunicorn command
line), then the image's own ``CMD`` is started with this virtualenv's gunicorn on a free loopback
port, with ``DATABASE_URL`` pointing at the test PostgreSQL, and the ``HEALTHCHECK`` command is
run against it, as Docker would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result: List[Tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends with a continuation line"
    return result


def one(name: str) -> str:
    found = [args for word, args in instructions() if word == name]
    assert len(found) == 1, f"expected exactly one {name}, found {found}"
    return found[0]


def exec_form(args: str) -> List[str]:
    """The JSON (exec) form of CMD/HEALTHCHECK CMD: no shell between Docker and the process."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def env_of_image() -> Dict[str, str]:
    env: Dict[str, str] = {}
    for word, args in instructions():
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_base_image_is_pinned_to_a_patch_release() -> None:
    (base,) = [args for word, args in instructions() if word == "FROM"]
    image = base.split()[0]
    name, _, tag = image.partition(":")
    assert name == "python"
    assert re.fullmatch(r"\d+\.\d+\.\d+-slim-[a-z]+", tag), f"not a pinned tag: {image}"


def test_server_runs_as_a_non_root_user() -> None:
    words = [word for word, _ in instructions()]
    user = one("USER")
    assert user.split(":")[0] not in ("root", "0")
    # the switch happens before the command runs, and nothing switches back
    assert words.index("USER") < words.index("CMD")


def test_healthcheck_probes_the_app_over_http() -> None:
    args = one("HEALTHCHECK")
    assert "--interval=" in args and "--timeout=" in args
    command = exec_form(args.split("CMD", 1)[1].strip())
    assert command[0] == "python" and "http://127.0.0.1:8000/" in command[-1]


def test_command_is_gunicorn_gevent_with_greenscope_config() -> None:
    cmd = exec_form(one("CMD"))
    assert cmd[0] == "gunicorn"
    assert cmd[cmd.index("-k") + 1] == "gevent"
    assert cmd[cmd.index("-c") + 1] == "python:greenscope.gunicorn"
    assert cmd[cmd.index("--bind") + 1] == "0.0.0.0:8000"
    assert cmd[-1] == "app:app" and cmd[cmd.index("--pythonpath") + 1] == "examples"
    assert (ROOT / "examples" / "app.py").is_file()


def test_image_command_line_serves_the_example_and_passes_its_healthcheck(
    pg_url: str, pg_table: str
) -> None:
    port = free_port()
    cmd = exec_form(one("CMD"))
    cmd[cmd.index("--bind") + 1] = f"127.0.0.1:{port}"  # loopback only, a free port
    cmd[0:1] = [str(Path(sys.executable).with_name("gunicorn"))]
    health = exec_form(one("HEALTHCHECK").split("CMD", 1)[1].strip())
    health[0] = sys.executable
    health[-1] = health[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")

    env = dict(os.environ)
    env.update(env_of_image())
    env.update(
        DATABASE_URL=pg_url,
        GREENSCOPE_DEMO_TABLE=pg_table,  # the app's schema; created and dropped by the fixture
        PYTHONPATH=str(ROOT),
    )
    server = subprocess.Popen(
        cmd,
        cwd=str(ROOT),  # the image's WORKDIR holds greenscope/ and examples/, as the repo does
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        healthy = None
        for _ in range(60):  # bounded: at most ~30 s for the master and workers to start
            probe = subprocess.run(health, capture_output=True, text=True, timeout=10)
            if probe.returncode == 0:
                healthy = probe
                break
            assert server.poll() is None, "gunicorn exited before it became healthy"
            time.sleep(0.5)
        assert healthy is not None, "the HEALTHCHECK command never succeeded"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
            stats = json.load(response)
        assert stats["database"] == "postgresql" and stats["mode"] == "greenscope"
        assert stats["psycopg2_wait_callback"] == "psycogreen.gevent.gevent_wait_callback"
        assert stats["pool_lock"] != "_thread.RLock"  # rebuilt after gevent patched
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/query", timeout=10) as response:
            query = json.load(response)
        assert query["rows"] >= 1 and "error" not in query
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            output, _ = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            output, _ = server.communicate()
        except ProcessLookupError:
            output, _ = server.communicate()
    text = output.decode(errors="replace")
    assert "Booting worker" in text, text[-2000:]
    if "Traceback" in text:
        pytest.fail(f"gunicorn logged a traceback:\n{text[-4000:]}")
