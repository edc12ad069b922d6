"""Where host CPU frequencies come from.

A :class:`FrequencySource` gives a :class:`HostSnapshot` (current frequency of
each host frequency domain) and says when it may have changed.  This module
holds the two simple sources (a static one and a scripted one for demos and
tests); the sysfs source lives in ``host/sysfs_source.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

__all__ = ["HostDomain", "HostSnapshot", "FrequencySource", "StaticSource", "ScriptedSource", "advertised"]


@dataclass(frozen=True, slots=True)
class HostDomain:
    """One host frequency domain (a cpufreq policy and its related CPUs)."""

    cpus: tuple[int, ...]
    min_khz: int
    max_khz: int
    cur_khz: int
    capacity: int = 1024
    policy: int | None = None  # cpufreq policy number, stable across CPU hotplug
    #: (kHz, uW) of one busy CPU per OPP, ascending; () when the host description gives no power
    #: (power.py builds it; the device offers the guest an energy model only with it, SPEC 9.4)
    energy: tuple[tuple[int, int], ...] = ()

    @property
    def key(self) -> object:
        """What identifies this domain across snapshots (its online CPUs change with hotplug)."""
        return self.policy if self.policy is not None else self.cpus


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    domains: tuple[HostDomain, ...]
    nominal: bool = False  # True when the host has no cpufreq and frequencies are nominal

    def with_cur(self, cur_khz: Sequence[int]) -> "HostSnapshot":
        doms = tuple(
            HostDomain(d.cpus, d.min_khz, d.max_khz, c, d.capacity, d.policy, d.energy)
            for d, c in zip(self.domains, cur_khz, strict=True)
        )
        return HostSnapshot(doms, self.nominal)


def advertised(max_khz: int, capacity: int, vm_max_khz: int | None) -> tuple[int, int]:
    """The top frequency and capacity a guest is told for a host domain, with the VM's top ``vm_max_khz``.

    A VM may be given slower vCPUs than the host's CPUs (``max_khz`` in its
    configuration; crosvm's vCPU frequency tables do the same): a domain
    whose top is above it is advertised at it, and its capacity scaled with
    the frequency (the same work per cycle).  The host then caps the vCPU's
    threads there (policy/engine.py ``domain_cap``).
    """
    if vm_max_khz is None or vm_max_khz >= max_khz or max_khz <= 0:
        return max_khz, capacity
    return vm_max_khz, max(1, capacity * vm_max_khz // max_khz)


Listener = Callable[[HostSnapshot], None]


class FrequencySource(Protocol):
    def snapshot(self) -> HostSnapshot: ...

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on every new snapshot; returns an unsubscribe function."""
        ...


class StaticSource:
    """A fixed snapshot that changes only when told to (tests, demos)."""

    def __init__(self, snapshot: HostSnapshot) -> None:
        self._snapshot = snapshot
        self._listeners: list[Listener] = []

    def snapshot(self) -> HostSnapshot:
        return self._snapshot

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def set_frequencies(self, cur_khz: Sequence[int]) -> None:
        self._snapshot = self._snapshot.with_cur(cur_khz)
        for listener in list(self._listeners):
            listener(self._snapshot)


class ScriptedSource(StaticSource):
    """A static source plus a script of (time, frequencies) steps, applied by ``advance(now)``."""

    def __init__(self, snapshot: HostSnapshot, script: Sequence[tuple[float, Sequence[int]]]) -> None:
        super().__init__(snapshot)
        self._script = sorted(script, key=lambda s: s[0])
        self._next = 0

    def advance(self, now: float) -> bool:
        """Apply every step due by ``now``; True if anything changed."""
        changed = False
        while self._next < len(self._script) and self._script[self._next][0] <= now:
            self.set_frequencies(self._script[self._next][1])
            self._next += 1
            changed = True
        return changed

    @property
    def next_step_at(self) -> float | None:
        return self._script[self._next][0] if self._next < len(self._script) else None
