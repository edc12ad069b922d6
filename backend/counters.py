"""Per-VM event counters: every acceptance and every rejection, with its reason.

Plain dictionaries keyed by (event, reason); the Prometheus exporter reads
them, and tests assert on them.  Reasons are the bounded slugs carried by the
protocol errors, so label cardinality stays bounded.

Live sources: a request queue served by the C kick lane counts in C.  While
it is attached its counts are a *source* read on every query; on detach they
are folded into the dictionary, under a lock shared with the readers (the
metrics exporter runs in its own thread), so no reader sees them twice or
not at all.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any, Callable

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

    def merge(self, counts: list[int], total: float) -> None:
        """Add observations counted elsewhere with the same bounds (per bucket, not cumulative)."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.sum += total
        self.count += sum(counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, +Inf last, as Prometheus wants them."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            acc += n
            out.append((bound, acc))
        return out


Source = Callable[[], dict[tuple[str, str], int]] | Any  # a callable, or an object with counts()/histogram()


def _counts(src: Source) -> dict[tuple[str, str], int]:
    return src.counts() if hasattr(src, "counts") else src()


def _histogram(src: Source, name: str) -> tuple[list[int], float] | None:
    h = getattr(src, "histogram", None)
    return h(name) if h is not None else None


class Counters:
    def __init__(self) -> None:
        self._c: Counter[tuple[str, str]] = Counter()
        self.histograms: dict[str, Histogram] = {}
        self._sources: list[Source] = []
        self._lock = threading.Lock()

    def add_source(self, src: Source) -> None:
        """Counts kept elsewhere (cumulative since now), read live until fold_source()."""
        with self._lock:
            self._sources.append(src)

    def fold_source(self, src: Source) -> None:
        """Take the source's final counts in and stop reading it."""
        with self._lock:
            if src not in self._sources:
                return
            self._sources.remove(src)
            self._c.update(_counts(src))
            for name in ("kick_to_decision_seconds",):
                got = _histogram(src, name)
                if got is not None and any(got[0]):
                    h = self.histograms.get(name)
                    if h is None:
                        h = self.histograms[name] = Histogram()
                    h.merge(*got)

    def histogram(self, name: str) -> Histogram | None:
        """The named histogram with live sources included (a copy when there are any)."""
        with self._lock:
            h = self.histograms.get(name)
            live = [g for g in (_histogram(s, name) for s in self._sources) if g is not None]
            if not live:
                return h
            out = Histogram(h.bounds if h is not None else LATENCY_BUCKETS)
            if h is not None:
                out.merge(h.counts, h.sum)
            for counts, total in live:
                out.merge(counts, total)
            return out

    def observe(self, name: str, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram()
        h.observe(value)

    def inc(self, event: str, reason: str = "", n: int = 1) -> None:
        self._c[(event, reason)] += n

    def get(self, event: str, reason: str = "") -> int:
        if not self._sources:
            return self._c[(event, reason)]
        return self.snapshot().get((event, reason), 0)

    def total(self, event: str) -> int:
        return sum(v for (e, _), v in self.snapshot().items() if e == event)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            out = Counter(dict(self._c))
            for src in self._sources:
                out.update(_counts(src))
        return {k: v for k, v in out.items() if v or k in self._c}
