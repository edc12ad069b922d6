"""The policy engine: guest demand to host util clamps, as pure functions with injected time.

Theory of operation
-------------------
The host's schedutil picks a pCPU's frequency from the utilisation of what
runs on it: ``f = 1.25 * f_max * util / capacity``.  A vCPU thread that is
busy only in short bursts shows a low host util, so the pCPU stays slow even
when the guest's own governor asked for speed.  A util clamp on the vCPU
thread (``uclamp_min``) raises the util schedutil sees while the thread runs,
so the pCPU runs at the speed the guest asked for.

Units: util and clamps are in capacity units, 0..1024 where 1024 is the
host's biggest CPU at its top frequency (``SCHED_CAPACITY_SCALE``).  A guest
record's util is 0..1024 *of its vCPU's capacity* (the capacity the device
advertises for the vCPU's domain), so the work it stands for, in host units,
is ``util * vcpu_capacity / 1024``; PELT util is frequency- and
capacity-invariant, so that is also the clamp that makes the pCPU run the
work as fast as the guest wanted, whatever pCPU the vCPU sits on (capped at
that pCPU's capacity).  A frequency request (``perf_khz``) already carries
the guest governor's headroom; schedutil adds its own 1.25, so the clamp is
scaled by ``headroom`` (0.8, as crosvm does) to not pay it twice.

Stability: a clamp moves only when the new value differs from the applied one
by at least ``hysteresis`` (or goes to the floor or the ceiling), and at most
once per ``min_interval`` per vCPU (a later value waits, newest wins).  A vCPU
whose guest sent nothing for ``stale_after`` seconds falls back to the floor:
a guest that stops reporting loses its boost.  Per-VM floor and ceiling bound
every value.

Power cap: a vCPU's ``uclamp_max`` (the VM's cap, lowered further for a vCPU
advertised a top frequency below its pCPU's, see :func:`domain_cap`) is also
written to the thread or cgroup, and the kernel refuses a ``uclamp_min``
above a task's ``uclamp_max`` (EINVAL).  So every value the engine decides,
the floor included, is bounded by the vCPU's cap: ``top`` below is the lowest
of pCPU capacity and cap.

The engine returns :class:`ClampChange` lists; the asyncio shell applies them
through actuators and arms one timer at :meth:`ClampEngine.next_deadline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "CAPACITY_SCALE",
    "EngineConfig",
    "VmLimits",
    "VcpuPlacement",
    "ClampChange",
    "ClampState",
    "ClampEngine",
    "util_to_clamp",
    "perf_to_clamp",
    "bound",
    "effective_cap",
    "domain_clamps",
    "clamp_percent",
    "domain_cap",
    "plan_pinning",
]

CAPACITY_SCALE = 1024


@dataclass(frozen=True, slots=True)
class EngineConfig:
    hysteresis: int = 32  # capacity units
    min_interval: float = 0.008  # seconds between two changes of one vCPU's clamp
    stale_after: float = 0.5  # seconds without a record before the boost is dropped
    headroom: float = 0.8  # compensation for schedutil's 1.25 on frequency requests

    def __post_init__(self) -> None:
        if not 0 <= self.hysteresis <= CAPACITY_SCALE:
            raise ValueError("hysteresis must be 0..1024")
        if self.min_interval < 0 or self.stale_after <= 0:
            raise ValueError("min_interval must be >= 0 and stale_after > 0")
        if not 0 < self.headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class VmLimits:
    floor: int = 0  # never clamp below (a guaranteed minimum)
    ceiling: int = CAPACITY_SCALE  # never boost above
    #: the VM's power cap, written as uclamp_max (1024: no cap, the threads' uclamp_max is left alone)
    uclamp_max: int = CAPACITY_SCALE

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling <= CAPACITY_SCALE:
            raise ValueError(f"need 0 <= floor ({self.floor}) <= ceiling ({self.ceiling}) <= 1024")
        if not self.floor <= self.uclamp_max <= CAPACITY_SCALE:
            raise ValueError(f"need floor ({self.floor}) <= uclamp_max ({self.uclamp_max}) <= 1024")


@dataclass(frozen=True, slots=True)
class VcpuPlacement:
    """Where one vCPU runs: its pCPU (or home CPU's) capacity, the guest's, and the top frequency involved."""

    vcpu: int
    pcpu: int | None  # pinned there; None: the service leaves its affinity alone (placement.py)
    pcpu_capacity: int
    vcpu_capacity: int
    max_khz: int
    domain: int = 0  # host frequency domain of the pCPU (for per-domain cgroup clamps)
    #: this vCPU's own cap (:func:`domain_cap`: advertised a lower top frequency than its pCPU's); 1024: none
    uclamp_max: int = CAPACITY_SCALE


@dataclass(frozen=True, slots=True)
class ClampChange:
    vcpu: int
    uclamp_min: int
    reason: str  # "request", "deferred", "stale", "release"


def util_to_clamp(util: int, vcpu_capacity: int, pcpu_capacity: int) -> int:
    """Clamp (host units) that lets a pCPU run ``util`` (0..1024 of the vCPU) as the guest wanted."""
    work = util * vcpu_capacity // CAPACITY_SCALE
    return min(work, pcpu_capacity)


def perf_to_clamp(perf_khz: int, max_khz: int, pcpu_capacity: int, headroom: float) -> int:
    """Clamp for a frequency request: the util at which schedutil picks ``perf_khz``, less its headroom."""
    if max_khz <= 0:
        return 0
    frac = min(perf_khz, max_khz) / max_khz
    return min(pcpu_capacity, int(frac * pcpu_capacity * headroom))


def bound(value: int, limits: VmLimits, top: int) -> int:
    """Apply the VM's floor and ceiling; the floor is capped by ``top`` (what the pCPU can give, or the cap)."""
    return max(min(limits.floor, top), min(value, limits.ceiling, top))


def effective_cap(place: VcpuPlacement, limits: VmLimits) -> int:
    """The uclamp_max for ``place``'s thread: the VM's cap and the vCPU's own, whichever is lower."""
    return min(place.uclamp_max, limits.uclamp_max)


def domain_cap(vcpu_max_khz: int, pcpu_max_khz: int, pcpu_capacity: int, headroom: float) -> int:
    """The cap of a vCPU advertised ``vcpu_max_khz`` on a pCPU whose top is ``pcpu_max_khz``.

    crosvm (devices/src/virtcpufreq_v2.rs) also sets uclamp_max when the two
    tops differ, there to each request.  Here it is the clamp of a request
    for the vCPU's top frequency (:func:`perf_to_clamp`), fixed while the
    placement holds: the pCPU then never runs faster than the fastest vCPU
    the guest was promised, and the guest's governor stays free below it.
    1024 (no cap) where the vCPU's top is not lower.
    """
    if vcpu_max_khz <= 0 or pcpu_max_khz <= 0 or vcpu_max_khz >= pcpu_max_khz:
        return CAPACITY_SCALE
    return perf_to_clamp(vcpu_max_khz, pcpu_max_khz, pcpu_capacity, headroom)


@dataclass(frozen=True, slots=True)
class ClampState:
    """One vCPU's decision state, carried to a successor process so that it neither applies again a
    clamp in place nor forgets one (hysteresis, the rate limit and the stale timer go on)."""

    vcpu: int
    wanted: int
    applied: int | None
    changed_at: float | None  # None: never changed (minus infinity)
    record_at: float | None
    pending: bool


@dataclass(slots=True)
class _Vcpu:
    place: VcpuPlacement
    top: int  # no clamp above: the pCPU's capacity or the vCPU's cap, whichever is lower
    wanted: int = 0  # latest bounded request
    applied: int | None = None  # last value handed out (None: never touched)
    changed_at: float = float("-inf")
    record_at: float | None = None
    pending: bool = False


class ClampEngine:
    """Clamp decisions for one VM's vCPUs."""

    def __init__(self, placements: Sequence[VcpuPlacement], limits: VmLimits = VmLimits(),
                 config: EngineConfig = EngineConfig()) -> None:
        self.limits = limits
        self.config = config
        self._v = {p.vcpu: _Vcpu(p, min(p.pcpu_capacity, effective_cap(p, limits))) for p in placements}

    @property
    def vcpus(self) -> Mapping[int, int | None]:
        """Applied clamp per vCPU (None where the engine never set one)."""
        return {v: s.applied for v, s in self._v.items()}

    def placement(self, vcpu: int) -> VcpuPlacement:
        return self._v[vcpu].place

    def on_record(self, vcpu: int, util: int, perf_khz: int, now: float) -> list[ClampChange]:
        s = self._v.get(vcpu)
        if s is None:
            return []
        p = s.place
        raw = (perf_to_clamp(perf_khz, p.max_khz, p.pcpu_capacity, self.config.headroom) if perf_khz
               else util_to_clamp(util, p.vcpu_capacity, p.pcpu_capacity))
        s.wanted = bound(raw, self.limits, s.top)
        s.record_at = now
        return self._consider(s, now, "request")

    def _consider(self, s: _Vcpu, now: float, reason: str) -> list[ClampChange]:
        lo, hi = bound(0, self.limits, s.top), bound(CAPACITY_SCALE, self.limits, s.top)
        if s.applied is not None:
            delta = abs(s.wanted - s.applied)
            if delta == 0 or (delta < self.config.hysteresis and s.wanted not in (lo, hi)):
                s.pending = False
                return []
        if now - s.changed_at < self.config.min_interval:
            s.pending = True
            return []
        s.applied, s.changed_at, s.pending = s.wanted, now, False
        return [ClampChange(s.place.vcpu, s.wanted, reason)]

    def tick(self, now: float) -> list[ClampChange]:
        """Drop stale boosts and apply deferred values that are due."""
        out: list[ClampChange] = []
        for s in self._v.values():
            if s.record_at is not None and now - s.record_at >= self.config.stale_after:
                s.record_at = None
                s.wanted = bound(0, self.limits, s.top)
                out += self._consider(s, now, "stale")
            elif s.pending:
                out += self._consider(s, now, "deferred")
        return out

    def next_deadline(self) -> float | None:
        times = [s.changed_at + self.config.min_interval for s in self._v.values() if s.pending]
        times += [s.record_at + self.config.stale_after for s in self._v.values() if s.record_at is not None]
        return min(times) if times else None

    def state(self) -> tuple[ClampState, ...]:
        """Each vCPU's decision state, in placement order."""
        return tuple(ClampState(v, s.wanted, s.applied, None if s.changed_at == float("-inf") else s.changed_at,
                                s.record_at, s.pending) for v, s in self._v.items())

    def restore_state(self, states: Iterable[ClampState]) -> None:
        """Go on from a predecessor's decisions; ValueError (nothing changed) if one names another vCPU."""
        states = list(states)
        unknown = [c.vcpu for c in states if c.vcpu not in self._v]
        if unknown:
            raise ValueError(f"vCPUs {unknown} are not this VM's")
        for c in states:
            s = self._v[c.vcpu]
            s.wanted, s.applied, s.pending = c.wanted, c.applied, c.pending
            s.changed_at = float("-inf") if c.changed_at is None else c.changed_at
            s.record_at = c.record_at

    def release_all(self) -> list[ClampChange]:
        """Back to no boost for every vCPU the engine touched (VM reset or gone)."""
        out = []
        for s in self._v.values():
            s.record_at, s.pending, s.wanted = None, False, 0
            if s.applied not in (None, 0):
                out.append(ClampChange(s.place.vcpu, 0, "release"))
            s.applied = 0 if s.applied is not None else None
        return out


def domain_clamps(applied: Mapping[int, int | None], vcpu_domain: Mapping[int, int]) -> dict[int, int]:
    """Per-domain clamp for cgroup actuation: one cgroup per domain gets the max of its vCPUs."""
    out: dict[int, int] = {}
    for vcpu, value in applied.items():
        d = vcpu_domain[vcpu]
        out[d] = max(out.get(d, 0), value or 0)
    return out


def clamp_percent(value: int) -> str:
    """cgroup v2 ``cpu.uclamp.min`` format: a percentage with two decimals."""
    return f"{value * 100 / CAPACITY_SCALE:.2f}"


def plan_pinning(
    num_vcpus: int,
    capacity_classes: Sequence[Sequence[int]],
    *,
    taken: Iterable[int] = (),
) -> tuple[int, ...]:
    """A 1:1 vCPU-to-pCPU plan (the ``auto`` mode of :mod:`.placement`).

    ``capacity_classes`` lists the online pCPUs of each capacity class,
    smallest class first.  vCPUs are spread over the classes in proportion to
    their size (largest remainder, every class that can get one gets one
    when there are enough vCPUs), little CPUs on the lowest vCPU ids like a
    phone's CPU numbering, skipping pCPUs already ``taken`` by other VMs.
    Raises ``ValueError`` when there are fewer free pCPUs than vCPUs.
    """
    used = set(taken)
    free = [[c for c in cls if c not in used] for cls in capacity_classes]
    total = sum(len(f) for f in free)
    if num_vcpus > total:
        raise ValueError(f"{num_vcpus} vCPUs but only {total} free pCPUs")
    if num_vcpus == 0:
        return ()
    share = [num_vcpus * len(f) / total for f in free]
    counts = [int(s) for s in share]
    # Every non-empty class gets at least one if there are vCPUs to go round.
    if num_vcpus >= sum(1 for f in free if f):
        counts = [max(c, 1 if f else 0) for c, f in zip(counts, free)]
    order = sorted(range(len(free)), key=lambda i: share[i] - int(share[i]), reverse=True)
    while sum(counts) < num_vcpus:
        for i in order:
            if sum(counts) < num_vcpus and counts[i] < len(free[i]):
                counts[i] += 1
    while sum(counts) > num_vcpus:
        i = max(range(len(free)), key=lambda j: counts[j])
        counts[i] -= 1
    plan: list[int] = []
    for f, n in zip(free, counts):
        plan.extend(f[:n])
    return tuple(plan)
