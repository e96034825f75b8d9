"""The documentation is tested: its code samples run, its site builds, its promises hold.

Code samples: every ```` ```python ```` block of ``docs/**/*.md`` and ``README.md`` runs. A
page's blocks run in order in one fresh interpreter (a page is one story: later blocks use names
defined earlier), each block compiled under its page and line so a failure points at the sample.
The one way to exempt a block is an HTML comment on the line right before its fence::

    <!-- no-test -->
    ```python
    ...
    ```

Use it sparingly, for fragments that cannot run on their own (and say why next to them). Other
languages (``sh``, ``text``, ``dockerfile``) are never run. Warnings are errors in the samples
(``python -W error``), as they are in the test suite.

Also here: the module docstrings' doctests (``pytest --doctest-modules greenscope``), the
``mkdocs build --strict`` of the site, and a check that the troubleshooting page quotes every
error message greenscope raises.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, NamedTuple

import pytest
from conftest import PG_URL, ROOT

DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the first line of code
    language: str
    skipped: bool
    code: str


def code_blocks(path: Path) -> List[Block]:
    """Every fenced code block of a Markdown file, with its language and whether it is exempt."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = opening["info"].strip().split(" ")[0].lower() if opening["info"] else ""
        previous = lines[i - 1].strip() if i else ""
        body: List[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: unclosed code fence"
        blocks.append(Block(path, i + 2, language, previous == NO_TEST, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def pages() -> List[Path]:
    found = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    return [*found, readme] if readme.exists() else found


RUNNER = textwrap.dedent(
    """
    import json, sys
    blocks = json.loads(sys.stdin.read())
    namespace = {"__name__": "__main__"}
    for block in blocks:
        source = "\\n" * (block["line"] - 1) + block["code"]
        exec(compile(source, block["path"], "exec"), namespace)
    print("docs-page-ok", len(blocks))
    """
)


def runnable(path: Path) -> List[Block]:
    return [b for b in code_blocks(path) if b.language in ("python", "py") and not b.skipped]


@pytest.mark.parametrize(
    "page", [p for p in pages() if runnable(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_code_samples_on_page_run_in_order(page: Path, tmp_path: Path) -> None:
    blocks = runnable(page)
    payload = [
        {"path": str(b.path.relative_to(ROOT)), "line": b.line, "code": b.code} for b in blocks
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["GREENSCOPE_PG_URL"] = PG_URL
    env.pop("GREENSCOPE_TRACE", None)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),  # samples that write files write them here
        env=env,
    )
    assert proc.returncode == 0 and f"docs-page-ok {len(blocks)}" in proc.stdout, (
        f"samples of {page.relative_to(ROOT)} failed (exit {proc.returncode})\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def test_no_test_marker_is_used_sparingly() -> None:
    python_blocks = [b for p in pages() for b in code_blocks(p) if b.language == "python"]
    skipped = [f"{b.path.relative_to(ROOT)}:{b.line}" for b in python_blocks if b.skipped]
    assert len(python_blocks) >= 20, "the docs should show (and test) real code"
    assert len(skipped) <= max(2, len(python_blocks) // 10), skipped


def test_code_block_extraction_honours_the_no_test_marker(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
        "\n```sh\nmake test\n```\n\n- item\n\n    ```python\n    y = x\n    ```\n"
    )
    blocks = code_blocks(page)
    assert [(b.language, b.skipped, b.code, b.line) for b in blocks] == [
        ("python", False, "x = 1\n", 4),
        ("python", True, "raise SystemExit\n", 9),
        ("sh", False, "make test\n", 13),
        ("python", False, "y = x\n", 19),
    ]


def test_docstring_examples_pass() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--doctest-modules",
            "greenscope",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-o",
            "testpaths=",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\b(\d+) passed\b", proc.stdout), proc.stdout


def test_site_builds_without_warnings(tmp_path: Path) -> None:
    for page in ("reliability.md", "performance.md"):
        assert (DOCS / page).exists(), f"docs/{page} is in the nav and must exist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--quiet",
            "--site-dir",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("current_scope", "WeakScopeRegistry", "ScopeMiddleware", "runtime_report"):
        assert name in api, f"{name} missing from the API reference"
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    first_entry = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()[2]
    assert first_entry.lstrip("# ").strip() in changelog


def _raised_messages() -> List[str]:
    """The literal parts of every message greenscope raises (``raise X("..." or f"...")``)."""
    messages: List[str] = []
    for module in sorted((ROOT / "greenscope").rglob("*.py")):  # subpackages too
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            if node.exc.args:
                chunks = _literal_chunks(node.exc.args[0])
                messages += [c.strip() for c in chunks if len(c.strip()) >= 12]
    return messages


def _literal_chunks(node: ast.expr) -> List[str]:
    """The literal text of a str / f-string / concatenated message, placeholders left out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [
            part.value
            for part in node.values
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
        ]
    if isinstance(node, ast.BinOp):
        return _literal_chunks(node.left) + _literal_chunks(node.right)
    return []


def test_troubleshooting_quotes_every_error_greenscope_raises() -> None:
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    flat = " ".join(page.split())
    messages = _raised_messages()
    assert len(messages) >= 5
    missing = [m for m in messages if " ".join(m.split()).strip() not in flat]
    assert not missing, f"docs/troubleshooting.md does not quote: {missing}"
