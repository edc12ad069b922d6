"""The host side of a VM: pinning plan, vCPU threads, clamps, and CPU hotplug.

Theory of operation: when a VM is added, a placement plan is made in its
pinning mode (``policy/placement.py``: ``auto`` 1:1 across capacity classes
on pCPUs no other VM holds, or unpinned when that does not fit; an explicit
list, shared pCPUs allowed; ``keep``; ``none``) and turned into the
vCPU-to-domain map its device publishes, and into the placements its clamp
engine works with.  When a front-end connects, its vCPU threads are found
(QMP or /proc), checked to be tasks of the very process on the socket, and
pinned where the plan pins; in ``keep`` mode their current affinity is read
instead, and the plan follows it.  When it goes, every thread gets its
original state back.  A reload that changes the mode re-plans in place, with
the front-end connected.  On CPU hotplug the host model is rebuilt; a VM
whose pCPU went offline is re-planned, re-pinned, and its guest told the new
domain map through a config change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..defaults import KICK_BATCH_DELAY
from ..host.hotplug import CpuHotplugMonitor
from ..host.policy import HostPolicy, VmBinding
from ..host.sysfs_source import SysfsSource
from ..host.vcpu_threads import discover_threads
from ..cpufreq.hostfreq import HostDomain, advertised
from ..policy.engine import VcpuPlacement, domain_cap
from ..policy.placement import PinPlan, home_cpu, plan_placement
from ..vhost.transport import Connection
from .config import ConfigError, VmSettings
from .vms import Service, VmConfig, VmSlot

__all__ = ["HostSide", "VmPlan"]

log = logging.getLogger("vhost_user_cpufreq.host")

#: How long to keep looking for a new QEMU's vCPU threads (it creates them after connecting).
DISCOVERY_TIMEOUT = 30.0
#: keep: seconds between two readings of the kept threads' affinity.  libvirt applies <vcpupin>
#: after QEMU has connected (and a manager may re-pin any time): the first reading can precede it.
KEEP_RECHECK = 1.0


@dataclass(frozen=True, slots=True)
class VmPlan:
    pins: PinPlan  # the mode in force, what is pinned where, where each vCPU may run
    vcpu_host_domain: tuple[int, ...]  # index into the source's snapshot
    placements: tuple[VcpuPlacement, ...]

    @property
    def pinning(self) -> tuple[int | None, ...]:
        """The pCPU each vCPU is pinned to (None: not pinned by the service)."""
        return self.pins.pinned


class HostSide:
    def __init__(self, service: Service, source: SysfsSource, policy: HostPolicy) -> None:
        self.service = service
        self.source = source
        self.policy = policy
        self.settings: dict[str, VmSettings] = {}
        self.plans: dict[str, VmPlan] = {}
        #: keep mode: each vCPU's affinity as its thread had it when found
        self.adopted: dict[str, dict[int, frozenset[int]]] = {}
        self.hotplug: CpuHotplugMonitor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        service.session_hooks.append(self._on_connect)
        service.close_hooks.append(self._on_close)

    # -- planning ----------------------------------------------------------------------
    def plan(self, s: VmSettings, *, exclude_vm: str | None = None,
             affinities: Mapping[int, Iterable[int]] | None = None) -> VmPlan:
        """Place ``s``'s vCPUs (ValueError if an explicit list names a CPU that is not online)."""
        model = self.source.model
        # auto never pins onto a pCPU another VM is pinned to; unpinned VMs hold none.
        taken = {c for vm, p in self.plans.items() if vm != exclude_vm for c in p.pinning if c is not None}
        classes = list(model.capacity_classes().values())
        pins = plan_placement(s.vcpus, s.pinning, classes, taken=taken,
                              affinities=affinities if affinities is not None else self.adopted.get(s.name))
        snap = model.snapshot()
        capacity = {c.id: c.capacity for c in model.cpus if c.online}
        doms: list[int] = []
        places: list[VcpuPlacement] = []
        for vcpu, (pinned, allowed) in enumerate(zip(pins.pinned, pins.allowed)):
            home = pinned if pinned is not None else home_cpu(allowed, capacity)
            d = model.domain_of_cpu(home)
            if d is None:
                raise ValueError(f"vm.{s.name}: pCPU {home} is offline or has no frequency domain")
            doms.append(d)
            places.append(self._placement(s, vcpu, pinned, capacity.get(home, 1024), snap.domains[d], d))
        return VmPlan(pins, tuple(doms), tuple(places))

    def _placement(self, s: VmSettings, vcpu: int, pinned: int | None, pcpu_capacity: int, dom: HostDomain,
                   d: int) -> VcpuPlacement:
        # The guest is told its vCPU's capacity is its domain's (config space), so the two match; a VM
        # with slower vCPUs (max_khz) is told less, and its threads are capped at that top (domain_cap).
        top, vcpu_capacity = advertised(dom.max_khz, dom.capacity, s.max_khz)
        cap = domain_cap(top, dom.max_khz, pcpu_capacity, self.policy.config.headroom)
        return VcpuPlacement(vcpu, pinned, pcpu_capacity, vcpu_capacity, dom.max_khz, d, cap)

    def check(self, vms: Iterable[VmSettings], source: str) -> None:
        """Refuse, naming the file and key, a configuration whose placement cannot be made here."""
        for s in vms:
            try:
                plan_placement(s.vcpus, s.pinning, list(self.source.model.capacity_classes().values()))
            except ValueError as exc:
                raise ConfigError(f"{source}: vm.{s.name}.pinning: {exc}") from None

    def _announce(self, slot: VmSlot, plan: VmPlan) -> None:
        pins = plan.pins
        if pins.note:
            slot.counters.inc("pinning_fallback", pins.mode)
            slot.log.warning("%s", pins.note)
        if pins.pins:
            slot.log.info("pinning plan: %s", ", ".join(f"vCPU{v}->CPU{p}" for v, p in enumerate(pins.pinned)))
        else:
            slot.log.info("pinning %s: affinity left alone; vCPUs decided for host domains %s", pins.mode,
                          ", ".join(f"vCPU{p.vcpu}->{p.domain}" for p in plan.placements))

    def _bind(self, s: VmSettings, plan: VmPlan) -> VmBinding:
        """Make ``plan`` the VM's, and hand its placements and limits to the policy."""
        self.plans[s.name] = plan
        return self.policy.bind(s.name, plan.placements, s.limits, cgroup=s.cgroup if s.clamp == "cgroup" else None)

    async def add_vm(self, s: VmSettings, *, notify_interval: float, mirror_threshold: float,
                     listen_sock: socket.socket | None = None, kick_batch_delay: float = KICK_BATCH_DELAY,
                     listen: bool = True) -> VmSlot:
        plan = self.plan(s)
        slot = await self.service.add_vm(
            VmConfig(s.name, s.socket, plan.vcpu_host_domain, s.socket_mode, notify_interval, mirror_threshold,
                     s.socket_owner, s.socket_group, kick_batch_delay, shared_page=s.shared_page, max_khz=s.max_khz),
            listen_sock=listen_sock, listen=listen)
        # Recorded only once the socket is up: a VM that failed to start leaves nothing to undo.
        self.settings[s.name] = s
        self._bind(s, plan)
        self._announce(slot, plan)
        return slot

    def replan(self, s: VmSettings) -> None:
        """Apply ``s`` (a changed pinning mode, limits or clamp mechanism) to a VM in place: its front-end stays connected."""
        old = self.plans[s.name]
        mechanism_changed = self.settings[s.name].clamp != s.clamp
        if mechanism_changed:
            # "none" touches no thread, and by-thread and by-cgroup clamps do not mix: the old
            # mechanism gives every thread back before the new one (if any) takes them.
            self.policy.detach(s.name)
        if s.pinning != "keep":
            self.adopted.pop(s.name, None)
        new = self.plan(s, exclude_vm=s.name)
        self.settings[s.name] = s
        b = self._bind(s, new)
        if b.tids:
            # Threads the old plan pinned and the new one does not get their own affinity back.
            self.policy.attach_threads(s.name, b.tids, unpin=[b.tids[v] for v in b.tids
                                                              if old.pinning[v] is not None and new.pinning[v] is None])
        slot = self.service.vms.get(s.name)
        if slot is not None and mechanism_changed and slot.connection is not None \
                and not slot.connection.closed.done():
            self._on_connect(slot, slot.connection)  # the new mechanism finds the threads as at a connect
        if slot is not None:
            if new.vcpu_host_domain != old.vcpu_host_domain or slot.device.max_khz != s.max_khz:
                slot.device.max_khz = s.max_khz  # the guest is told its new top by a config change
                slot.device.remap(new.vcpu_host_domain)
            self._announce(slot, new)

    async def remove_vm(self, name: str) -> None:
        await self.service.remove_vm(name)
        self.policy.detach(name)
        self.policy.vms.pop(name, None)
        self.settings.pop(name, None)
        self.plans.pop(name, None)
        self.adopted.pop(name, None)

    # -- connections -------------------------------------------------------------------
    def _on_connect(self, slot: VmSlot, conn: Connection) -> None:
        s = self.settings.get(slot.config.name)
        if s is None or s.clamp == "none":
            return
        task = asyncio.get_running_loop().create_task(self._attach(slot, conn, s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attach(self, slot: VmSlot, conn: Connection, s: VmSettings) -> None:
        # QEMU connects the vhost-user chardev while it realizes the device,
        # before it creates its vCPU threads: look again until all are there.
        tids: dict[int, int] = {}
        delay = 0.05
        deadline = asyncio.get_running_loop().time() + DISCOVERY_TIMEOUT
        while not conn.closed.done():
            try:
                tids = await discover_threads(conn.peer_pid, s.qmp)
            except Exception as exc:  # noqa: BLE001 - a VM we cannot see into is served without clamps
                slot.counters.inc("thread_discovery_failed", getattr(exc, "reason", type(exc).__name__))
                slot.log.warning("no vCPU threads for pid %d: %s; serving without pinning or clamps",
                                 conn.peer_pid, exc)
                return
            if len(tids) >= s.vcpus or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if conn.closed.done():
            return
        if slot.peer_alive is not None and not slot.peer_alive():
            # The process identified at accept is gone or its pid names another one now: touch nothing.
            slot.counters.inc("thread_discovery_failed", "peer-gone")
            conn.close("the identified QEMU process is gone")
            return
        if len(tids) != s.vcpus:
            slot.log.warning("found %d vCPU threads, configured %d vCPUs", len(tids), s.vcpus)
        if s.pinning == "keep":
            self._adopt(slot, s, tids)
        self.policy.attach_threads(s.name, tids, conn.peer_pid)
        slot.counters.inc("threads_attached", n=len(tids))

    def _adopt(self, slot: VmSlot, s: VmSettings, tids: Mapping[int, int], *, quiet: bool = False) -> None:
        """keep: read each vCPU thread's affinity (libvirt's, the VMM's) and decide for where it may run."""
        found: dict[int, frozenset[int]] = {}
        for v, tid in tids.items():
            try:
                found[v] = frozenset(os.sched_getaffinity(tid))
            except OSError as exc:
                if quiet:
                    return  # a thread gone (its QEMU exiting): the close hooks deal with the VM
                slot.log.warning("cannot read the affinity of vCPU %d's thread %d: %s", v, tid, exc.strerror)
        before = self.adopted.get(s.name)
        if quiet and found == before:
            return
        if before is not None and found != before:
            slot.log.info("the kept vCPU threads' affinity changed (%s): deciding again", ", ".join(
                f"vCPU {v} {_cpu_list(before.get(v, frozenset()))} -> {_cpu_list(c)}"
                for v, c in sorted(found.items()) if before.get(v) != c))
        self.adopted[s.name] = found
        new = self.plan(s, exclude_vm=s.name)
        old = self.plans[s.name]
        if new == old:
            return
        self._bind(s, new)
        if new.vcpu_host_domain != old.vcpu_host_domain:
            slot.device.remap(new.vcpu_host_domain)  # the guest learns its vCPUs' domains by a config change
        self._announce(slot, new)

    def _on_close(self, slot: VmSlot, conn: Connection) -> None:
        self.policy.detach(slot.config.name)

    def start_keep_watch(self) -> None:
        """Follow the affinity of kept threads (see KEEP_RECHECK)."""
        task = asyncio.get_running_loop().create_task(self._keep_watch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_watch(self) -> None:
        while True:
            await asyncio.sleep(KEEP_RECHECK)
            for name, s in list(self.settings.items()):
                b = self.policy.vms.get(name)
                slot = self.service.vms.get(name)
                if s.pinning == "keep" and name in self.adopted and b is not None and b.tids and slot is not None:
                    try:
                        self._adopt(slot, s, b.tids, quiet=True)
                    except Exception:  # noqa: BLE001 - one VM's trouble must not stop the others being followed
                        slot.log.exception("cannot decide the kept vCPUs again")

    # -- hotplug -------------------------------------------------------------------------
    def start_hotplug(self) -> bool:
        self.hotplug = CpuHotplugMonitor(self.on_cpus_changed, loop=asyncio.get_running_loop())
        return self.hotplug.start()

    def on_cpus_changed(self) -> None:
        """Rebuild the model; re-plan every VM that lost a pCPU; refresh every VM's map."""
        self.source.rebuild()
        online = set(self.source.model.online_cpus())
        for name, s in list(self.settings.items()):
            old = self.plans[name]
            lost = [c for c in old.pinning if c is not None and c not in online]
            try:
                if lost and old.pins.mode == "explicit":
                    log.warning("[%s] pinned pCPUs %s went offline; explicit pinning kept, vCPUs unpinned there",
                                name, lost)
                    continue
                # auto: a new 1:1 plan where a pCPU went; the others: where each vCPU may run changed.
                new = self.plan(s, exclude_vm=name) if lost or not old.pins.pins else self._replan_same(s, old)
            except ValueError as exc:
                log.warning("[%s] cannot re-plan after hotplug: %s", name, exc)
                continue
            if new == old:
                continue
            b = self._bind(s, new)
            if b.tids:
                self.policy.attach_threads(name, b.tids)
            slot = self.service.vms.get(name)
            if slot is not None:
                # Indices may match while the domains behind them changed: always remap.
                slot.device.remap(new.vcpu_host_domain)
            if lost:
                log.info("[%s] re-pinned after hotplug: %s", name, new.pinning)

    def _replan_same(self, s: VmSettings, old: VmPlan) -> VmPlan:
        # Same pCPUs; domain indices may have shifted in the rebuilt snapshot.
        model = self.source.model
        snap = model.snapshot()
        capacity = {c.id: c.capacity for c in model.cpus}
        doms: list[int] = []
        places: list[VcpuPlacement] = []
        for p in old.placements:
            assert p.pcpu is not None  # only pinned plans come here
            d = model.domain_of_cpu(p.pcpu)
            if d is None:
                raise ValueError(f"vm.{s.name}: pCPU {p.pcpu} is offline or has no frequency domain")
            doms.append(d)
            places.append(self._placement(s, p.vcpu, p.pcpu, capacity.get(p.pcpu, 1024), snap.domains[d], d))
        return VmPlan(old.pins, tuple(doms), tuple(places))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.hotplug is not None:
            self.hotplug.close()
        for name in list(self.settings):
            await self.remove_vm(name)
        self.policy.close()


def _cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(map(str, sorted(cpus))) or "none"
