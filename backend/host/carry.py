"""What the actuators wrote for a VM, written down for a successor process and taken back by it.

Theory of operation: across a handover the clamp engine's decisions travel
with the session (policy/engine.py ClampState); so does what the actuators
know that the kernel does not keep: the value each thread and cgroup was
given (so an equal decision writes nothing) and each cgroup's original
``cpu.uclamp.min``/``max`` (so the VM's going puts back what was there before
the service, not the predecessor's clamp).  Threads' own originals are in the
state file already, and the successor adopts them first (service/daemon.py);
threaded cgroups the predecessor made are adopted from it too
(:func:`~.cgroups.adopt_cgroups`).

The successor takes an entry only where its own records agree: a thread it
adopted from the state file (same id and start time), a cgroup it adopted, or
one the VM's fixed template names.  Anything else is skipped and counted
(``carry_ignored``): that thread or cgroup is then treated as never touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Protocol

from vhost_user_cpufreq.protocol.host_snapshot import CgroupCarry, HostSnapshot, ThreadCarry

from .actuators import CgroupClampActuator, ThreadActuator
from .cgroups import ThreadedCgroups, uclamp_cap


class _Binding(Protocol):
    @property
    def tids(self) -> dict[int, int]: ...

    @property
    def cgroup(self) -> str | None: ...


class _Policy(Protocol):
    """What this module reads of policy.py's HostPolicy (which imports it)."""

    @property
    def vms(self) -> Mapping[str, _Binding]: ...

    actuator: ThreadActuator
    cgroups: CgroupClampActuator
    threaded: ThreadedCgroups

    def cgroup_paths(self, vm: str) -> list[Path]: ...

__all__ = ["host_state", "restore_host_state"]

log = logging.getLogger("vhost_user_cpufreq.policy")


def host_state(policy: _Policy, vm: str) -> HostSnapshot | None:
    """What the actuators hold for ``vm``'s threads and cgroups (None: the VM has no binding)."""
    b = policy.vms.get(vm)
    if b is None:
        return None
    a, cg = policy.actuator, policy.cgroups
    threads = tuple(ThreadCarry(t, a.clamps.get(t), a.caps.get(t))
                    for t in sorted(b.tids.values()) if t in a.clamps or t in a.caps)
    cgroups = tuple(CgroupCarry(str(p), cg.originals.get(p), cg.values.get(p), cg.max_originals.get(p),
                                cg.max_values.get(p))
                    for p in sorted(policy.cgroup_paths(vm)) if p in cg.originals or p in cg.max_originals)
    return HostSnapshot(threads, cgroups)


def restore_host_state(policy: _Policy, vm: str, h: HostSnapshot) -> None:
    """Take the predecessor's view of ``vm``'s threads and cgroups where this process's records agree."""
    b = policy.vms.get(vm)
    if b is None:
        return
    a, cg = policy.actuator, policy.cgroups
    ignored = 0
    for t in h.threads:
        if t.tid not in a.originals:  # not a thread the state file says the predecessor changed
            ignored += 1
            continue
        if t.clamp is not None:
            a.clamps[t.tid] = t.clamp
        if t.cap is not None:
            a.caps[t.tid] = t.cap
    known = {str(p): p for p in policy.threaded.made}
    if b.cgroup is not None and not b.cgroup.startswith("{qemu}/"):
        known.update((str(p), p) for p in policy.cgroup_paths(vm))  # a fixed template (libvirt's)
    for c in h.cgroups:
        p = known.get(c.path)
        if p is None:
            ignored += 1
            continue
        try:
            if c.original_min is not None:
                cg.caps[p] = uclamp_cap(p, root=cg.root)
                cg.originals[p] = c.original_min
                if c.value is not None:
                    cg.values[p] = c.value
            if c.original_max is not None:
                cg.max_originals[p] = c.original_max
                if c.max_value is not None:
                    cg.max_values[p] = c.max_value
        except OSError as exc:
            ignored += 1
            log.warning("[%s] %s cannot be taken over (%s): treated as never clamped", vm, Path(p), exc.strerror)
    if ignored:
        a.counters.inc("carry_ignored", n=ignored)
        log.warning("[%s] %d carried thread or cgroup records match nothing of this process's: ignored", vm,
                    ignored)
