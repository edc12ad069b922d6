"""PELT, the per-entity load tracking Linux's scheduler keeps for every thread, and its util_est.

Theory of operation: util_avg is a geometric average of running time,
scaled to 0..1024, decaying by y per PELT period with y^32 = 1/2.  The
kernel's period is 1024 units of 1024 ns (kernel/sched/pelt.c
``___update_load_sum`` shifts nanoseconds right by 10, ``accumulate_sum``
counts periods of 1024 of those), 1.048576 ms, so the half-life is 33.55 ms.
Running time counts in proportion to ``arch_scale_freq_capacity`` and
``arch_scale_cpu_capacity`` (frequency and capacity invariance): a thread
that runs all the time on a CPU of capacity C at frequency f converges to
``C * f / f_max``.

util_est (kernel/sched/fair.c ``util_est_update``) remembers what a task's
util was when it last went to sleep, so that a periodic task that wakes up
with its util decayed is still seen at its size: at each dequeue for sleep
the estimate jumps up to util_avg if util_avg is higher, otherwise moves a
quarter of the way down to it (an EWMA of weight 1/4), unless it is already
within ``UTIL_EST_MARGIN`` (1% of 1024).  While the task is enqueued its run
queue's util for schedutil is ``max(util_avg, util_est)``
(``cpu_util``).
"""

from __future__ import annotations

__all__ = ["PERIOD_S", "HALF_LIFE_S", "UTIL_EST_MARGIN", "decay", "Pelt", "UtilEst"]

PERIOD_S = 1024 * 1024 / 1e9
HALF_LIFE_S = 32 * PERIOD_S
UTIL_EST_MARGIN = 1024 // 100
UTIL_EST_WEIGHT = 4  # 1 / UTIL_EST_WEIGHT of the way down per dequeue (UTIL_EST_WEIGHT_SHIFT 2)


def decay(dt: float) -> float:
    """How much of the old signal survives ``dt`` seconds."""
    return 0.5 ** (dt / HALF_LIFE_S)


class Pelt:
    """One entity's util_avg, stepped with a fixed ``dt`` (or any dt with :meth:`advance`)."""

    __slots__ = ("util", "_y")

    def __init__(self, dt: float, util: float = 0.0) -> None:
        self.util = util
        self._y = decay(dt)

    def step(self, busy: float, scale: float) -> float:
        """Advance one step: ``busy`` is the running fraction of the step, ``scale`` capacity*f/f_max (0..1024)."""
        self.util = self.util * self._y + busy * scale * (1.0 - self._y)
        return self.util

    def advance(self, dt: float, running: bool, scale: float = 1024.0) -> float:
        """Advance ``dt`` seconds of one state: running (at ``scale``) or not."""
        y = decay(dt)
        self.util = self.util * y + (scale * (1.0 - y) if running else 0.0)
        return self.util


class UtilEst:
    """One task's util_est: the EWMA of its util at each dequeue for sleep."""

    __slots__ = ("ewma",)

    def __init__(self, ewma: float = 0.0) -> None:
        self.ewma = ewma

    def dequeue(self, util: float, runnable: float | None = None, capacity: float = 1024.0) -> float:
        """The task goes to sleep with util_avg ``util``: the new estimate.

        ``runnable`` (its runnable_avg), when known, skips a decrease the task's
        contention explains (it waited, it did not shrink); a util above the
        CPU's ``capacity`` says nothing of the task (no idle time) and is ignored.
        """
        if util >= self.ewma:
            self.ewma = util  # increases are taken at once
            return self.ewma
        diff = self.ewma - util
        if diff < UTIL_EST_MARGIN:
            return self.ewma
        if runnable is not None and util + UTIL_EST_MARGIN < runnable:
            return self.ewma
        if util > capacity:
            return self.ewma
        self.ewma -= diff / UTIL_EST_WEIGHT
        return self.ewma
