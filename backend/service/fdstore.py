"""Crash survival: every VM's fds and session state kept in systemd's fd store (the shell of protocol/fdstore.py).

Theory of operation: with ``FileDescriptorStoreMax=`` set, systemd tells us
``$FDSTORE`` and keeps a duplicate of every fd sent to it with ``FDSTORE=1``;
the next process of the service (after ``SIGKILL``, a watchdog abort,
``systemctl restart``) receives them all, named, like socket-activated ones.
:class:`Keeper` keeps the store current while the service runs: each VM's
listening socket; per live session its connection, back-end channel,
kick/call/err eventfds and guest memory fds; and one memfd per VM holding the
session's record (its snapshot), rewritten after every batch of control
messages and marked busy while a read from the front-end's socket is being
handled.  When a session ends its fds leave the store (a closed connection
would otherwise stay open there, and QEMU would never see it close).

:func:`from_store` turns what the store handed back into a
:class:`~.handover.Taken`, the same as a live handover's: sessions go through
``Service.resume``.  A record written by a process that was serving (a crash)
has stale ring positions: each ring resumes at the used index found in guest
memory, so every buffer not yet returned is served again.  A record from
another version, cut mid-write, marked busy, or missing one of its fds drops
that session alone (its fds leave the store, QEMU sees the close), logged and
counted.  On ``SIGTERM`` :meth:`Keeper.park` freezes every session, writes
exact records and exits without closing anything: ``systemctl restart``
loses no buffer.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhost_user_cpufreq.protocol.fdstore import (
    BUSY,
    FLAGS_OFFSET,
    decode_record,
    encode_record,
    listener_name,
    name_ok,
    parse_name,
    record_name,
    session_fd_name,
)
from vhost_user_cpufreq.protocol.session_snapshot import SnapshotError, at_used, encode
from vhost_user_cpufreq.protocol.session_snapshot import decode as decode_snapshot

from ..vhost.handover import freeze, guest_used, live_snapshot, snapshot
from ..vhost.transport import Connection
from . import systemd
from .handover import Taken

if TYPE_CHECKING:
    from .vms import Service, VmSlot

__all__ = ["FdStore", "Keeper", "from_store"]

log = logging.getLogger("vhost_user_cpufreq.fdstore")


class FdStore:
    """systemd's fd store of this service; every call is a no-op when it has none."""

    def __init__(self) -> None:
        self.max = systemd.fdstore_max()
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.max > 0

    def put(self, name: str, fd: int) -> None:
        if self.enabled:
            ok = systemd.notify_with_fds(f"FDSTORE=1\nFDNAME={name}", [fd])
            self.sent += ok
            self.failed += not ok

    def remove(self, name: str) -> None:
        if self.enabled:
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


_SOCKET_UNIT = object()


@dataclass
class _Vm:
    record_fd: int  # the memfd in the store under record_name(vm)
    conn: Connection | None = None
    generation: int = 0
    names: list[str] = field(default_factory=list)  # the session's fds in the store, by name
    stored: list[int] = field(default_factory=list)  # their numbers here when stored
    busy: bool = False
    last: bytes = b""


class Keeper:
    """Keeps the fd store current: install before the daemon starts, ``started`` after."""

    def __init__(self, store: FdStore, records: dict[str, int] | None = None,
                 old: dict[str, tuple[int, list[str]]] | None = None) -> None:
        self.store = store
        self.vms: dict[str, _Vm] = {vm: _Vm(fd) for vm, fd in (records or {}).items()}
        self._old = dict(old or {})  # a resumed session's generation and names, removed once re-stored
        #: each VM's listening socket in the store (or _SOCKET_UNIT: systemd passes it at every start anyway)
        self.listeners: dict[str, object] = {}
        self._warned: set[str] = set()

    def install(self, service: "Service") -> None:
        service.session_hooks.append(self._session)
        service.close_hooks.append(self._closed)

    def started(self, service: "Service") -> None:
        """Store the listening socket of every VM not stored already."""
        for name, slot in service.vms.items():
            self._listener(name, slot)

    # -- hooks ------------------------------------------------------------------------
    def _listener(self, vm: str, slot: "VmSlot") -> None:
        if slot.server is None or not name_ok(vm):
            return
        held = self.listeners.get(vm)
        if held is not None and (held is slot.server or held is _SOCKET_UNIT):
            return
        if held is not None:
            self.store.remove(listener_name(vm))  # the VM was re-created on reload with another socket
        self.store.put(listener_name(vm), slot.server.fileno())
        self.listeners[vm] = slot.server

    def _session(self, slot: "VmSlot", conn: Connection) -> None:
        vm = slot.config.name
        if not name_ok(vm):
            if vm not in self._warned:
                self._warned.add(vm)
                slot.log.warning("VM name %r cannot name an fd in systemd's store: its sessions do not survive "
                                 "a crash", vm)
            slot.counters.inc("fdstore_unnamed")
            return
        self._listener(vm, slot)
        st = self.vms.get(vm)
        if st is None:
            fd = os.memfd_create(f"vuc-record-{vm}", os.MFD_CLOEXEC)
            self.store.put(record_name(vm), fd)
            st = self.vms[vm] = _Vm(fd)
        st.conn, st.busy, st.last = conn, False, b""
        generation, st.names = self._old.pop(vm, (0, []))
        st.generation, st.stored = max(st.generation, generation), []
        conn.watch = lambda busy: self._watch(st, busy)
        self._sync(st)

    def _closed(self, slot: "VmSlot", conn: Connection) -> None:
        st = self.vms.get(slot.config.name)
        if st is None or st.conn is not conn:
            return
        # The VM went: its fds leave the store, so the front-end's connection really closes.
        self._write(st, b"")
        self._forget(st)
        st.conn = None

    def _watch(self, st: _Vm, busy: bool) -> None:
        conn = st.conn
        if conn is None:
            return
        if busy:
            if not st.busy and st.last:
                os.pwrite(st.record_fd, bytes([BUSY]), FLAGS_OFFSET)
            st.busy = True
        elif conn.reader.buffered == 0:
            self._sync(st)

    # -- writing --------------------------------------------------------------------------
    def _sync(self, st: _Vm, *, parked: bool = False) -> None:
        conn = st.conn
        assert conn is not None
        try:
            if parked:
                raw, fds = snapshot(conn.session, conn.sock.fileno(), mid_message=conn.reader.buffered > 0)
            else:
                raw, fds = live_snapshot(conn.session, conn.sock.fileno())
        except SnapshotError as exc:
            if parked:  # left busy: the next process drops this session alone, and says why
                log.error("[%s] session cannot be kept across the restart: %s", conn.session.name, exc)
                os.pwrite(st.record_fd, bytes([BUSY]), FLAGS_OFFSET)
            else:
                log.debug("[%s] no record: %s", conn.session.name, exc)
            return
        if fds != st.stored or not st.names:
            # A new set: stored under the next generation before the record names it, the old removed after.
            old = st.names
            st.generation += 1
            st.names = [session_fd_name(conn.session.name, st.generation, i) for i in range(len(fds))]
            for name, fd in zip(st.names, fds):
                self.store.put(name, fd)
            st.stored = list(fds)
            self._write(st, encode_record(st.generation, raw, clean=parked))
            for name in old:
                self.store.remove(name)
        else:
            data = encode_record(st.generation, raw, clean=parked)
            if data != st.last or st.busy:
                self._write(st, data)
        st.busy = False

    def _write(self, st: _Vm, data: bytes) -> None:
        os.pwrite(st.record_fd, data, 0)
        os.ftruncate(st.record_fd, len(data))
        st.last = data

    def _forget(self, st: _Vm) -> None:
        for name in st.names:
            self.store.remove(name)
        st.names, st.stored = [], []

    def park(self) -> None:
        """SIGTERM with a store: stop serving, write exact records, leave every fd open (the caller exits)."""
        for st in self.vms.values():
            if st.conn is not None and not st.conn.closed.done():
                freeze(st.conn.session)
                self._sync(st, parked=True)
        log.info("every session parked in systemd's fd store; exiting without closing them")


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        chunk = os.pread(fd, 1 << 16, len(out))
        if not chunk:
            return out
        out += chunk


def from_store(named: list[tuple[str, int]], store: FdStore,
               vms: set[str]) -> tuple[list[tuple[str, int]], dict[str, socket.socket], Taken | None, Keeper]:
    """Split what systemd passed: (the fds not ours, listeners by VM, the sessions to resume, a Keeper).

    Every fd of ours that is not used is closed here and removed from the store.
    """
    rest: list[tuple[str, int]] = []
    listeners: dict[str, socket.socket] = {}
    records: dict[str, int] = {}
    gens: dict[str, dict[int, dict[int, tuple[str, int]]]] = {}
    unused: list[tuple[str, int]] = []
    for name, fd in named:
        parsed = parse_name(name)
        if parsed is None:
            rest.append((name, fd))
            continue
        vm, kind, gen, index = parsed
        if vm not in vms:
            unused.append((name, fd))
        elif kind == "l" and vm not in listeners:
            listeners[vm] = socket.socket(fileno=fd)
        elif kind == "r" and vm not in records:
            records[vm] = fd
        elif kind == "g" and gen is not None and index is not None:
            slot = gens.setdefault(vm, {}).setdefault(gen, {})
            if index in slot:
                unused.append((name, fd))
            else:
                slot[index] = (name, fd)
        else:
            unused.append((name, fd))
    taken = Taken(0, origin="fdstore")
    old: dict[str, tuple[int, list[str]]] = {}
    for vm in sorted(set(records) | set(gens)):
        by_gen = gens.get(vm, {})
        try:
            if vm not in records:
                raise SnapshotError("missing-record", "the session's fds are stored, its record is not")
            rec = decode_record(_read_all(records[vm]))
            if rec is None:
                continue  # no session when the process went; stray fds are closed below
            if rec.busy:
                raise SnapshotError("mid-message", "the process died while handling a front-end message")
            mine = by_gen.pop(rec.generation, {})
            unused += mine.values()  # taken back below once the snapshot checks out
            if sorted(mine) != list(range(len(mine))):
                raise SnapshotError("missing-fd", f"stored fds {sorted(mine)} of generation {rec.generation}")
            fds = [mine[i][1] for i in range(len(mine))]
            snap = decode_snapshot(rec.snapshot, len(fds))
            if snap.vm != vm:
                raise SnapshotError("wrong-vm", f"record of {snap.vm!r} stored for {vm!r}")
            raw = rec.snapshot if rec.clean else encode(at_used(snap, guest_used(snap, fds)))
            for i in range(len(mine)):
                unused.remove(mine[i])
            taken.sessions.append((raw, fds))
            old[vm] = (rec.generation, [mine[i][0] for i in range(len(mine))])
        except SnapshotError as exc:
            log.error("[%s] the session kept in systemd's fd store cannot be resumed (its front-end sees "
                      "the connection close): %s", vm, exc)
            taken.dropped.append((vm, exc.reason))
        finally:
            for g in by_gen.values():
                unused += g.values()
            by_gen.clear()
    for name, fd in unused:
        store.remove(name)
        try:
            os.close(fd)
        except OSError:
            pass
    keeper = Keeper(store, records, old)
    keeper.listeners.update(listeners)
    keeper.listeners.update((name, _SOCKET_UNIT) for name, _ in rest if name in vms)
    for vm, fd in records.items():
        if any(d == vm for d, _ in taken.dropped):
            os.ftruncate(fd, 0)
    return rest, listeners, (taken if taken.sessions or taken.dropped else None), keeper
