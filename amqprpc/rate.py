"""A rate such as ``"20/s"`` (``/s``, ``/m``, ``/h``): how ``rate_limit=`` is written and read.

Parsed where the handler is registered (a typo fails at import, not on the first message);
enforced by :mod:`amqprpc.middleware.ratelimit`.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_FORM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")


class Rate(NamedTuple):
    """``runs`` per ``period`` seconds; ``text`` as written."""

    runs: float
    period: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds between two runs at a steady pace (the GCRA's emission interval)."""
        return self.period / self.runs


def parse_rate(text: str) -> Rate:
    """``"20/s"`` -> Rate(20, 1.0); ValueError for anything else (zero included)."""
    match = _FORM.match(text) if isinstance(text, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"rate_limit must read like '20/s', '100/m' or '5/h' (a count > 0), not {text!r}")
    return Rate(float(match.group(1)), _PERIODS[match.group(2)], text.strip())
