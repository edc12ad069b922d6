"""The host side of a VM: pinning plan, vCPU threads, clamps, and CPU hotplug.

Theory of operation: when a VM is added, a 1:1 pinning plan is made (from
its configuration or automatically across capacity classes, never on a pCPU
another VM holds) and turned into the vCPU-to-domain map its device
publishes, and into the placements its clamp engine works with.  When a
front-end connects, its vCPU threads are found (QMP or /proc), checked to be
tasks of the very process on the socket, and pinned.  When it goes, every
thread gets its original state back.  On CPU hotplug the host model is
rebuilt; a VM whose pCPU went offline is re-planned, re-pinned, and its guest
told the new domain map through a config change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from dataclasses import dataclass

from ..defaults import KICK_BATCH_DELAY
from ..host.hotplug import CpuHotplugMonitor
from ..host.policy import HostPolicy
from ..host.sysfs_source import SysfsSource
from ..host.vcpu_threads import discover_threads
from ..policy.engine import VcpuPlacement, plan_pinning
from ..vhost.transport import Connection
from .config import VmSettings
from .vms import Service, VmConfig, VmSlot

__all__ = ["HostSide", "VmPlan"]

log = logging.getLogger("vhost_user_cpufreq.host")

#: How long to keep looking for a new QEMU's vCPU threads (it creates them after connecting).
DISCOVERY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class VmPlan:
    pinning: tuple[int, ...]  # pCPU of each vCPU
    vcpu_host_domain: tuple[int, ...]  # index into the source's snapshot
    placements: tuple[VcpuPlacement, ...]


class HostSide:
    def __init__(self, service: Service, source: SysfsSource, policy: HostPolicy) -> None:
        self.service = service
        self.source = source
        self.policy = policy
        self.settings: dict[str, VmSettings] = {}
        self.plans: dict[str, VmPlan] = {}
        self.hotplug: CpuHotplugMonitor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        service.session_hooks.append(self._on_connect)
        service.close_hooks.append(self._on_close)

    # -- planning ----------------------------------------------------------------------
    def plan(self, s: VmSettings, *, exclude_vm: str | None = None) -> VmPlan:
        model = self.source.model
        taken = {c for vm, p in self.plans.items() if vm != exclude_vm for c in p.pinning}
        classes = list(model.capacity_classes().values())
        pinning = plan_pinning(s.vcpus, classes, taken=taken, explicit=s.pinning)
        snap = model.snapshot()
        capacity = {c.id: c.capacity for c in model.cpus}
        doms: list[int] = []
        places: list[VcpuPlacement] = []
        for vcpu, pcpu in enumerate(pinning):
            d = model.domain_of_cpu(pcpu)
            if d is None:
                raise ValueError(f"vm.{s.name}: pCPU {pcpu} is offline or has no frequency domain")
            doms.append(d)
            dom = snap.domains[d]
            # The guest is told its vCPU's capacity is its domain's (config space), so the two match.
            places.append(VcpuPlacement(vcpu, pcpu, capacity.get(pcpu, 1024), dom.capacity, dom.max_khz, d))
        return VmPlan(pinning, tuple(doms), tuple(places))

    async def add_vm(self, s: VmSettings, *, notify_interval: float, mirror_threshold: float,
                     listen_sock: socket.socket | None = None, kick_batch_delay: float = KICK_BATCH_DELAY) -> VmSlot:
        plan = self.plan(s)
        slot = await self.service.add_vm(
            VmConfig(s.name, s.socket, plan.vcpu_host_domain, s.socket_mode, notify_interval, mirror_threshold,
                     s.socket_owner, s.socket_group, kick_batch_delay, shared_page=s.shared_page),
            listen_sock=listen_sock)
        # Recorded only once the socket is up: a VM that failed to start leaves nothing to undo.
        self.settings[s.name] = s
        self.plans[s.name] = plan
        self.policy.bind(s.name, plan.placements, s.limits, cgroup=s.cgroup if s.clamp == "cgroup" else None)
        slot.log.info("pinning plan: %s", ", ".join(f"vCPU{v}->CPU{p}" for v, p in enumerate(plan.pinning)))
        return slot

    async def remove_vm(self, name: str) -> None:
        await self.service.remove_vm(name)
        self.policy.detach(name)
        self.policy.vms.pop(name, None)
        self.settings.pop(name, None)
        self.plans.pop(name, None)

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
        if len(tids) != s.vcpus:
            slot.log.warning("found %d vCPU threads, configured %d vCPUs", len(tids), s.vcpus)
        self.policy.attach_threads(s.name, tids, conn.peer_pid)
        slot.counters.inc("threads_attached", n=len(tids))

    def _on_close(self, slot: VmSlot, conn: Connection) -> None:
        self.policy.detach(slot.config.name)

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
            lost = [c for c in old.pinning if c not in online]
            try:
                if lost and s.pinning is None:
                    new = self.plan(s, exclude_vm=name)
                elif lost:
                    log.warning("[%s] pinned pCPUs %s went offline; explicit pinning kept, vCPUs unpinned there",
                                name, lost)
                    continue
                else:
                    new = self._replan_same(s, old)
            except ValueError as exc:
                log.warning("[%s] cannot re-plan after hotplug: %s", name, exc)
                continue
            if new == old:
                continue
            self.plans[name] = new
            b = self.policy.bind(name, new.placements, s.limits, cgroup=s.cgroup if s.clamp == "cgroup" else None)
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
        return self.plan(dataclasses.replace(s, pinning=old.pinning), exclude_vm=s.name)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.hotplug is not None:
            self.hotplug.close()
        for name in list(self.settings):
            await self.remove_vm(name)
        self.policy.close()
