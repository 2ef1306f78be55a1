"""A griffe extension for the API reference (mkdocs.yml, mkdocstrings' ``extensions:``).

The docstrings use Sphinx roles (:class:`~amqprpc.client.rpc.RpcClient`, :meth:`call`), which
Markdown would show as stray colons. They become inline code: ``~`` keeps the last dotted part,
as Sphinx does, and methods and functions get ``()``. Not cross-reference links: a target
that the site does not render (a private module) would fail ``mkdocs build --strict``.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(class|meth|func|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    role, tilde, target = match.group(1), match.group(2), match.group(3)
    if "<" in target and target.endswith(">"):  # :class:`title <target>`
        target = target[:target.index("<")].strip()
    elif tilde:
        target = target.rsplit(".", 1)[-1]
    if role in ("meth", "func") and not target.endswith(")"):
        target += "()"
    return f"`{target}`"


def plain_roles(text: str) -> str:
    """``text`` with every Sphinx role written as inline code."""
    return ROLE.sub(_code, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
