"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

Full jitter spreads a crowd of reconnecting workers evenly over the window instead of
having them all hit a recovering broker at the same instants.
"""
from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): uniform in
    ``[0, min(cap, base * 2**attempt)]``. ``base`` and ``cap`` are in seconds."""
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 32))))
