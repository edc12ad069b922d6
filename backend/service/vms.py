"""The service: one process, many VMs, one listening unix socket per VM.

Each VM has a :class:`VmSlot` that outlives connections: its cpufreq device
(config, vCPU map, counters) stays while front-ends come and go, so a VM that
reconnects is served again without a restart.  At most one front-end is
connected per VM; a second one is refused and counted.  Connections are
independent: whatever one front-end does, the others keep being served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..counters import Counters
from ..cpufreq.device import CpufreqDevice
from ..cpufreq.hostfreq import FrequencySource
from ..defaults import KICK_BATCH_DELAY, LANE_SLICE_US, make_runtime_dir
from ..policy.decision import Policy
from vhost_user_cpufreq.protocol.session_snapshot import PeerSnapshot, SnapshotError
from vhost_user_cpufreq.protocol.session_snapshot import decode as decode_snapshot

from ..vhost.handover import restore as restore_session
from ..vhost.session import Session
from ..vhost.transport import Connection, peer_credentials

__all__ = ["VmConfig", "VmSlot", "Service", "StoreKeeper"]



class StoreKeeper(Protocol):
    """What a handover asks of systemd's fd store keeper (service/fdstore.py Keeper)."""

    @property
    def enabled(self) -> bool: ...

    def entries(self, vm: str, fds: list[int]) -> tuple[int, int, list[str]] | None: ...

    def forget(self, vms: set[str] | None = None) -> None: ...

log = logging.getLogger("vhost_user_cpufreq")


class VmLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the VM's name, as aioquic does with connection ids."""

    def __init__(self, logger: logging.Logger, vm: str) -> None:
        super().__init__(logger, {"vm": vm})
        self.vm = vm

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[str, MutableMapping[str, Any]]:
        return f"[{self.vm}] {msg}", kwargs


@dataclass(frozen=True, slots=True)
class VmConfig:
    name: str
    socket_path: str
    #: host frequency domain index (into the source's snapshot) of each vCPU
    vcpu_host_domain: tuple[int, ...]
    socket_mode: int = 0o600
    notify_interval: float = 0.01  # at most one CONFIG_CHANGE_MSG per interval
    mirror_threshold: float = 0.0  # fraction of a domain's max frequency
    socket_owner: int | None = None
    socket_group: int | None = None
    kick_batch_delay: float = KICK_BATCH_DELAY  # poll period of a busy ring: the longest a buffer waits without a kick
    #: offer the shared frequency page (SPEC §8) to front-ends with vhost-user SHMEM; costs CONFIGURE_MEM_SLOTS
    #: on every connection of this VM (QEMU 11.1.3 crashes with both: docs/qemu-facts.md section e)
    shared_page: bool = False
    #: the top frequency of the VM's vCPUs where below the host's (hostfreq.advertised); None: the host's
    max_khz: int | None = None


@dataclass(slots=True)
class VmSlot:
    config: VmConfig
    device: CpufreqDevice
    counters: Counters
    log: logging.LoggerAdapter[logging.Logger]
    server: socket.socket | None = None
    connection: Connection | None = None
    sessions_served: int = 0
    history: list[str] = field(default_factory=list)
    #: a VM from the shared socket (shared_socket.py): is the process it was identified from still that one?
    #: Checked before its threads are touched; None for per-VM sockets.
    peer_alive: Callable[[], bool] | None = None
    #: a VM from the shared socket: who its front-end was identified as, carried with its session to a
    #: successor process, which checks it again (shared_socket.py resume)
    peer_record: PeerSnapshot | None = None


class Service:
    def __init__(self, source: FrequencySource, policy: Policy, *,
                 allowed_uids: tuple[int, ...] | None = None, allowed_gids: tuple[int, ...] | None = None,
                 lane_slice_us: int = LANE_SLICE_US) -> None:
        self.source = source
        self.policy = policy
        #: the kick lane thread's scheduler slice (0: the kernel's default), see lane.py
        self.lane_slice_us = lane_slice_us
        #: SO_PEERCRED allowlist: a peer whose uid or gid is listed may connect (None: no check)
        self.allowed_uids = allowed_uids
        self.allowed_gids = allowed_gids
        self.vms: dict[str, VmSlot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.session_hooks: list[Callable[[VmSlot, Connection], None]] = []
        #: systemd's fd store keeper (service/fdstore.py), when the service keeps one
        self.keeper: StoreKeeper | None = None
        self.close_hooks: list[Callable[[VmSlot, Connection], None]] = []

    async def add_vm(self, cfg: VmConfig, *, listen_sock: socket.socket | None = None, listen: bool = True) -> VmSlot:
        """Start serving a VM: bind its socket (or adopt ``listen_sock``) and accept front-ends.

        ``listen=False``: no socket of its own; its one front-end comes from the shared socket (:meth:`serve`).
        """
        if cfg.name in self.vms:
            raise ValueError(f"VM {cfg.name!r} is already served")
        loop = asyncio.get_running_loop()
        self._loop = loop
        counters = Counters()
        vlog = VmLog(log, cfg.name)
        device = CpufreqDevice(cfg.name, cfg.vcpu_host_domain, self.source, self.policy, counters=counters, log=vlog,
                               mirror_threshold=cfg.mirror_threshold, lane_slice_us=self.lane_slice_us,
                               shared_page=cfg.shared_page, max_khz=cfg.max_khz)
        if not listen:
            slot = VmSlot(cfg, device, counters, vlog)
            self.vms[cfg.name] = slot
            return slot
        sock = listen_sock if listen_sock is not None else _listen(cfg.socket_path, cfg.socket_mode,
                                                                   cfg.socket_owner, cfg.socket_group)
        sock.setblocking(False)
        slot = VmSlot(cfg, device, counters, vlog, server=sock)
        self.vms[cfg.name] = slot
        loop.add_reader(sock.fileno(), self._accept, slot)
        vlog.info("listening on %s (%d vCPUs)", cfg.socket_path, len(cfg.vcpu_host_domain))
        return slot

    def _accept(self, slot: VmSlot) -> None:
        assert slot.server is not None and self._loop is not None
        try:
            conn_sock, _ = slot.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            slot.log.warning("accept failed: %s", exc)
            return
        pid, uid, gid = peer_credentials(conn_sock)
        if not self._peer_allowed(uid, gid):
            slot.counters.inc("connections_refused", "peer-not-allowed")
            slot.log.warning("refused a front-end: pid %d uid %d gid %d is not in the allowlist", pid, uid, gid)
            conn_sock.close()
            return
        if slot.connection is not None:
            slot.counters.inc("connections_refused", "already-connected")
            slot.log.warning("refused a second front-end: one is connected already")
            conn_sock.close()
            return
        self.serve(slot, conn_sock)

    def serve(self, slot: VmSlot, conn_sock: socket.socket) -> Connection:
        """Start a session for an accepted front-end of ``slot`` (which has none)."""
        conn = self._connect(slot, conn_sock, self._new_session(slot))
        slot.counters.inc("sessions")
        slot.log.info("front-end connected (pid %d, uid %d)", conn.peer_pid, conn.peer_uid)
        self._run_session_hooks(slot, conn)
        return conn

    def peer_allowed(self, uid: int, gid: int) -> bool:
        """The SO_PEERCRED allowlist, for the shared socket too."""
        return self._peer_allowed(uid, gid)

    def _new_session(self, slot: VmSlot) -> Session:
        assert self._loop is not None
        return Session(
            slot.device, name=slot.config.name, loop=self._loop, counters=slot.counters, log=slot.log,
            notify_interval=slot.config.notify_interval, kick_batch_delay=slot.config.kick_batch_delay,
        )

    def _connect(self, slot: VmSlot, conn_sock: socket.socket, session: Session) -> Connection:
        assert self._loop is not None
        conn = Connection(conn_sock, session, loop=self._loop, counters=slot.counters, log=slot.log,
                          on_close=lambda c: self._closed(slot, c))
        slot.connection = conn
        slot.sessions_served += 1
        return conn

    def _run_session_hooks(self, slot: VmSlot, conn: Connection) -> None:
        for hook in self.session_hooks:
            hook(slot, conn)

    def resume(self, raw: bytes, fds: list[int], *, on_drop: Callable[[str], None] | None = None) -> VmSlot | None:
        """Serve a session a predecessor process handed over (service/handover.py).

        Takes ``fds``.  A snapshot that cannot be resumed closes its fds (its front-end sees
        the connection close): that session alone is dropped, logged and counted.
        """
        slot: VmSlot | None = None
        taken = False
        try:
            snap = decode_snapshot(raw, len(fds))
            slot = self.vms.get(snap.vm)
            if slot is None:
                raise SnapshotError("unknown-vm", f"no VM {snap.vm!r} is configured here")
            if slot.connection is not None:
                raise SnapshotError("already-connected", f"VM {snap.vm!r} has a front-end already")
            session = self._new_session(slot)
            taken = True
            sock = restore_session(session, snap, fds)  # takes the fds, even when it fails
        except SnapshotError as exc:
            for fd in fds if not taken else ():
                _close_quietly(fd)
            counters = slot.counters if slot is not None else None
            if counters is not None:
                counters.inc("handover_dropped", exc.reason)
            if on_drop is not None:
                on_drop(exc.reason)
            log.error("%sa handed-over session is dropped: %s", f"[{slot.config.name}] " if slot else "", exc)
            return None
        conn = self._connect(slot, sock, session)
        slot.counters.inc("sessions_resumed")
        slot.log.info("front-end resumed from the previous process (pid %d)", conn.peer_pid)
        if slot.device.owes_notification():
            session.config_changed()  # a change made while no process served is told now
        self._run_session_hooks(slot, conn)
        return slot

    def _peer_allowed(self, uid: int, gid: int) -> bool:
        if self.allowed_uids is None and self.allowed_gids is None:
            return True
        return uid in (self.allowed_uids or ()) or gid in (self.allowed_gids or ())

    def _closed(self, slot: VmSlot, conn: Connection) -> None:
        if slot.connection is conn:
            slot.connection = None
        # The guest's requests die with the connection: no boost outlives its VM.
        slot.device.reset()
        slot.history.append(conn.closed.result())
        for hook in self.close_hooks:
            hook(slot, conn)

    async def remove_vm(self, name: str) -> None:
        slot = self.vms.pop(name)
        if slot.connection is not None:
            slot.connection.close("VM removed")
        if slot.server is not None and self._loop is not None:
            self._loop.remove_reader(slot.server.fileno())
            slot.server.close()
            _unlink_socket(slot.config.socket_path)
        slot.device.close()

    async def close(self) -> None:
        for name in list(self.vms):
            await self.remove_vm(name)

    async def wait_connected(self, name: str, timeout: float = 10.0) -> Connection:
        """Wait until the VM has a front-end (tests and the demo)."""
        slot = self.vms[name]
        deadline = asyncio.get_running_loop().time() + timeout
        while slot.connection is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no front-end connected to {name}")
            await asyncio.sleep(0.005)
        return slot.connection


def _listen(path: str, mode: int, owner: int | None = None, group: int | None = None) -> socket.socket:
    _unlink_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        make_runtime_dir(path)
        # Create with the final mode already in place: no window where others may connect.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if owner is not None or group is not None:
            os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
