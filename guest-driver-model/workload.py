"""Guest load: what each vCPU's scheduler would see, tick by tick.

``PeltTracker`` follows Linux's PELT signal closely enough for a model: a
geometric average of running time with a 32 ms half-life, scaled to 0..1024.
``BurstyWorkload`` is a seeded, reproducible mix of idle stretches and bursts
per vCPU, the shape of an interactive guest (UI frames, app starts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["PeltTracker", "BurstyWorkload", "Phase"]

UTIL_SCALE = 1024


class PeltTracker:
    """util(t+dt) = util(t) * y^dt + busy * 1024 * (1 - y^dt), with y^32ms = 1/2."""

    HALF_LIFE_MS = 32.0

    def __init__(self, util: float = 0.0) -> None:
        self.util = util

    def step(self, busy_fraction: float, dt_ms: float) -> int:
        decay = 0.5 ** (dt_ms / self.HALF_LIFE_MS)
        self.util = self.util * decay + busy_fraction * UTIL_SCALE * (1.0 - decay)
        return int(round(self.util))


@dataclass(frozen=True, slots=True)
class Phase:
    duration_ms: float
    busy: float  # 0..1


class BurstyWorkload:
    """Per-vCPU sequences of phases drawn from a seeded generator."""

    def __init__(self, num_vcpus: int, *, seed: int = 1, burst_prob: float = 0.3) -> None:
        self._rng = random.Random(seed)
        self._burst_prob = burst_prob
        self._phases: list[list[Phase]] = [[] for _ in range(num_vcpus)]
        self._left_ms = [0.0] * num_vcpus
        self._busy = [0.0] * num_vcpus

    def _next_phase(self, vcpu: int) -> None:
        if self._rng.random() < self._burst_prob:
            phase = Phase(self._rng.uniform(20, 200), self._rng.uniform(0.7, 1.0))
        else:
            phase = Phase(self._rng.uniform(20, 300), self._rng.uniform(0.0, 0.15))
        self._left_ms[vcpu] = phase.duration_ms
        self._busy[vcpu] = phase.busy

    def busy(self, vcpu: int, dt_ms: float) -> float:
        """Busy fraction of ``vcpu`` over the next ``dt_ms``."""
        if self._left_ms[vcpu] <= 0:
            self._next_phase(vcpu)
        self._left_ms[vcpu] -= dt_ms
        return self._busy[vcpu]
