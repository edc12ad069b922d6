"""Crash survival: every VM's fds and session state kept in systemd's fd store (the shell of protocol/fdstore.py).

Theory of operation: with ``FileDescriptorStoreMax=`` set, systemd tells us
``$FDSTORE`` and keeps a duplicate of every fd sent to it with ``FDSTORE=1``;
the next process of the service (after ``SIGKILL``, a watchdog abort,
``systemctl restart``) receives them all, named, like socket-activated ones.
:class:`Keeper` keeps the store current while the service runs: each VM's
listening socket; per live session each open file it holds (connection,
back-end channel, kick/call/err eventfds, guest memory) once; and one memfd
per VM holding the session's record (its snapshot and the store's name of
each of its fds), rewritten after every batch of control messages.  Before a
read from the front-end's socket the record keeps the bytes about to be read
when they are requests that change nothing (answered again by the next
process if this one dies first, unless the socket shows the answer went out:
:func:`answered_already`), and is marked busy otherwise.  When a session ends its fds leave the store (a closed connection
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

import fcntl
import logging
import os
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhost_user_cpufreq.protocol.fdstore import (
    BUSY,
    FLAGS_OFFSET,
    PENDING_AREA,
    REPLAY,
    decode_pending,
    encode_pending,
    replayable,
    decode_record,
    encode_record,
    listener_name,
    name_ok,
    object_name,
    parse_name,
    record_name,
)
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.session_snapshot import SessionSnapshot, SnapshotError, at_page, at_used, encode
from vhost_user_cpufreq.protocol.session_snapshot import decode as decode_snapshot

from ..vhost.handover import freeze, guest_used, live_snapshot, snapshot
from ..vhost.shmem import page_counts
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
_F_DUPFD_QUERY = 1027  # F_LINUX_SPECIFIC_BASE + 3 (Linux 6.10): do two fds share one open file?


def same_file(a: int, b: int) -> bool:
    """Do ``a`` and ``b`` name one open file (what systemd's store counts as one entry)?"""
    try:
        return fcntl.fcntl(a, _F_DUPFD_QUERY, b) == 1
    except OSError:
        pass
    # Older kernels: the same inode (eventfds share one: their id tells them apart).
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and _eventfd_id(a) == _eventfd_id(b)


def _eventfd_id(fd: int) -> str | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("eventfd-id:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@dataclass
class _Vm:
    record_fd: int  # the memfd in the store under record_name(vm)
    conn: Connection | None = None
    slot: "VmSlot | None" = None
    serial: int = 0  # of the last object name given
    held: dict[str, int] = field(default_factory=dict)  # name -> our duplicate of each object in the store
    names: list[str] = field(default_factory=list)  # the object of each fd of the last record
    stored: list[int] = field(default_factory=list)  # those fds' numbers
    busy: bool = False
    replay: bool = False
    last: bytes = b""


class Keeper:
    """Keeps the fd store current: install before the daemon starts, ``started`` after."""

    def __init__(self, store: FdStore, records: dict[str, int] | None = None,
                 held: dict[str, dict[str, int]] | None = None, serials: dict[str, int] | None = None,
                 replay: dict[str, bytes] | None = None) -> None:
        self.store = store
        self._replay = dict(replay or {})  # requests a predecessor read and did not answer, by VM
        self.vms: dict[str, _Vm] = {vm: _Vm(fd) for vm, fd in (records or {}).items()}
        for vm, objs in (held or {}).items():  # a resumed session's objects, already in the store
            self.vms[vm].held = objs
        for vm, n in (serials or {}).items():
            if vm in self.vms:
                self.vms[vm].serial = n
        #: each VM's listening socket in the store (or _SOCKET_UNIT: systemd passes it at every start anyway)
        self.listeners: dict[str, object] = {}
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def install(self, service: "Service") -> None:
        service.session_hooks.append(self._session)
        service.close_hooks.append(self._closed)
        service.keeper = self

    # -- a live handover between two processes that both keep the store (service/handover.py) --------
    def entries(self, vm: str, fds: list[int]) -> tuple[int, int, list[str]] | None:
        """(record memfd, last serial, the store's name of each of ``fds``) of ``vm``'s session, if the
        store holds exactly those fds (the session's snapshot just taken); None: the successor stores afresh."""
        st = self.vms.get(vm)
        if st is None or st.conn is None or len(st.stored) != len(fds):
            return None
        if not all(same_file(st.held[n], fd) for n, fd in zip(st.names, fds)):
            return None
        return st.record_fd, st.serial, list(st.names)

    def adopt(self, vm: str, record_fd: int, serial: int, names: tuple[str, ...], fds: list[int]) -> None:
        """Go on with a predecessor's entries for ``vm``'s session (``fds``: the session's, in the order
        ``names`` names them, before the session takes them).  Takes ``record_fd``."""
        if vm in self.vms or len(names) != len(fds):
            os.close(record_fd)
            return
        held = {}
        for name, fd in zip(names, fds):
            if name not in held:
                held[name] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        self.vms[vm] = _Vm(record_fd, serial=serial, held=held)

    def forget(self, vms: set[str] | None = None) -> None:
        """Take ``vms``' sessions (every VM's and its listener: None) out of the store, for a successor
        that keeps no store, or stores these afresh (systemd would ignore a new name for an open file
        it holds under an old one, and a second record of one VM)."""
        for vm, st in self.vms.items():
            if vms is None or vm in vms:
                for name in st.held:
                    self.store.remove(name)
                self.store.remove(record_name(vm))
        for vm in self.listeners if vms is None else ():
            self.store.remove(listener_name(vm))

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
        st.conn, st.slot, st.busy, st.last, st.names, st.stored = conn, slot, False, b"", [], []
        conn.watch = lambda busy, pending: self._watch(st, busy, pending)
        conn.session.shmem.changed = lambda: self._acked(st)
        self._sync(st)
        replay = self._replay.pop(vm, None)
        if replay:
            answered = answered_already(conn.sock)
            if answered is not None:
                # The previous process did answer, and was killed before it said so in the record: an
                # answer sent twice would be taken by the front-end for the answer to its next request.
                slot.counters.inc("replay_skipped", answered)
                slot.log.info("the request the previous process was answering when it died was answered "
                              "(%s): not answered again", answered)
            else:
                # What the previous process read and had not answered, answered now.
                conn.loop.call_soon(conn.replay, replay)

    def _closed(self, slot: "VmSlot", conn: Connection) -> None:
        st = self.vms.get(slot.config.name)
        if st is None or st.conn is not conn:
            return
        # The VM went: its objects leave the store, so the front-end's connection really closes.
        self._write(st, b"")
        for name, dup in st.held.items():
            self.store.remove(name)
            os.close(dup)
        st.held, st.names, st.stored, st.conn = {}, [], [], None

    def _watch(self, st: _Vm, busy: bool, pending: bytes | None) -> None:
        conn = st.conn
        if conn is None:
            return
        if busy:
            if st.last and not conn.reader.buffered and pending is not None and replayable(pending):
                # Requests that change nothing (GET_CONFIG...): cut before their answer, they are answered
                # by the next process.  Kept before they are taken from the socket.
                os.pwrite(st.record_fd, encode_pending(pending), 0)
                os.pwrite(st.record_fd, bytes([REPLAY]), PENDING_AREA + FLAGS_OFFSET)
                st.replay = True
            elif st.last and not st.busy:
                os.pwrite(st.record_fd, bytes([BUSY]), PENDING_AREA + FLAGS_OFFSET)
            st.busy = True
        elif conn.reader.buffered == 0:
            if st.replay:  # answered: never again (the record below is unchanged by such requests)
                os.pwrite(st.record_fd, bytes([0]), PENDING_AREA + FLAGS_OFFSET)
                st.replay = False
            self._sync(st)

    def _acked(self, st: _Vm) -> None:
        """The front-end acked a shared memory map: the record says the page is in use."""
        if st.conn is not None and not st.busy and st.conn.reader.buffered == 0:
            self._sync(st)

    # -- writing --------------------------------------------------------------------------
    def _sync(self, st: _Vm, *, parked: bool = False) -> None:
        conn = st.conn
        assert conn is not None
        peer = st.slot.peer_record if st.slot is not None else None
        try:
            if parked:
                raw, fds = snapshot(conn.session, conn.sock.fileno(), mid_message=conn.reader.buffered > 0,
                                    peer=peer)
            else:
                raw, fds = live_snapshot(conn.session, conn.sock.fileno(), peer)
        except SnapshotError as exc:
            if parked:  # left busy: the next process drops this session alone, and says why
                log.error("[%s] session cannot be kept across the restart: %s", conn.session.name, exc)
                os.pwrite(st.record_fd, bytes([BUSY]), PENDING_AREA + FLAGS_OFFSET)
            else:
                log.warning("[%s] the fd store's record is not updated: %s", conn.session.name, exc)
            return
        if fds == st.stored and all(same_file(st.held[n], fd) for n, fd in zip(st.names, fds)):
            names = st.names
        else:
            names = self._objects(st, conn.session.name, fds)
        data = encode_record(names, raw, clean=parked)
        if data != st.last or st.busy:
            self._write(st, data)
        st.busy = False
        # Objects no longer named leave the store after the record stopped naming them.
        for name in [n for n in st.held if n not in names]:
            self.store.remove(name)
            os.close(st.held.pop(name))
        st.names, st.stored = names, list(fds)

    def _objects(self, st: _Vm, vm: str, fds: list[int]) -> list[str]:
        """The store's name of each fd; a new open file is stored (before any record names it)."""
        names = []
        for fd in fds:
            name = next((n for n, dup in st.held.items() if same_file(dup, fd)), None)
            if name is None:
                st.serial += 1
                name = object_name(vm, st.serial)
                self.store.put(name, fd)
                st.held[name] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            names.append(name)
        return names

    def _write(self, st: _Vm, data: bytes) -> None:
        os.pwrite(st.record_fd, data, PENDING_AREA)
        os.ftruncate(st.record_fd, PENDING_AREA + len(data) if data else 0)
        st.last = data

    def park(self) -> None:
        """SIGTERM with a store: stop serving, write exact records, leave every fd open (the caller exits)."""
        for st in self.vms.values():
            if st.conn is not None and not st.conn.closed.done():
                freeze(st.conn.session)
                self._sync(st, parked=True)
        log.info("every session parked in systemd's fd store; exiting without closing them")


def answered_already(sock: socket.socket) -> str | None:
    """Did the front-end get an answer to the requests a killed process kept for a replay?

    A process killed between sending the answer and clearing its record's ``REPLAY`` flag leaves both:
    bytes of ours the front-end has not read yet (SIOCOUTQ: the answer is in its socket), or bytes of
    the front-end's after the request (FIONREAD: QEMU sends nothing while it waits for an answer, so it
    got it) say it was sent.  Neither: not sent, or read by a front-end that has not spoken since (the
    one case still answered twice, a window of microseconds after the send).
    """
    try:
        if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] > 0:
            return "answer-unread"
        if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0] > 0:
            return "front-end-went-on"
    except OSError:
        pass
    return None


def _read_all(fd: int, offset: int = 0) -> bytes:
    out = b""
    while True:
        chunk = os.pread(fd, 1 << 16, offset + len(out))
        if not chunk:
            return out
        out += chunk


def _after_crash(snap: SessionSnapshot, fds: list[int]) -> SessionSnapshot:
    """A record written while the process served: ring positions and the page's counts as guest memory and
    the page hold them now (what the record says of them may be behind)."""
    snap = at_used(snap, guest_used(snap, fds))
    if snap.shmem is None or snap.device.page is None:
        return snap
    page = next((p for p in snap.shmem.pages if p.shmid == abi.FREQ_PAGE_SHMID), None)
    if page is None:
        raise SnapshotError("page-state-missing", "the writer's state of a page the record does not carry")
    try:
        counts = page_counts(fds[page.fd], [abi.page_domain_offset(i) for i in range(abi.MAX_DOMAINS)])
    except OSError as exc:
        raise SnapshotError("unusable-fd", str(exc)) from None
    return at_page(snap, counts)


def from_store(named: list[tuple[str, int]], store: FdStore, vms: set[str], *,
               shared: bool = False) -> tuple[list[tuple[str, int]], dict[str, socket.socket], Taken | None, Keeper]:
    """Split what systemd passed: (the fds not ours, listeners by VM, the sessions to resume, a Keeper).

    ``shared``: this configuration has the shared socket, so a session of a VM not configured may be
    one of its own (its record says who its peer was; the daemon checks the peer again).  Every fd of
    ours that is not used is closed here and removed from the store.
    """
    rest: list[tuple[str, int]] = []
    listeners: dict[str, socket.socket] = {}
    records: dict[str, int] = {}
    objects: dict[str, dict[str, int]] = {}
    serials: dict[str, int] = {}
    unused: list[tuple[str, int]] = []
    for name, fd in named:
        parsed = parse_name(name)
        if parsed is None:
            rest.append((name, fd))
            continue
        vm, kind, serial = parsed
        if vm not in vms and (kind == "l" or not shared):
            unused.append((name, fd))
        elif kind == "l" and vm not in listeners:
            listeners[vm] = socket.socket(fileno=fd)
        elif kind == "r" and vm not in records:
            records[vm] = fd
        elif kind == "f" and serial is not None and name not in objects.setdefault(vm, {}):
            objects[vm][name] = fd
            serials[vm] = max(serials.get(vm, 0), serial)
        else:
            unused.append((name, fd))
    taken = Taken(0, origin="fdstore")
    held: dict[str, dict[str, int]] = {}
    replay: dict[str, bytes] = {}
    for vm in sorted(set(records) | set(objects)):
        objs = objects.get(vm, {})
        used: dict[str, int] = {}
        fds: list[int] = []
        try:
            if vm not in records:
                raise SnapshotError("missing-record", "the session's fds are stored, its record is not")
            rec = decode_record(_read_all(records[vm], PENDING_AREA))
            if rec is None:
                continue  # no session when the process went; stray objects are closed below
            if rec.busy:
                raise SnapshotError("mid-message", "the process died while handling a front-end message")
            for name in rec.names:
                if name not in objs:
                    raise SnapshotError("missing-fd", f"{name} is not in the store")
                # One object named at several indices (the regions of one memory backend): one fd each.
                fds.append(os.dup(objs[name]) if name in used else objs[name])
                used[name] = objs[name]
            snap = decode_snapshot(rec.snapshot, len(fds))
            if snap.vm != vm:
                raise SnapshotError("wrong-vm", f"record of {snap.vm!r} stored for {vm!r}")
            if vm not in vms and snap.peer is None:
                raise SnapshotError("unknown-vm", f"no VM {vm!r} is configured here, nor was it a shared socket's")
            raw = rec.snapshot if rec.clean else encode(_after_crash(snap, fds))
            if rec.replay:
                replay[vm] = decode_pending(os.pread(records[vm], PENDING_AREA, 0))
            # The keeper's own duplicates: the resumed session's objects are in the store already.
            held[vm] = {name: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for name, fd in used.items()}
            taken.sessions.append((raw, fds))
        except (SnapshotError, OSError) as exc:
            reason = exc.reason if isinstance(exc, SnapshotError) else "unusable-fd"
            log.error("[%s] the session kept in systemd's fd store cannot be resumed (its front-end sees "
                      "the connection close): %s", vm, exc)
            taken.dropped.append((vm, reason))
            for fd in fds:
                if fd not in used.values():
                    os.close(fd)  # the duplicates made above
            used = {}
            if vm in records:
                os.ftruncate(records[vm], 0)
        finally:
            unused += [(n, fd) for n, fd in objs.items() if n not in used]
    for name, fd in unused:
        store.remove(name)
        try:
            os.close(fd)
        except OSError:
            pass
    keeper = Keeper(store, records, held, serials, replay)
    keeper.listeners.update(listeners)
    keeper.listeners.update((name, _SOCKET_UNIT) for name, _ in rest if name in vms)
    return rest, listeners, (taken if taken.sessions or taken.dropped else None), keeper
