"""One listening socket for every VM: each QEMU identified from its process, each its own session.

Theory of operation
-------------------
Every accepted connection goes through, in order (the first failure refuses it,
closes it, logs the reason and counts ``shared_socket_refused{reason}``):

1. the SO_PEERCRED allowlist (``peer-not-allowed``);
2. a pidfd for the connecting process (``peer-gone``), then its identity from
   /proc (identify.py: ``not-qemu``, ``no-name``, ``bad-name``, ``bad-smp``...);
3. the name must be free: no ``[vm.NAME]`` section and no connected VM of that
   name (``name-in-use``);
4. a manager's registration, if any (``admit = "registered"`` makes one
   mandatory: ``not-registered``), whose cgroup glob must match the process's
   (``cgroup-mismatch``) and whose vCPU count must equal ``-smp``
   (``vcpus-mismatch``);
5. a policy class: the registration's, else the first that matches
   (``no-class``).

The VM is then added like a configured one, without a socket of its own
(HostSide plans, pins and clamps it), and its session starts.  Its threads
are looked for in the identified process only, and only while the pidfd
says that process lives.  The pidfd is watched: when the process exits the
session ends even if the socket was handed to another process.  When the
session ends, for whatever reason, the VM is removed: its threads get their
original affinity and clamps back and the name is free again.

Across a handover or a crash (service/handover.py, fdstore.py) the session
goes with who its peer was (``VmSlot.peer_record``); :meth:`SharedSocket.resume`
in the next process asks the carried connection for its peer again
(SO_PEERPIDFD: the process that connected, or ``peer-gone``), identifies it
again, and refuses it as ``peer-changed`` unless pid, start time, name, vCPUs
and cgroup are the ones recorded; then steps 3 to 5 decide it under this
process's configuration, as at accept.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import socket
from dataclasses import dataclass
from typing import Any

from vhost_user_cpufreq.protocol.session_snapshot import PeerSnapshot, SessionSnapshot

from ..counters import Counters
from ..policy.engine import VmLimits
from ..vhost.transport import Connection, peer_credentials
from .classes import VmClass, match_class
from .config import ConfigError, ServiceConfig, VmSettings
from .identify import IdentityError, PeerIdentity, PeerProcess, identify, open_peer
from .registry import Registration, Registry
from .vm_host import HostSide
from .vms import VmSlot, _close_quietly, _listen, _unlink_socket

__all__ = ["SharedSocket", "PeerVm"]

log = logging.getLogger("vhost_user_cpufreq.shared")


@dataclass(slots=True)
class PeerVm:
    """A VM served from the shared socket: who it was identified as, and what it was given."""

    identity: PeerIdentity
    peer: PeerProcess
    vm_class: str
    settings: VmSettings


class SharedSocket:
    def __init__(self, host: HostSide, config: ServiceConfig, registry: Registry, counters: Counters, *,
                 proc: str = "/proc") -> None:
        assert config.shared_socket is not None
        self.host = host
        self.service = host.service
        self.config = config
        self.path = config.shared_socket
        self.registry = registry
        self.counters = counters
        self.proc = proc
        self.peers: dict[str, PeerVm] = {}
        self.server: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.service.close_hooks.append(self._on_close)

    def start(self, listen_sock: socket.socket | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        sock = listen_sock if listen_sock is not None else _listen(self.path, self.config.shared_socket_mode,
                                                                   None, self.config.shared_socket_group)
        sock.listen(128)  # many QEMUs may start at once
        sock.setblocking(False)
        self.server = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        log.info("listening on %s for every VM (%d classes)", self.path, len(self.config.classes))

    # -- admission -------------------------------------------------------------------------
    def _refuse(self, sock: socket.socket, exc: IdentityError, peer: PeerProcess | None = None) -> None:
        self.counters.inc("shared_refused", exc.reason)
        log.warning("refused a front-end on %s: %s", self.path, exc)
        if peer is not None:
            peer.close()
        sock.close()

    def _accept(self) -> None:
        assert self.server is not None
        try:
            conn_sock, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept on %s failed: %s", self.path, exc)
            return
        pid, uid, gid = peer_credentials(conn_sock)
        peer: PeerProcess | None = None
        try:
            if not self.service.peer_allowed(uid, gid):
                raise IdentityError("peer-not-allowed", f"pid {pid} uid {uid} gid {gid} is not in the allowlist")
            peer = open_peer(conn_sock, self.proc)
            ident = identify(peer, self.config.qemu_binaries)
            s, cls = self.decide(ident)
        except IdentityError as exc:
            self._refuse(conn_sock, exc, peer)
            return
        # Reserved now: a second QEMU with the same name, accepted before this one is admitted, finds it taken.
        self.peers[s.name] = PeerVm(ident, PeerProcess(0, -1, None), cls.name, s)
        task = asyncio.get_running_loop().create_task(self._admit(conn_sock, ident, peer, s, cls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def decide(self, ident: PeerIdentity) -> tuple[VmSettings, VmClass]:
        """What VM ``ident`` is served as (IdentityError with the reason when it may not be)."""
        name = ident.name
        if name in self.service.vms or name in self.peers:
            what = "a [vm.NAME] section" if name in self.config.vms else "a connected VM"
            raise IdentityError("name-in-use", f"-name {name!r} is already {what}")
        reg = self.registry.vms.get(name)
        if reg is None and self.config.admit == "registered":
            raise IdentityError("not-registered", f"VM {name!r} is not registered (admit = \"registered\")")
        if reg is not None and reg.cgroup is not None and not fnmatch.fnmatchcase(ident.cgroup, reg.cgroup):
            raise IdentityError("cgroup-mismatch", f"VM {name!r} is registered in cgroup {reg.cgroup!r}; "
                                                   f"this QEMU is in {ident.cgroup or 'none'!r}")
        if reg is not None and reg.vcpus is not None and reg.vcpus != ident.vcpus:
            raise IdentityError("vcpus-mismatch", f"VM {name!r} is registered with {reg.vcpus} vCPUs, "
                                                  f"its QEMU has -smp {ident.vcpus}")
        return self.settings_for(name, ident.vcpus, ident.cgroup, reg)

    def settings_for(self, name: str, vcpus: int, cgroup: str, reg: Registration | None) -> tuple[VmSettings, VmClass]:
        cls: VmClass | None
        if reg is not None and reg.vm_class is not None and reg.vm_class in self.config.classes:
            cls = self.config.classes[reg.vm_class]
        else:
            cls = match_class(self.config.classes, name, cgroup)
        if cls is None:
            raise IdentityError("no-class", f"no [class.NAME] matches VM {name!r} (cgroup {cgroup or 'none'!r})")
        floor = reg.floor if reg is not None and reg.floor is not None else cls.limits.floor
        ceiling = reg.ceiling if reg is not None and reg.ceiling is not None else cls.limits.ceiling
        try:
            limits = VmLimits(floor, ceiling)
        except ValueError as exc:
            raise IdentityError("bad-limits", f"VM {name!r}: {exc}") from None
        return VmSettings(name, self.path, vcpus, pinning=cls.pinning, limits=limits, clamp=cls.clamp,
                          cgroup=cls.cgroup, shared_page=cls.shared_page), cls

    async def _admit(self, conn_sock: socket.socket, ident: PeerIdentity, peer: PeerProcess, s: VmSettings,
                     cls: VmClass) -> None:
        assert self._loop is not None
        try:
            slot = await self.host.add_vm(s, notify_interval=1.0 / self.config.max_notifications_per_second,
                                          mirror_threshold=self.config.mirror_threshold,
                                          kick_batch_delay=self.config.kick_batch_delay, listen=False)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the name is freed and the peer told
            self.peers.pop(s.name, None)
            self._refuse(conn_sock, IdentityError("no-placement", f"VM {s.name!r}: {exc}"), peer)
            return
        if not peer.alive():
            self.peers.pop(s.name, None)
            await self.host.remove_vm(s.name)
            self._refuse(conn_sock, IdentityError("peer-gone", f"pid {peer.pid} exited while it was admitted"), peer)
            return
        self._admitted(slot, ident, peer, s, cls)
        self.counters.inc("shared_admitted")
        slot.log.info("identified on %s: QEMU pid %d, %d vCPUs, class %s, cgroup %s", self.path, peer.pid,
                      ident.vcpus, cls.name, ident.cgroup or "none")
        self.service.serve(slot, conn_sock)

    def _admitted(self, slot: VmSlot, ident: PeerIdentity, peer: PeerProcess, s: VmSettings, cls: VmClass) -> None:
        assert self._loop is not None and peer.start_time is not None
        self.peers[s.name] = PeerVm(ident, peer, cls.name, s)
        slot.peer_alive = peer.alive
        slot.peer_record = PeerSnapshot(peer.pid, peer.start_time, ident.name, ident.vcpus, ident.cgroup)
        # A dead process ends its session even if its socket lives on in another process.
        self._loop.add_reader(peer.pidfd, self._peer_exited, s.name, peer)

    # -- a session a predecessor process served (handover, fd store) ----------------------
    async def resume(self, snap: SessionSnapshot, raw: bytes, fds: list[int]) -> bool:
        """Serve a shared socket's session handed over by a predecessor, once its peer is checked again.

        The peer is asked of the connection itself (SO_PEERPIDFD: the process that connected, or
        ``peer-gone``) and identified from /proc again: the same pid and start time, name, vCPUs and
        cgroup, else ``peer-changed``; then admitted under this process's configuration, as at accept.
        Takes ``fds``; a session refused is closed alone, logged and counted
        (``handover_dropped{reason}``).
        """
        assert snap.peer is not None
        peer: PeerProcess | None = None
        conn = socket.socket(fileno=fds[snap.connection_fd])
        try:
            try:
                peer = open_peer(conn, self.proc)
            finally:
                conn.detach()  # still the session's fd: only asked here
            ident = identify(peer, self.config.qemu_binaries)
            was = snap.peer
            if (peer.pid, peer.start_time) != (was.pid, was.start_time):
                raise IdentityError("peer-changed", f"the connection's peer is pid {peer.pid} (start "
                                    f"{peer.start_time}), it was pid {was.pid} (start {was.start_time})")
            if (ident.name, ident.vcpus, ident.cgroup) != (was.name, was.vcpus, was.cgroup):
                raise IdentityError("peer-changed", f"pid {peer.pid} is now {ident.name!r} with {ident.vcpus} vCPUs "
                                    f"in {ident.cgroup!r}; it was {was.name!r}, {was.vcpus}, {was.cgroup!r}")
            s, cls = self.decide(ident)
        except IdentityError as exc:
            return self._not_resumed(snap.vm, exc.reason, str(exc), fds, peer)
        self.peers[s.name] = PeerVm(ident, PeerProcess(0, -1, None), cls.name, s)  # reserved, as at accept
        try:
            slot = await self.host.add_vm(s, notify_interval=1.0 / self.config.max_notifications_per_second,
                                          mirror_threshold=self.config.mirror_threshold,
                                          kick_batch_delay=self.config.kick_batch_delay, listen=False)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the session alone is dropped
            self.peers.pop(s.name, None)
            return self._not_resumed(s.name, "no-placement", str(exc), fds, peer)
        self._admitted(slot, ident, peer, s, cls)
        if self.service.resume(raw, fds, on_drop=lambda reason: self.counters.inc("handover_dropped", reason)) is None:
            # (it closed the fds, logged why and counted it here: the VM and its counters go now)
            if self._loop is not None:
                self._loop.remove_reader(peer.pidfd)
            self.peers.pop(s.name, None)
            await self.host.remove_vm(s.name)
            peer.close()
            return False
        slot.log.info("resumed on %s: QEMU pid %d checked again, class %s", self.path, peer.pid, cls.name)
        return True

    def _not_resumed(self, vm: str, reason: str, detail: str, fds: list[int], peer: PeerProcess | None) -> bool:
        self.counters.inc("handover_dropped", reason)
        log.error("[%s] the session of the shared socket is not resumed (its front-end sees the connection "
                  "close): %s", vm, detail)
        for fd in fds:
            _close_quietly(fd)
        if peer is not None:
            peer.close()
        return False

    def _peer_exited(self, name: str, peer: PeerProcess) -> None:
        assert self._loop is not None
        self._loop.remove_reader(peer.pidfd)
        slot = self.service.vms.get(name)
        pv = self.peers.get(name)
        if slot is not None and pv is not None and pv.peer is peer and slot.connection is not None:
            slot.connection.close("the QEMU process exited")

    def _on_close(self, slot: VmSlot, conn: Connection) -> None:
        name = slot.config.name
        pv = self.peers.get(name)
        if pv is None or slot.server is not None:
            return  # a per-VM socket's VM: it stays and waits for its QEMU
        assert self._loop is not None
        if pv.peer.pidfd >= 0:
            self._loop.remove_reader(pv.peer.pidfd)
        task = self._loop.create_task(self._drop(name, pv))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop(self, name: str, pv: PeerVm) -> None:
        # Threads restored (HostSide detached them on close); the VM and its name go.
        if self.peers.get(name) is pv:
            del self.peers[name]
        if name in self.host.settings:
            await self.host.remove_vm(name)
        pv.peer.close()
        log.info("[%s] session ended; VM removed", name)

    # -- manager changes -----------------------------------------------------------------
    def apply_registration(self, name: str) -> str:
        """Re-decide a connected VM after its registration changed; returns what happened."""
        pv = self.peers.get(name)
        slot = self.service.vms.get(name)
        if pv is None or slot is None or slot.connection is None:
            return "not connected"
        reg = self.registry.vms.get(name)
        try:
            if reg is None and self.config.admit == "registered":
                raise IdentityError("not-registered", f"VM {name!r} is no longer registered")
            s, cls = self.settings_for(name, pv.identity.vcpus, pv.identity.cgroup, reg)
        except IdentityError as exc:
            self.counters.inc("shared_refused", exc.reason)
            slot.connection.close(str(exc))
            return f"disconnected: {exc}"
        if s == pv.settings:
            return "unchanged"
        self.host.replan(s)
        pv.settings, pv.vm_class = s, cls.name
        return f"applied (class {cls.name}, floor {s.limits.floor}, ceiling {s.limits.ceiling})"

    def check_names(self, config: ServiceConfig) -> None:
        """Refuse (ConfigError) a configuration whose [vm.NAME] is a VM connected to the shared socket."""
        clash = sorted(set(config.vms) & set(self.peers))
        if clash:
            raise ConfigError(f"{config.source}: vm.{clash[0]}: is connected to the shared socket as that name; "
                              "stop that VM first")

    def reconfigure(self, config: ServiceConfig) -> None:
        """A reload: new classes and limits apply to the connected VMs in place."""
        self.config = config
        for name in list(self.peers):
            self.apply_registration(name)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every VM on the shared socket: identity, class and limits."""
        return {name: {"pid": pv.peer.pid, "vcpus": pv.identity.vcpus, "cgroup": pv.identity.cgroup,
                       "class": pv.vm_class, "floor": pv.settings.limits.floor,
                       "ceiling": pv.settings.limits.ceiling, "pinning": pv.settings.pinning}
                for name, pv in self.peers.items() if pv.peer.pidfd >= 0}

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.server is not None and self._loop is not None:
            self._loop.remove_reader(self.server.fileno())
            self.server.close()
            _unlink_socket(self.path)
            self.server = None
        for name, pv in list(self.peers.items()):
            if pv.peer.pidfd >= 0 and self._loop is not None:
                self._loop.remove_reader(pv.peer.pidfd)
            if name in self.host.settings:
                await self.host.remove_vm(name)
            pv.peer.close()
        self.peers.clear()
