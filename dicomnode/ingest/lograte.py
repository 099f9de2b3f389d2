"""Rate-limited logging for repeated lines: a flood of the same complaint becomes a few lines and a count.

A hostile or broken peer can make the node say the same thing thousands of times a second (a STOW-RS body of
5,000 unreadable parts, a stream of garbage PDUs). :class:`RepeatFilter` is a :class:`logging.Filter` that
lets through at most ``burst`` records of one message template (per logger and level) in each ``window_s``;
the rest are dropped and counted, and the first record let through in a later window says how many similar
lines were left out. Different templates never crowd each other out. Thread safe; the clock is injected.

Attach it with :func:`limit_repeats` (idempotent) to the loggers that can be flooded by a peer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RepeatFilter", "limit_repeats"]

#: Templates tracked at most; beyond it the state is reset (a flood of distinct templates is a code bug).
_MAX_KEYS = 1000


@dataclass
class _Window:
    start: float
    passed: int = 0
    dropped: int = 0


class RepeatFilter(logging.Filter):
    """Let at most ``burst`` records per message template through in each ``window_s`` seconds.

    Parameters
    ----------
    burst
        Records of one template let through per window.
    window_s
        Window length, seconds.
    clock
        Monotonic seconds (tests pass a fake clock).
    """

    def __init__(
        self, burst: int = 10, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w.start >= self.window_s:
                dropped = w.dropped if w is not None else 0
                if len(self._windows) >= _MAX_KEYS:
                    self._windows.clear()
                w = self._windows[key] = _Window(now)
            else:
                dropped = 0
            if w.passed >= self.burst:
                w.dropped += 1
                return False
            w.passed += 1
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar lines left out in the previous window)"
            record.args = None
        return True


def limit_repeats(logger: logging.Logger, burst: int = 10, window_s: float = 60.0) -> RepeatFilter:
    """Attach a :class:`RepeatFilter` to ``logger`` unless it has one already; returns the one in place."""
    for f in logger.filters:
        if isinstance(f, RepeatFilter):
            return f
    f = RepeatFilter(burst, window_s)
    logger.addFilter(f)
    return f
