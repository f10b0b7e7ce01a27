"""Sampled logging of bad input: every drop is counted, but each source gets at most one log
line per period, carrying how many lines were suppressed since its last one."""
from __future__ import annotations

import logging
from collections import OrderedDict
from threading import Lock


class SampledLog:
    """At most one line per key (a device) per `period_s`; a bounded number of keys."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0,
                 max_keys: int = 10_000) -> None:
        self.logger, self.period_s, self.max_keys = logger, period_s, max_keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key → (t, suppressed)
        self._lock = Lock()

    def allow(self, key: str, now: float) -> int | None:
        """None if a line for `key` now is suppressed; otherwise how many were suppressed
        since the last line (and the clock restarts)."""
        with self._lock:
            t, suppressed = self._last.get(key, (None, 0))
            if t is not None and now - t < self.period_s:
                self._last[key] = (t, suppressed + 1)
                return None
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            return suppressed

    def warning(self, key: str, now: float, msg: str, *args: object) -> None:
        """`logger.warning(msg, *args)` unless suppressed; a count of suppressed lines is
        appended when there were any."""
        suppressed = self.allow(key, now)
        if suppressed is None:
            return
        if suppressed:
            self.logger.warning(msg + " (%d similar lines suppressed)", *args, suppressed)
        else:
            self.logger.warning(msg, *args)
