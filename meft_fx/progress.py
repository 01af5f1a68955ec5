"""Timed progress lines on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """Prints timed progress lines to stderr when enabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[meft_fx {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
