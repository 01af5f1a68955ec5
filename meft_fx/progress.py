"""Timed progress lines on stderr: always, never, or (None) once the work has taken `AUTO_AFTER` seconds."""
from __future__ import annotations

import sys
import time

#: With enabled=None, lines start to show (the earlier ones first) once this many seconds have passed.
AUTO_AFTER = 2.0


class Progress:
    """Prints timed progress lines to stderr: `enabled` True (every line), False (none) or None (a
    quick job stays silent; a slow one shows every line from the first one on, once `AUTO_AFTER` s
    have passed — the lines before are kept and printed then, with their times)."""

    def __init__(self, enabled: bool | None):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._held: list = []

    def __call__(self, msg: str) -> None:
        if self.enabled is False:
            return
        line = f"[meft_fx {time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.enabled is None and time.perf_counter() - self.t0 < AUTO_AFTER:
            self._held.append(line)
            return
        for held in self._held:
            print(held, file=sys.stderr)
        self._held.clear()
        print(line, file=sys.stderr, flush=True)
