"""PELT, the per-entity load tracking Linux's scheduler keeps for every thread.

Theory of operation: util_avg is a geometric average of running time with a
32 ms half-life (y^32 = 1/2, periods of 1024 us approximated by 1 ms), scaled
to 0..1024 and made frequency- and capacity-invariant the way Linux does it
(kernel/sched/pelt.c ``accumulate_sum``: running time counts in proportion
to ``arch_scale_freq_capacity`` and ``arch_scale_cpu_capacity``).  A thread
that runs all the time on a CPU of capacity C at frequency f converges to
``C * f / f_max``.  util_est is not modelled (see docs/simulator.md).
"""

from __future__ import annotations

__all__ = ["HALF_LIFE_S", "decay", "Pelt"]

HALF_LIFE_S = 0.032


def decay(dt: float) -> float:
    """How much of the old signal survives ``dt`` seconds."""
    return 0.5 ** (dt / HALF_LIFE_S)


class Pelt:
    """One entity's util_avg, stepped with a fixed ``dt``."""

    __slots__ = ("util", "_y")

    def __init__(self, dt: float, util: float = 0.0) -> None:
        self.util = util
        self._y = decay(dt)

    def step(self, busy: float, scale: float) -> float:
        """Advance one step: ``busy`` is the running fraction of the step, ``scale`` capacity*f/f_max (0..1024)."""
        self.util = self.util * self._y + busy * scale * (1.0 - self._y)
        return self.util
