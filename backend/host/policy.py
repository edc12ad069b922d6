"""The host policy: the asyncio shell around the engine and the actuators.

The device hands it every accepted record (the :class:`~.policy.decision.Policy`
interface).  Per VM it keeps a :class:`~.policy.engine.ClampEngine`, the vCPU thread
ids found for the connected QEMU, and one timer armed at the engine's next
deadline (deferred values and stale-hint decay).  Attaching a VM pins each
vCPU thread to its planned pCPU; detaching releases the clamps and gives every
thread back its original affinity and clamps.  A VM's power cap (each vCPU's
:func:`~.policy.engine.effective_cap`) is written as the threads' (or cgroups')
uclamp_max once they are known, and again in place when a reload changes it:
raised before the engine may decide above the old cap, lowered after it decides
within the new one, so no clamp the lane writes meets a cap below it.

With the C data plane the engine is a :class:`~.dataplane.lane.CClampEngine`, and
:meth:`HostPolicy.lane_binding` lets the device hand the VM's request queue
to the kick lane, which then decides and clamps in C (per-thread clamps only:
a VM clamped through cgroups stays on the event loop).  The engine object
outlives rebinding (it is reconfigured in place), so the lane never holds a
stale one; a change of clamp mechanism tells the device to ask again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from vhost_user_cpufreq.protocol.cpufreq import DeviceConfig, Domain, Record
from vhost_user_cpufreq.protocol.host_snapshot import HostSnapshot

from ..dataplane.cdrain import dataplane
from ..dataplane.lane import EV_UCLAMP_REFUSED, CClampEngine, LaneBinding
from ..policy.decision import Decision, schedutil_khz
from ..policy.engine import (CAPACITY_SCALE, ClampChange, ClampEngine, ClampState, EngineConfig, VcpuPlacement,
                             VmLimits, domain_clamps, effective_cap)
from .actuators import CgroupClampActuator, ThreadActuator
from . import carry
from .cgroups import ThreadedCgroups, cgroup_of

__all__ = ["HostPolicy", "VmBinding"]

log = logging.getLogger("vhost_user_cpufreq.policy")


@dataclass
class VmBinding:
    vm: str
    engine: ClampEngine | CClampEngine
    tids: dict[int, int] = field(default_factory=dict)  # vCPU -> thread id
    timer: asyncio.TimerHandle | None = None
    latest: dict[int, Decision] = field(default_factory=dict)
    #: cgroup v2 path template: "{vcpu}" for one cgroup per vCPU (libvirt), "{domain}"
    #: for one per frequency domain (the domain's clamp is the max of its vCPUs')
    cgroup: str | None = None
    #: the QEMU process's cgroup, once threaded cgroups ("{qemu}/...") are made under it
    cgroup_home: Path | None = None
    pid: int | None = None  # the QEMU process whose threads these are
    on_change: Callable[[], None] | None = None  # the lane's holder, told when the binding changes


class HostPolicy:
    def __init__(
        self,
        actuator: ThreadActuator,
        *,
        config: EngineConfig = EngineConfig(),
        clock: Callable[[], float] = time.monotonic,
        cgroups: CgroupClampActuator | None = None,
        threaded: ThreadedCgroups | None = None,
        c_engine: bool | None = None,
    ) -> None:
        self.actuator = actuator
        self.cgroups = cgroups or CgroupClampActuator(actuator.counters, dry_run=actuator.dry_run)
        self.threaded = threaded or ThreadedCgroups(actuator.counters, state=actuator.state,
                                                    dry_run=actuator.dry_run)
        self.config = config
        self.clock = clock
        self.vms: dict[str, VmBinding] = {}
        #: the C library for C engines (None: engine.py's ClampEngine); by default when the lane can run
        dp = dataplane() if c_engine is not False else None
        self._lib = dp.lib if dp is not None and (c_engine or dp.lane) else None

    # -- VM lifecycle ------------------------------------------------------------------
    def bind(self, vm: str, placements: Sequence[VcpuPlacement], limits: VmLimits,
             cgroup: str | None = None) -> VmBinding:
        """Set up (or replace) the engine of a VM; threads come with :meth:`attach_threads`."""
        old = self.vms.get(vm)
        engine: ClampEngine | CClampEngine
        if old is not None and old.tids and old.cgroup == cgroup:
            self._apply_caps(old, {p.vcpu: effective_cap(p, limits) for p in placements}, rising_only=True)
        elif old is not None and old.cgroup is None:
            for tid in old.tids.values():
                self.actuator.cap(tid, None)  # per-thread caps out: the cgroups' take over
        if old is not None and isinstance(old.engine, CClampEngine):
            engine = old.engine  # the lane may hold it: start it afresh in place
            engine.configure(placements, limits, self.config)
        elif self._lib is not None:
            engine = CClampEngine(self._lib, placements, limits, self.config)
        else:
            engine = ClampEngine(placements, limits, self.config)
        b = VmBinding(vm, engine, cgroup=cgroup)
        if old is not None:
            b.tids = old.tids
            b.pid = old.pid
            b.on_change = old.on_change
            self._cancel(old)
            if old.cgroup != cgroup or old.cgroup_home is not None:
                self._leave_cgroups(old)  # attach_threads() enters the new layout
        self.vms[vm] = b
        self._lane_threads(b)
        if b.tids and old is not None and old.cgroup == cgroup:
            self._apply_caps(b)
        if old is not None and b.on_change is not None and (old.cgroup is None) != (cgroup is None):
            b.on_change()  # per-thread <-> cgroup: the lane takes or leaves the VM
        return b

    def engine_state(self, vm: str) -> tuple[ClampState, ...] | None:
        """The VM's clamp decisions, for a successor process (None: no engine for it)."""
        b = self.vms.get(vm)
        return None if b is None else b.engine.state()

    def restore_engine_state(self, vm: str, states: Sequence[ClampState]) -> None:
        """Go on from a predecessor's decisions (its clamps are in place); ValueError if they are not this
        VM's.  Nothing is applied: the threads and cgroups hold these values already."""
        b = self.vms.get(vm)
        if b is None:
            return
        b.engine.restore_state(states)
        self._arm(b)

    def host_state(self, vm: str) -> HostSnapshot | None:
        """What the actuators wrote for ``vm`` and the originals, for a successor process (carry.py)."""
        return carry.host_state(self, vm)

    def restore_host_state(self, vm: str, h: HostSnapshot) -> None:
        carry.restore_host_state(self, vm, h)

    def lane_binding(self, vm: str, on_change: Callable[[], None]) -> LaneBinding | None:
        """What the kick lane needs to decide for ``vm`` in C, or None if it cannot."""
        b = self.vms.get(vm)
        if b is None or b.cgroup is not None or not isinstance(b.engine, CClampEngine):
            return None
        b.on_change = on_change
        return LaneBinding(b.engine, self.actuator.counters, self._lane_clamp_event, self.lane_stamps(vm))

    def lane_stamps(self, vm: str) -> object:
        """A buffer where the lane stamps each decision (``lane.STAMP_BYTES`` per vCPU), or None (the bench's hook)."""
        return None

    def _lane_threads(self, b: VmBinding) -> None:
        """The C engine clamps the threads the actuator has remembered (so it can restore them)."""
        if isinstance(b.engine, CClampEngine):
            if b.cgroup is None:
                # Per-thread clamps from the lane: each thread's own state is on record (and in the
                # state file) first, pinned or capped or neither, so that it can be given back.
                for tid in b.tids.values():
                    self.actuator.remember(tid)
            b.engine.set_threads({v: t for v, t in b.tids.items() if t in self.actuator.originals})
            b.engine.set_actuation(self.actuator.degraded is None)

    def _lane_clamp_event(self, kind: int, tid: int, err: int) -> None:
        if kind == EV_UCLAMP_REFUSED:
            self.actuator.degraded = f"kernel refused util clamps: {os.strerror(err)}"
            log.warning("util clamps unavailable, recording instead: %s", os.strerror(err))
            for b in self.vms.values():
                self._lane_threads(b)
        else:
            log.warning("could not clamp thread %d: %s", tid, os.strerror(err))

    def attach_threads(self, vm: str, tids: dict[int, int], pid: int | None = None, *,
                       unpin: Sequence[int] = ()) -> None:
        """Pin each known vCPU thread whose placement has a pCPU (thread ids already verified, tasks of
        ``pid``); give the threads in ``unpin`` (pinned before, not any more) their own affinity back."""
        b = self.vms[vm]
        known = b.engine.vcpus
        # Threads of vCPUs the VM is not configured for are left alone.
        b.tids = {v: t for v, t in tids.items() if v in known}
        b.pid = pid if pid is not None else b.pid
        for tid in unpin:
            self.actuator.unpin(tid)
        targets = {tid: b.engine.placement(v).pcpu for v, tid in b.tids.items()}
        pinned = sum(self.actuator.pin(tid, pcpu) for tid, pcpu in targets.items() if pcpu is not None)
        if any(pcpu is not None for pcpu in targets.values()):
            log.info("[%s] pinned %d of %d vCPU threads", vm, pinned, len(b.tids))
        else:
            log.info("[%s] %d vCPU threads attached, their affinity left as it is", vm, len(b.tids))
        self._lane_threads(b)
        if b.cgroup is not None and b.cgroup.startswith("{qemu}/"):
            self._enter_cgroups(b)
        else:
            self._apply_caps(b)

    def _enter_cgroups(self, b: VmBinding) -> None:
        """Make the VM's threaded cgroups under its QEMU's cgroup and move the vCPU threads in."""
        if b.cgroup_home is not None or b.pid is None or not b.tids:
            return
        try:
            b.cgroup_home = cgroup_of(b.pid)
        except OSError as exc:
            self.actuator.counters.inc("cgroup_failed", "no-cgroup")
            log.warning("[%s] no cgroup v2 directory for pid %d (%s): no cgroup clamps", b.vm, b.pid, exc)
            return
        paths = self._cgroup_paths(b)
        for key, path in paths.items():
            self.threaded.enter(path, b.cgroup_home,
                                [t for v, t in b.tids.items() if self._cgroup_key(b, v) == key])
        log.info("[%s] vCPU threads moved into %s", b.vm, ", ".join(str(p) for p in paths.values()))
        self._apply(b, [])  # what the engine holds already (a value a predecessor wrote is not written again)
        self._apply_caps(b)

    def _leave_cgroups(self, b: VmBinding) -> None:
        """Clamps back to what they were; threads out of the cgroups the service made, which go."""
        if b.cgroup_home is None:
            for path in self._cgroup_paths(b).values():
                self.cgroups.restore(path)
            return
        # From what was made, not from the template: the engine may be reconfigured already.
        for path in [p for p, m in self.threaded.made.items() if m.home == b.cgroup_home]:
            self.cgroups.restore(path)
            self.threaded.leave(path)
        b.cgroup_home = None

    def detach(self, vm: str) -> None:
        """The VM's QEMU went away: no boost stays, every thread gets its original state."""
        b = self.vms.get(vm)
        if b is None:
            return
        if isinstance(b.engine, CClampEngine):
            b.engine.set_threads({})  # the lane stops clamping before the threads are restored
            for v, applied in b.engine.vcpus.items():
                tid = b.tids.get(v)
                if tid is not None and applied is not None:
                    self.actuator.clamps.setdefault(tid, applied)  # restore() puts the original clamp back
        self._apply(b, b.engine.release_all())
        for tid in b.tids.values():
            self.actuator.restore(tid)
        self._leave_cgroups(b)
        b.tids.clear()
        b.pid = None
        b.latest.clear()
        self._cancel(b)

    def cgroup_paths(self, vm: str) -> list[Path]:
        """The cgroups ``vm``'s clamps are written to (none before a managed layout is made)."""
        b = self.vms.get(vm)
        return list(self._cgroup_paths(b).values()) if b is not None else []

    def close(self) -> None:
        for vm in list(self.vms):
            self.detach(vm)
        self.actuator.restore_all()
        self.cgroups.restore_all()
        self.threaded.leave_all()

    # -- Policy interface ---------------------------------------------------------------
    def on_record(self, vm: str, record: Record, domain: Domain, now: float) -> Decision:
        b = self.vms.get(vm)
        if b is None:
            return Decision(vm, record.vcpu, record.util, schedutil_khz(record.util, domain), now)
        self._decide(b, {record.vcpu: (record.util, record.perf_khz)}, lambda _v: domain, now)
        return b.latest[record.vcpu]

    def on_records(self, vm: str, records: list[tuple[int, int, int]], config: DeviceConfig, now: float) -> None:
        """One drain's records: the engine sees each vCPU's newest (newest wins, as it would anyway)."""
        b = self.vms.get(vm)
        if b is not None:
            self._decide(b, {v: (u, p) for v, u, p in records}, config.domain_of, now)

    def _decide(self, b: VmBinding, newest: dict[int, tuple[int, int]], domain_of: Callable[[int], Domain],
                now: float) -> None:
        """Feed the engine each vCPU's (util, perf_khz), apply what changed, remember the decisions."""
        changes: list[ClampChange] = []
        for v, (u, p) in newest.items():
            changes += b.engine.on_record(v, u, p, now)
        self._apply(b, changes)
        self._arm(b)
        applied = b.engine.vcpus
        for v, (u, _) in newest.items():
            b.latest[v] = Decision(b.vm, v, u, schedutil_khz(u, domain_of(v)), now, applied.get(v))

    def on_vm_reset(self, vm: str) -> None:
        b = self.vms.get(vm)
        if b is not None:
            self._apply(b, b.engine.release_all())
            b.latest.clear()

    # -- internals --------------------------------------------------------------------------
    def _apply(self, b: VmBinding, changes: list[ClampChange], *, force: bool = False) -> None:
        if not changes and not force:
            return
        if b.cgroup is None:
            for c in changes:
                tid = b.tids.get(c.vcpu)
                if tid is not None:
                    self.actuator.clamp(tid, c.uclamp_min)
            return
        # One cgroup per vCPU, per domain or per VM: each gets the highest clamp of its vCPUs.
        paths = self._cgroup_paths(b)
        keys = {v: self._cgroup_key(b, v) for v in b.engine.vcpus}
        for key, value in domain_clamps(b.engine.vcpus, keys).items():
            path = paths.get(key)
            if path is not None and (force or self.cgroups.values.get(path) != value):
                self.cgroups.clamp(path, value)

    def caps(self, vm: str) -> dict[int, int]:
        """Each vCPU's power cap (uclamp_max, 1024: none) as the VM's engine holds it."""
        b = self.vms.get(vm)
        if b is None:
            return {}
        return {v: effective_cap(b.engine.placement(v), b.engine.limits) for v in b.engine.vcpus}

    def _apply_caps(self, b: VmBinding, caps: dict[int, int] | None = None, *, rising_only: bool = False) -> None:
        """Write each vCPU's cap (``caps``, by default the engine's) where its clamps go; 1024 takes
        the service's cap away.  ``rising_only``: only the caps that go up (before the engine may use them)."""
        want = caps if caps is not None else self.caps(b.vm)
        if b.cgroup is None:
            for v, tid in b.tids.items():
                new = want.get(v, CAPACITY_SCALE)
                have = self.actuator.caps.get(tid, CAPACITY_SCALE)
                if new != have and (not rising_only or new > have):
                    self.actuator.cap(tid, new if new < CAPACITY_SCALE else None)
            return
        # One cgroup holds several vCPUs: it gets the highest of their caps (the engine still bounds
        # each vCPU's clamp by its own).
        paths = self._cgroup_paths(b)
        per: dict[int, int] = {}
        for v in b.engine.vcpus:
            k = self._cgroup_key(b, v)
            per[k] = max(per.get(k, 0), want.get(v, CAPACITY_SCALE))
        for key, value in per.items():
            path = paths.get(key)
            if path is None:
                continue
            have = self.cgroups.max_values.get(path, CAPACITY_SCALE)
            if value != have and (not rising_only or value > have):
                self.cgroups.cap(path, value if value < CAPACITY_SCALE else None)

    @staticmethod
    def _cgroup_key(b: VmBinding, vcpu: int) -> int:
        """Which of the VM's cgroups ``vcpu`` is in: its own, its domain's, or the VM's one (0)."""
        assert b.cgroup is not None
        if "{vcpu}" in b.cgroup:
            return vcpu
        if "{domain}" in b.cgroup:
            return b.engine.placement(vcpu).domain
        return 0

    @classmethod
    def _cgroup_paths(cls, b: VmBinding) -> dict[int, Path]:
        """Cgroup key (vCPU, domain or 0) -> directory, from the VM's template."""
        if b.cgroup is None:
            return {}
        managed = b.cgroup.startswith("{qemu}/")
        if managed and b.cgroup_home is None:
            return {}  # not made yet: the clamps are written once the threads are in
        home = str(b.cgroup_home) if managed else ""
        out: dict[int, Path] = {}
        for v in b.engine.vcpus:
            key = cls._cgroup_key(b, v)
            out[key] = Path(b.cgroup.format(qemu=home, vcpu=v, domain=key))
        return out

    def _arm(self, b: VmBinding) -> None:
        due = b.engine.next_deadline()
        if due is None:
            return
        if b.timer is not None and b.timer.when() <= self._loop_time(due):
            return
        self._cancel(b)
        loop = asyncio.get_running_loop()
        b.timer = loop.call_at(self._loop_time(due), self._fire, b)

    def _loop_time(self, t: float) -> float:
        # Engine times are on self.clock; asyncio's are on loop.time(): convert.
        loop = asyncio.get_running_loop()
        return loop.time() + (t - self.clock())

    def _fire(self, b: VmBinding) -> None:
        b.timer = None
        if self.vms.get(b.vm) is not b:
            return
        self._apply(b, b.engine.tick(self.clock()))
        if b.engine.next_deadline() is not None:
            self._arm(b)

    @staticmethod
    def _cancel(b: VmBinding) -> None:
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
