"""The interface between the cpufreq device and whatever acts on guest requests.

The device decodes records and hands the accepted ones to a :class:`Policy`
with the time they were received and the domain each vCPU sits in.  The policy
answers with a :class:`Decision` (what the host should do for that vCPU); the
real engine with pinning and util clamps plugs in here.  ``RecordingPolicy``
keeps every record and answers with schedutil's own frequency formula, which
is what the host governor would pick for that utilisation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Protocol

from vhost_user_cpufreq.protocol.cpufreq import Domain, Record

__all__ = ["Decision", "Policy", "RecordingPolicy", "schedutil_khz", "SCHEDUTIL_HEADROOM"]

#: schedutil picks next_freq = 1.25 * max_freq * util / max_capacity (kernel/sched/cpufreq_schedutil.c).
SCHEDUTIL_HEADROOM = 1.25


def schedutil_khz(util: int, domain: Domain) -> int:
    """Frequency schedutil would choose for ``util`` (0..1024) in ``domain``, clamped to its range."""
    want = (5 * domain.max_khz * util) >> 12  # 1.25 * max * util / 1024, in integers
    return max(domain.min_khz, min(domain.max_khz, want))


class Decision(NamedTuple):
    """What the host should do for one vCPU (a named tuple: one is made per record)."""

    vm: str
    vcpu: int
    util: int
    target_khz: int
    received: float
    uclamp_min: int | None = None  # the clamp applied (or recorded) for the vCPU thread, if any


class Policy(Protocol):
    """What acts on accepted records.

    A policy may also define ``on_records(vm, records, config, now)``: the
    device then calls it once per drain with every accepted record as a
    ``(vcpu, util, perf_khz)`` tuple, in order, and never calls
    :meth:`on_record`.  That is the fast path (no object per record); a
    policy acting on each vCPU's newest record only is correct, since a later
    record of a vCPU supersedes an earlier one.
    """

    def on_record(self, vm: str, record: Record, domain: Domain, now: float) -> Decision:
        """Act on one accepted record (must be idempotent: replays happen)."""
        ...

    def on_vm_reset(self, vm: str) -> None:
        """The VM's driver reset or the VM left: drop its requests."""
        ...


class RecordingPolicy:
    """Records every accepted record and the decision schedutil would take."""

    def __init__(self) -> None:
        self.records: dict[str, list[Record]] = defaultdict(list)
        self.latest: dict[str, dict[int, Decision]] = defaultdict(dict)
        self.resets: dict[str, int] = defaultdict(int)

    def on_record(self, vm: str, record: Record, domain: Domain, now: float) -> Decision:
        self.records[vm].append(record)
        d = Decision(vm, record.vcpu, record.util, schedutil_khz(record.util, domain), now)
        self.latest[vm][record.vcpu] = d
        return d

    def on_vm_reset(self, vm: str) -> None:
        self.latest.pop(vm, None)
        self.resets[vm] += 1
