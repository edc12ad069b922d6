"""Per-VM event counters: every acceptance and every rejection, with its reason.

Plain dictionaries keyed by (event, reason); the Prometheus exporter reads
them, and tests assert on them.  Reasons are the bounded slugs carried by the
protocol errors, so label cardinality stays bounded.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    def __init__(self) -> None:
        self._c: Counter[tuple[str, str]] = Counter()

    def inc(self, event: str, reason: str = "", n: int = 1) -> None:
        self._c[(event, reason)] += n

    def get(self, event: str, reason: str = "") -> int:
        return self._c[(event, reason)]

    def total(self, event: str) -> int:
        return sum(v for (e, _), v in self._c.items() if e == event)

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._c)
