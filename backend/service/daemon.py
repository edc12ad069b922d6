"""The long-running service: configuration, sockets, sampling, reload, status, systemd.

Theory of operation: :class:`Daemon` owns one :class:`~.service.vms.Service` (the
vhost-user sockets and sessions), the host side (sysfs model and sampler,
clamp policy, hotplug), an optional control socket answering ``status``, and
an optional Prometheus endpoint.  ``reload`` applies a new configuration
without dropping connected VMs: VMs that appear are added, VMs that vanish are
removed, VMs whose limits changed get new limits in place; a VM whose socket
or vCPU count changed is re-created (its front-end must reconnect).  An
invalid file is rejected whole and the old configuration stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import time
from typing import Any

from vhost_user_cpufreq.protocol.session_snapshot import SnapshotError
from vhost_user_cpufreq.protocol.session_snapshot import decode as decode_snapshot

from ..counters import Counters
from ..dataplane.guard import guard
from ..dataplane.lane import running_lanes
from ..host.actuators import Original, ThreadActuator
from ..host.policy import HostPolicy
from ..host.statefile import StateFile, recover, thread_start_time
from ..host.sysfs_source import SysfsSource
from . import systemd
from ..host.cgroups import adopt_cgroups, recover_cgroups
from .config import ConfigError, ServiceConfig, VmSettings, load_config
from .control_api import ControlApi
from .handover import Taken, give_over
from .metrics_view import DaemonView, HostView, VmView
from .registry import Registry
from .shared_socket import SharedSocket
from .vm_host import HostSide
from .vms import Service

__all__ = ["Daemon", "query_status"]

log = logging.getLogger("vhost_user_cpufreq")


class Daemon:
    def __init__(self, config: ServiceConfig, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.time()
        self.counters = Counters()  # service-wide: reloads, control requests
        self.source = SysfsSource(config.sysfs_root, nominal_khz=config.nominal_khz)
        self.state = StateFile(config.state_file) if config.state_file else None
        self.actuator = ThreadActuator(self.counters, dry_run=config.dry_run, state=self.state)
        self.policy = HostPolicy(self.actuator, config=config.engine)
        self.service = Service(self.source, self.policy, allowed_uids=config.allowed_uids,
                               allowed_gids=config.allowed_gids, lane_slice_us=config.lane_slice_us)
        self.host = HostSide(self.service, self.source, self.policy)
        self.registry = Registry(config.state_dir)  # VMs managers registered (control_api.py)
        self.shared: SharedSocket | None = None  # the one socket for every VM (shared_socket.py)
        self.control_api = ControlApi(config, self.registry, None)
        self._tasks: list[asyncio.Task[None]] = []
        self._control: asyncio.AbstractServer | None = None
        self.metrics_server: Any = None
        self.stopping = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, inherited: dict[str, socket.socket] | None = None, taken: Taken | None = None) -> None:
        """Serve; ``taken``: what a predecessor handed over (its listening sockets and live sessions)."""
        inherited = dict(inherited or {})
        if taken is not None:
            inherited.update(taken.listeners)
        # Before any front-end: guest memory faults and stray SIGBUS are handled from the
        # start, and every VM's fds fit (systemd's soft limit is 1024, its hard limit far more).
        guard()
        _raise_fd_limit()
        self.registry.load(set(self.config.classes))  # unreadable: the start fails, naming the file
        if self.config.metrics_address:
            # First: a port in use must fail the start before any VM socket is bound.
            from .metrics import start_metrics_server

            self.metrics_server = start_metrics_server(self, self.config.metrics_address)
        if self.state is not None and taken is not None:
            # The predecessor's changes to threads are ours now: kept, and undone when a VM goes.
            self.counters.inc("adopted_threads", n=_adopt_threads(self.state, self.actuator))
            self.counters.inc("adopted_cgroups", n=adopt_cgroups(self.state, self.policy.threaded))
        elif self.state is not None:
            # A previous instance killed without cleanup left threads pinned/clamped: undo that first.
            self.counters.inc("recovered_cgroups", n=recover_cgroups(self.state))
            restored, gone = recover(self.state, self.actuator.restore_record)
            self.counters.inc("recovered_threads", n=restored)
        # (sysfs logs its own degraded mode, once)
        if self.actuator.degraded:
            log.warning("util clamps degraded: %s", self.actuator.degraded)
        self.host.check(self.config.vms.values(), self.config.source)
        for s in self.config.vms.values():
            await self._add_vm(s, inherited.pop(s.name, None))
        for name, sock in inherited.items():
            log.warning("inherited socket %r matches no configured VM; closing it", name)
            sock.close()
        if self.config.shared_socket:
            self.shared = SharedSocket(self.host, self.config, self.registry, self.counters)
            self.shared.start()
            self.control_api.shared = self.shared
        if taken is not None:
            resumed = 0
            for raw, fds in taken.sessions:
                resumed += await self._resume(raw, fds)
            self.counters.inc("handovers_taken" if taken.origin == "handover" else "fdstore_restores")
            if taken.not_carried:
                self.counters.inc("handover_dropped", "not-carried", n=taken.not_carried)
                log.error("the previous process could not hand %d session(s) over (see its log)", taken.not_carried)
            for vm, reason in taken.dropped:  # refused before resume (service/fdstore.py logged why)
                slot = self.service.vms.get(vm)
                (slot.counters if slot is not None else self.counters).inc("handover_dropped", reason)
            src = f"pid {taken.old_pid}" if taken.origin == "handover" else "systemd's fd store"
            log.info("took over from %s: %d of %d sessions resumed", src, resumed,
                     len(taken.sessions) + len(taken.dropped))
        self.host.start_hotplug()
        self.host.start_keep_watch()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.source.run(self.config.sample_period, rebuild_every=30.0)))
        if self.config.control_socket:
            self._control = await _control_server(self.config.control_socket, self._control_request,
                                                  self._give_over)
            if self.config.control_socket_group is not None:
                # Managers in this group may use the control API (and status): the socket's mode is the check.
                os.chown(self.config.control_socket, -1, self.config.control_socket_group)
                os.chmod(self.config.control_socket, 0o660)
        interval = systemd.watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        systemd.notify(f"READY=1\nSTATUS={self.status_line()}")
        log.info("ready: %s", self.status_line())

    async def _add_vm(self, s: VmSettings, sock: socket.socket | None = None) -> None:
        notify_interval = 1.0 / self.config.max_notifications_per_second
        await self.host.add_vm(s, notify_interval=notify_interval, mirror_threshold=self.config.mirror_threshold,
                               listen_sock=sock, kick_batch_delay=self.config.kick_batch_delay)

    async def stop(self) -> None:
        systemd.notify("STOPPING=1")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        if self._control is not None:
            self._control.close()
            await self._control.wait_closed()
            _unlink(self.config.control_socket)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.shared is not None:
            await self.shared.close()
        await self.host.close()
        self.source.close()
        log.info("stopped; every vCPU thread restored")

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- metrics -------------------------------------------------------------------------
    def metrics_view(self) -> DaemonView:
        """What the exporter shows, copied out; runs on the exporter's thread, so it only reads."""
        vms: dict[str, VmView] = {}
        for vm, slot in list(self.service.vms.items()):  # copy: the loop may add or remove VMs meanwhile
            binding = self.policy.vms.get(vm)
            vms[vm] = VmView(
                counters=slot.counters.snapshot(),
                latency=slot.counters.histogram("kick_to_decision_seconds"),
                connected=slot.connection is not None,
                config=slot.device.config,
                utils=tuple(st.util for st in list(slot.device.vcpus)),
                clamps=dict(binding.engine.vcpus) if binding is not None else {},
                freq_page=slot.device.freq_path == "page",
                caps=self.policy.caps(vm),
            )
        model, hp = self.source.model, self.host.hotplug
        host = HostView(
            domains=model.snapshot().domains,
            cpufreq_degraded=model.degraded is not None,
            samples=self.source.samples, changes=self.source.changes,
            read_errors=self.source.read_errors, rebuilds=self.source.rebuilds,
            hotplug_events=hp.hotplug_events if hp is not None else 0,
            hotplug_available=hp is not None and hp.available,
        )
        return DaemonView(vms=vms, counters=self.counters.snapshot(), host=host,
                          uclamp_degraded=self.actuator.degraded is not None, started=self.started)

    # -- reload --------------------------------------------------------------------------
    async def reload(self, new: ServiceConfig | None = None) -> list[str]:
        """Apply a new configuration; returns what changed.  Raises ConfigError, keeping the old one."""
        if new is None:
            if self.config_path is None:
                raise ConfigError("no configuration file to reload (started from flags)")
            new = load_config(self.config_path)
        old = self.config
        fixed = ("sysfs_root", "control_socket", "metrics_address", "dry_run", "state_file", "lane_slice_us",
                 "shared_socket", "shared_socket_mode", "shared_socket_group", "state_dir", "control_socket_group")
        for key in fixed:
            if getattr(new, key) != getattr(old, key):
                raise ConfigError(f"{new.source}: service.{key}: cannot change on reload (restart the service)")
        # Every placement checked before anything changes: a rejected reload leaves the old one running.
        self.host.check(new.vms.values(), new.source)
        if self.shared is not None:
            self.shared.check_names(new)
        changes: list[str] = []
        for name in [n for n in old.vms if n not in new.vms]:
            await self.host.remove_vm(name)
            changes.append(f"removed {name}")
        for name, s in new.vms.items():
            o = old.vms.get(name)
            if o == s:
                continue
            if o is not None and (o.socket, o.vcpus, o.socket_mode, o.socket_owner, o.socket_group) != (
                    s.socket, s.vcpus, s.socket_mode, s.socket_owner, s.socket_group):
                await self.host.remove_vm(name)
                o = None
            if o is None:
                await self._add_vm(s)
                changes.append(f"added {name}")
            else:
                # Pinning, limits, QMP socket, clamp mechanism: applied in place; the front-end stays connected.
                self.host.replan(s)
                changes.append(f"updated {name}")
        self.config = new
        self.control_api.config = new
        if self.shared is not None:
            self.shared.reconfigure(new)  # new classes and limits reach the VMs on the shared socket
        self.counters.inc("reloads")
        systemd.notify(f"STATUS={self.status_line()}")
        return changes

    async def reload_from_signal(self) -> None:
        systemd.notify("RELOADING=1")
        try:
            changes = await self.reload()
            log.info("reloaded %s: %s", self.config_path, ", ".join(changes) or "no changes")
        except ConfigError as exc:
            self.counters.inc("reload_failed")
            log.error("reload rejected, keeping the running configuration: %s", exc)
        systemd.notify(f"READY=1\nSTATUS={self.status_line()}")

    # -- status --------------------------------------------------------------------------
    def status_line(self) -> str:
        connected = sum(1 for s in self.service.vms.values() if s.connection is not None)
        return f"serving {len(self.service.vms)} VMs, {connected} connected"

    def _pin_applied(self, tid: int | None, pcpu: int | None) -> bool | None:
        if pcpu is None or tid is None:
            return None  # nothing to pin, or its thread not found yet
        return self.actuator.pinned.get(tid) == pcpu

    def status(self) -> dict[str, Any]:
        model = self.source.model
        vms = {}
        for name, slot in self.service.vms.items():
            b = self.policy.vms.get(name)
            plan = self.host.plans.get(name)
            caps = self.policy.caps(name)
            conn = slot.connection
            cfg = slot.device.config
            vms[name] = {
                "socket": slot.config.socket_path,
                "connected": conn is not None,
                "peer_pid": conn.peer_pid if conn else None,
                "sessions_served": slot.sessions_served,
                "pinning": {"configured": _pinning_name(self.host.settings[name].pinning)
                            if name in self.host.settings else None,
                            "mode": plan.pins.mode if plan else None, "note": plan.pins.note if plan else ""},
                "vcpus": [
                    {
                        "vcpu": v,
                        "pcpu": plan.pinning[v] if plan else None,
                        # whether the kernel took that pin (a cpuset someone else owns may refuse it)
                        "pin_applied": self._pin_applied(b.tids.get(v) if b else None,
                                                         plan.pinning[v] if plan else None),
                        "cpus": sorted(plan.pins.allowed[v]) if plan else None,
                        "thread": b.tids.get(v) if b else None,
                        "util": st.util,
                        "perf_khz": st.perf_khz,
                        "record_at": st.updated,  # CLOCK_MONOTONIC of the last record
                        "uclamp_min": (b.engine.vcpus.get(v) if b else None),
                        "uclamp_max": caps.get(v),  # the power cap; 1024: none
                        "guest_domain": cfg.vcpu_domain[v],
                    }
                    for v, st in enumerate(slot.device.vcpus)
                ],
                "domains": [{"cur_khz": d.cur_khz, "min_khz": d.min_khz, "max_khz": d.max_khz,
                             "capacity": d.capacity} for d in cfg.domains],
                "cgroups": [{"path": str(p), "uclamp_min": self.policy.cgroups.values.get(p),
                             "cap": self.policy.cgroups.caps.get(p), "uclamp_max": self.policy.cgroups.max_values.get(p)}
                            for p in (self.policy.cgroup_paths(name) if b else [])],
                "config_generation": cfg.generation,
                "freq_path": slot.device.freq_path,  # "page" (shared memory) or "config" (config space)
                "counters": {f"{e}{':' + r if r else ''}": n for (e, r), n in sorted(slot.counters.snapshot().items())},
            }
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "degraded": {"cpufreq": model.degraded, "uclamp": self.actuator.degraded,
                         "hotplug": self.host.hotplug.unavailable_reason if self.host.hotplug else "not started"},
            "kick_lanes": [{"thread": lane.sched.tid, "slice_requested_us": lane.sched.requested_ns // 1000,
                            "slice_us": lane.sched.slice_ns / 1000, "slice_applied": lane.sched.applied,
                            "queues": len(lane.slots)} for lane in running_lanes()],
            "host": {"online_cpus": list(model.online_cpus()),
                     "domains": [{"cpus": list(d.cpus), "cur_khz": d.cur_khz, "max_khz": d.max_khz,
                                  "capacity": d.capacity} for d in model.snapshot().domains]},
            "guard": _guard_status(),
            "vms": vms,
            "counters": {f"{e}{':' + r if r else ''}": n for (e, r), n in sorted(self.counters.snapshot().items())},
        }

    async def _resume(self, raw: bytes, fds: list[int]) -> bool:
        """One session a predecessor served: a shared socket's goes through its admission again."""
        try:
            snap = decode_snapshot(raw, len(fds))
        except SnapshotError:
            snap = None  # Service.resume refuses it, with the reason
        if snap is not None and snap.peer is not None:
            if self.shared is None:
                self.counters.inc("handover_dropped", "no-shared-socket")
                log.error("[%s] a session of the shared socket, and no shared_socket here: dropped", snap.vm)
                for fd in fds:
                    os.close(fd)
                return False
            return await self.shared.resume(snap, raw, fds)
        return self.service.resume(raw, fds) is not None

    async def _give_over(self, writer: asyncio.StreamWriter) -> None:
        """A successor asked for everything on this control connection (service/handover.py)."""
        self.counters.inc("control_requests")
        raw = writer.get_extra_info("socket")
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(True)
        try:
            committed = give_over(self.service, sock)  # blocks the loop on purpose: nothing is served meanwhile
        finally:
            sock.close()
        if committed:
            # No cleanup: the fds, clamps and threads are the successor's now.
            logging.shutdown()
            os._exit(0)
        self.counters.inc("handover_aborted")

    async def _control_request(self, line: str) -> dict[str, Any]:
        self.counters.inc("control_requests")
        cmd = line.strip()
        if self.control_api.handles(cmd):
            return self.control_api.handle(cmd)
        if cmd == "status":
            return self.status()
        if cmd == "reload":
            try:
                return {"ok": True, "changes": await self.reload()}
            except ConfigError as exc:
                self.counters.inc("reload_failed")
                return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown command {cmd!r} (try: status, reload)"}


async def _control_server(path: str, handler: Any, give_over: Any = None) -> asyncio.AbstractServer:
    _unlink(path)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.strip() == b"handover" and give_over is not None:
                await give_over(writer)  # returns only if the successor did not take over
                return
            writer.write(json.dumps(await handler(line.decode(errors="replace"))).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    old = os.umask(0o077)  # owner-only control socket
    try:
        return await asyncio.start_unix_server(serve, path)
    finally:
        os.umask(old)


def query_status(path: str, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Client side of the control socket (``vhost-user-cpufreq status``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


def _unlink(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _adopt_threads(state: StateFile, actuator: ThreadActuator) -> int:
    """Take the predecessor's records of threads it changed as our own: restored when their VM goes."""
    n = 0
    for rec in list(state.load().values()):
        if thread_start_time(rec.tid) != rec.start_time:
            state.entries.pop(rec.tid, None)  # gone, or the id recycled: leave it alone
            continue
        affinity = frozenset(rec.affinity) if rec.affinity is not None else None  # None: never pinned
        actuator.originals[rec.tid] = Original(affinity, rec.util_min, rec.util_max, rec.reset_on_fork)
        # Clamped or not by the predecessor, restore() must put the original clamp back.
        actuator.clamps.setdefault(rec.tid, rec.util_min or 0)
        n += 1
    state._write()
    return n


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return
        log.debug("open-file limit raised from %d to %d", soft, hard)


def _guard_status() -> dict[str, Any]:
    """What the guards of shared memory and eventfds have caught (backend/dataplane/guard.py)."""
    g = guard()
    if g is None:
        return {"active": False}
    st = g.stats()
    return {"active": True, "memory_faults": st.faults, "stray_sigbus": st.stray_sigbus,
            "unpatched_faults": st.fatal, "eventfd_timer_signal": g.timer_signal}


def _pinning_name(p: str | tuple[int, ...]) -> str | list[int]:
    return p if isinstance(p, str) else list(p)
