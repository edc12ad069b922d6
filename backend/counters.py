"""Per-VM event counters: every acceptance and every rejection, with its reason.

Plain dictionaries keyed by (event, reason); the Prometheus exporter reads
them, and tests assert on them.  Reasons are the bounded slugs carried by the
protocol errors, so label cardinality stays bounded.
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["Counters", "Histogram", "LATENCY_BUCKETS"]

#: Upper bounds (seconds) for latency histograms: from an eventfd round trip to a scheduler tick.
LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1)


class Histogram:
    """Cumulative-on-read bucket counts, cheap to update on a hot path."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, +Inf last, as Prometheus wants them."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            acc += n
            out.append((bound, acc))
        return out


class Counters:
    def __init__(self) -> None:
        self._c: Counter[tuple[str, str]] = Counter()
        self.histograms: dict[str, Histogram] = {}

    def observe(self, name: str, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram()
        h.observe(value)

    def inc(self, event: str, reason: str = "", n: int = 1) -> None:
        self._c[(event, reason)] += n

    def get(self, event: str, reason: str = "") -> int:
        return self._c[(event, reason)]

    def total(self, event: str) -> int:
        return sum(v for (e, _), v in self._c.items() if e == event)

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._c)
