"""MkDocs hooks for the documentation site (mkdocs.yml ``hooks:``).

- The pages' code fences carry what tests/test_readme.py needs after the language: ``sh daemon``
  (a long-running command), ``<language> norun: <reason>`` (not run by the suite) or
  ``<language> warns: <reason>`` (run, but the shop is expected to log a warning). Markdown's
  fenced code takes only a language there, so the rest is cut before the page is rendered; the
  test reads the source, where it stays.
- ``<!-- include: path/README.md -->`` on a line of its own is replaced by that file of the
  repository (its first heading dropped, the others one level down), so that the READMEs beside
  the Supervisor and systemd files are pages of the site without a second copy to keep in step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FENCE_OPTIONS = re.compile(r"^(```[\w+-]+)[ \t]+(?:daemon|norun:.*|warns:.*)$", re.MULTILINE)
INCLUDE = re.compile(r"^<!-- include: ([\w./@-]+) -->$", re.MULTILINE)


def included(match: re.Match[str]) -> str:
    lines = (ROOT / match.group(1)).read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    fenced = False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            lines[number] = "#" + line
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return FENCE_OPTIONS.sub(r"\1", INCLUDE.sub(included, markdown))
