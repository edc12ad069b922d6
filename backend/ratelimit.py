"""Notification coalescing with injected time (pure; the session arms the timer).

``NotifyCoalescer`` lets the first change of a quiet period through at once,
then at most one notification per ``min_interval`` seconds, and always one
final notification for the last change of a storm, so the guest ends up with
the latest state however many changes happened.
"""

from __future__ import annotations

__all__ = ["NotifyCoalescer"]


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
