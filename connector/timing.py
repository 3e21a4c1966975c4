"""Phase timings of a run, logged at INFO (`winback -v sync run`): where the time and memory go."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("winback.timing")


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MB, where the platform tells it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS


class PhaseClock:
    """Logs how long each phase of one sync's run took and the peak memory after it."""

    def __init__(self, sync: str):
        self.sync = sync
        self._last = time.monotonic()

    def done(self, phase: str, detail: str = "") -> None:
        now = time.monotonic()
        if log.isEnabledFor(logging.INFO):
            peak = peak_rss_mb()
            memory = f", peak memory {peak:.0f} MB" if peak is not None else ""
            suffix = f" ({detail})" if detail else ""
            log.info("%s: %s%s in %.2f s%s", self.sync, phase, suffix, now - self._last, memory)
        self._last = now
