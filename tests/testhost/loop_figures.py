"""The closed loop's latency: from a guest's record in the test host to the outer back-end seeing the new request.

The guest model's records (inside the test host, its ``CLOCK_MONOTONIC``)
change the clamp of a vCPU thread there; the test host's schedutil then walks
its frequency request up (or down) its table, and each step reaches the outer
back-end on this machine as a record from the test host's ``virtio_cpufreq``.
A change counts as seen when the outer back-end receives the step that ends
the walk: the top of the range after a rise, the bottom after a fall.  Those
requests stay the last until the next change (the driver re-sends them only
every ``refresh_ms``, 200 ms), so polling the outer back-end's ``status``
every few milliseconds finds each one's exact arrival time (``record_at``).

The two clocks are related by :meth:`TestHost.clock_offset` (to half an agent
round trip), read before and after the run.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable

__all__ = ["OuterPoller", "Latencies", "latencies", "percentile"]


class OuterPoller:
    """Polls the outer back-end's status in a thread; keeps each distinct (record_at, util) of one vCPU."""

    def __init__(self, status: Callable[[], dict], vcpu: int, period: float = 0.004) -> None:  # type: ignore[type-arg]
        self.seen: list[tuple[float, int]] = []
        self.polls = 0
        self._status, self._vcpu, self._period = status, vcpu, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "OuterPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            v = self._status()["vms"]["testhost"]["vcpus"][self._vcpu]
            self.polls += 1
            if v["record_at"] is not None and (not self.seen or self.seen[-1][0] != v["record_at"]):
                self.seen.append((v["record_at"], v["util"]))


@dataclass(frozen=True)
class Latencies:
    rise: list[float]  # seconds, one per rise that was seen
    fall: list[float]
    missed: list[tuple[float, int]]  # guest changes (guest clock, util) the outer never saw completed


def latencies(changes: list[tuple[float, int]], seen: list[tuple[float, int]], offset: float,
              top: int, bottom: int) -> Latencies:
    """Per guest change, the time until the outer saw the request that ends the walk (``top`` or ``bottom`` util).

    ``offset`` is the test host's clock minus this machine's.  A change is
    missed if that request did not arrive before the next change.
    """
    rise: list[float] = []
    fall: list[float] = []
    missed: list[tuple[float, int]] = []
    for i, (t_guest, util) in enumerate(changes):
        start = t_guest - offset
        end = changes[i + 1][0] - offset if i + 1 < len(changes) else float("inf")
        want = top if util > 0 else bottom
        hit = next((t for t, u in seen if start < t < end and u == want), None)
        if hit is None:
            missed.append((t_guest, util))
        else:
            (rise if util > 0 else fall).append(hit - start)
    return Latencies(rise, fall, missed)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


@dataclass(frozen=True)
class Walk:
    """Inside the test host, per rise (guest clock): to schedutil's first step up, and to the top."""

    first_step: list[float]
    to_top: list[float]
    top_at: list[float]  # when the top was set, test host clock (to split off the trip to the outer)


def walks(changes: list[tuple[float, int]], events: list[tuple[float, int]], top_khz: int) -> Walk:
    """From the ``power:cpu_frequency`` trace of CPU 1 (test host clock, kHz)."""
    first: list[float] = []
    to_top: list[float] = []
    top_at: list[float] = []
    for i, (t, util) in enumerate(changes):
        if util == 0:
            continue
        end = changes[i + 1][0] if i + 1 < len(changes) else float("inf")
        level = next((f for ts, f in reversed(events) if ts <= t), None)
        after = [(ts, f) for ts, f in events if t < ts < end]
        up = next((ts for ts, f in after if level is None or f > level), None)
        top = next((ts for ts, f in after if f == top_khz), None)
        if up is not None:
            first.append(up - t)
        if top is not None:
            to_top.append(top - t)
            top_at.append(top)
    return Walk(first, to_top, top_at)
