"""Notification coalescing, kick batching and log budgets, with injected time (pure).

``NotifyCoalescer`` lets the first change of a quiet period through at once,
then at most one notification per ``min_interval`` seconds, and always one
final notification for the last change of a storm, so the guest ends up with
the latest state however many changes happened.
"""

from __future__ import annotations

__all__ = ["NotifyCoalescer", "KickBatcher", "LogBudget"]


class NotifyCoalescer:
    def __init__(self, min_interval: float) -> None:
        if min_interval < 0:
            raise ValueError("min_interval must be >= 0")
        self.min_interval = min_interval
        self._last_sent: float | None = None
        self._pending = False
        self.coalesced = 0  # changes folded into a later notification

    def change(self, now: float) -> bool:
        """A change happened at ``now``: True to notify now, False if deferred."""
        if self._last_sent is None or now - self._last_sent >= self.min_interval:
            self._last_sent = now
            self._pending = False
            return True
        if self._pending:
            self.coalesced += 1
        self._pending = True
        return False

    def deadline(self) -> float | None:
        """When the deferred notification is due, or None if nothing is pending."""
        if not self._pending or self._last_sent is None:
            return None
        return self._last_sent + self.min_interval

    def fire(self, now: float) -> bool:
        """The timer went off: True to send the deferred notification now."""
        due = self.deadline()
        if due is None or now < due:
            return False
        self._pending = False
        self._last_sent = now
        return True


class KickBatcher:
    """How many buffers the device lets the driver add before the next kick.

    With VIRTIO_RING_F_EVENT_IDX the device names the avail index it wants a
    kick for.  Asking for the very next buffer (``1``) gives the lowest
    latency and one kick per buffer.  Under sustained load the device asks
    for a kick only after the number of buffers expected within
    ``max_delay`` seconds, and drains on a timer at that deadline, so a
    request waits at most ``max_delay`` while kicks drop by that factor.
    The arrival rate is a moving average over drains, so a burst's end
    brings the device back to kick-per-buffer after a few quiet deadlines.
    """

    def __init__(self, max_delay: float = 0.008, max_ahead: int = 32, weight: float = 0.3) -> None:
        if max_delay < 0 or max_ahead < 1 or not 0 < weight <= 1:
            raise ValueError("need max_delay >= 0, max_ahead >= 1, 0 < weight <= 1")
        self.max_delay = max_delay
        self.max_ahead = max_ahead
        self.weight = weight
        self.rate = 0.0  # buffers per second
        self._last: float | None = None

    def drained(self, now: float, buffers: int) -> int:
        """A drain handled ``buffers`` at ``now``: how far ahead to ask for the next kick (>= 1)."""
        if self._last is not None and now > self._last:
            inst = buffers / (now - self._last)
            self.rate += self.weight * (inst - self.rate)
        self._last = now
        return max(1, min(self.max_ahead, int(self.rate * self.max_delay)))


class LogBudget:
    """At most ``burst`` log lines per ``period`` seconds; the rest are only counted.

    Rejections are always counted; their log lines are what a hostile guest
    could otherwise use to flood the journal.  :meth:`allow` answers for one
    line; when a period with suppressed lines ends, :meth:`allow` returns the
    number suppressed through :attr:`suppressed_then` so the caller can say so.
    """

    def __init__(self, burst: int = 10, period: float = 1.0) -> None:
        if burst < 1 or period <= 0:
            raise ValueError("need burst >= 1 and period > 0")
        self.burst = burst
        self.period = period
        self._start: float | None = None
        self._used = 0
        self.suppressed = 0  # in the current period
        self.suppressed_then = 0  # in the period that just ended (read after allow())

    def allow(self, now: float) -> bool:
        self.suppressed_then = 0
        if self._start is None or now - self._start >= self.period:
            self.suppressed_then = self.suppressed
            self._start, self._used, self.suppressed = now, 0, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.suppressed += 1
        return False
