"""MkDocs hooks for the greenscope site (``hooks:`` in mkdocs.yml).

- ``changelog.md`` is a stub: its content is the top-level ``CHANGELOG.md`` at build time, so
  the changelog has one source.
- ``api.md`` documents one module per ``## `module` `` section; a section whose module does not
  exist in this checkout is left out (modules land at different times), and the build logs it.
  The docstrings are Sphinx-flavoured (``:func:`x```, ``Example::``); in the rendered page the
  roles are dropped (the name stays in code font) and ``Example::`` reads ``Example:``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.greenscope")

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|paramref):(?=<code>)")
_SECTION = re.compile(r"^## `(?P<module>[\w.]+)`\s*$", re.MULTILINE)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    source = page.file.src_uri
    if source == "changelog.md":
        changelog = Path(config["config_file_path"]).parent / "CHANGELOG.md"
        return changelog.read_text(encoding="utf-8")
    if source == "api.md":
        parts = _SECTION.split(markdown)
        kept = [parts[0]]
        for module, body in zip(parts[1::2], parts[2::2]):
            if _module_exists(module):
                kept.append(f"## `{module}`\n{body}")
            else:
                log.info("api.md: %s does not exist in this checkout; left out", module)
        return "".join(kept)
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "api.md":
        return html
    return _ROLE.sub("", html).replace("<p>Example::</p>", "<p>Example:</p>")
