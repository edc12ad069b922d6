"""Notification coalescing, kick batching (busy polling) and log budgets, with injected time (pure).

``NotifyCoalescer`` lets the first change of a quiet period through at once,
then at most one notification per ``min_interval`` seconds, and always one
final notification for the last change of a storm, so the guest ends up with
the latest state however many changes happened.
"""

from __future__ import annotations

from ..defaults import KICK_BATCH_DELAY

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
    """When a ring wants its next kick, and when the device drains it without one.

    With VIRTIO_RING_F_EVENT_IDX the device names the avail index it wants a
    kick for.  A ring starts *kicked*: the device asks for a kick on the very
    next buffer, the lowest latency, one kick (a VM exit) per buffer.

    A ring whose buffers arrive at ``enter_rate`` or more, measured over
    ``window`` seconds, turns *busy*: the device drains it every ``period``
    seconds without being asked, on a grid of that period which every busy
    ring shares (one wake-up of the device serves them all), and asks for a
    kick only after ``max_ahead`` buffers (a burst that would otherwise fill
    the ring before the next drain).  A busy VM thus sends almost no kicks,
    and a buffer waits at most ``period`` for the device.  Below
    ``leave_rate`` the ring turns kicked again.

    Polling is cheap where kicks are dear: a poll of an idle ring is a load
    of its avail index, and one wake-up serves every busy ring; a kick is a
    VM exit, an eventfd write and a wake-up per buffer.  The rates are the
    break-even with margin on both sides, so a ring does not flap.
    """

    def __init__(self, period: float = KICK_BATCH_DELAY, max_ahead: int = 32, *, enter_rate: float = 50.0,
                 leave_rate: float = 20.0, window: float = 0.1) -> None:
        if period < 0 or max_ahead < 1 or not 0 <= leave_rate <= enter_rate or window <= 0:
            raise ValueError("need period >= 0, max_ahead >= 1, 0 <= leave_rate <= enter_rate, window > 0")
        self.period = period
        self.max_ahead = max_ahead
        self.enter_rate = enter_rate
        self.leave_rate = leave_rate
        self.window = window
        self.busy = False
        self.rate = 0.0  # buffers per second over the last closed window
        self._win_start: float | None = None
        self._win_buffers = 0

    def drained(self, now: float, buffers: int) -> int:
        """A drain handled ``buffers`` at ``now``: how far ahead to ask for the next kick (>= 1)."""
        if self._win_start is None:
            self._win_start = now
        self._win_buffers += buffers
        elapsed = now - self._win_start
        if elapsed >= self.window:
            self.rate = self._win_buffers / elapsed
            if self.period > 0 and self.rate >= self.enter_rate:
                self.busy = True
            elif self.rate < self.leave_rate:
                self.busy = False
            self._win_start, self._win_buffers = now, 0
        return self.max_ahead if self.busy else 1

    def next_poll(self, now: float) -> float | None:
        """When a busy ring is drained next (a point of the shared grid after ``now``), or None if kicked."""
        if not self.busy:
            return None
        return (int(now / self.period) + 1) * self.period


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
