"""A live session stopped, written down, and rebuilt in another process (the shell of session_snapshot.py).

Theory of operation: :func:`freeze` stops a :class:`Session` at a quiescent
point: called between two loop callbacks, so no message is half handled; the
kick lane is detached (it gives the queue's cursor and the sequence tracker
back, after its last turn, with everything it consumed published); kick fds
leave the loop; nothing is reset, no ring stopped, no clamp released.
:func:`snapshot` then writes the session down with the fds it holds (they stay
open: the old process exits without closing them).  :func:`thaw` undoes
:func:`freeze` when the successor did not take over.

:func:`restore` builds the session again in the new process from a decoded
snapshot and the received fds: maps each region, re-attaches the back-end
channel and each ring's kick/call/err fds, restores the device's state and
starts each running ring at its recorded avail and used indices, so the next
buffer the guest makes available is the next one served.  Buffers made
available while neither process served are found there on start.
"""

from __future__ import annotations

import os
import socket

from vhost_user_cpufreq.protocol import session_effects as fx
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import ProtocolError
from vhost_user_cpufreq.protocol.session_snapshot import (
    PeerSnapshot,
    RegionSnapshot,
    RingSnapshot,
    SessionSnapshot,
    SnapshotError,
    encode,
    machine_state,
    restore_machine,
)
from vhost_user_cpufreq.protocol.virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

from .memory import MemoryMap
from .session import Ring, Session, _map_into

__all__ = ["freeze", "thaw", "snapshot", "live_snapshot", "guest_used", "restore"]


def freeze(session: Session) -> None:
    """Stop serving the session without changing what the front-end or the guest can see."""
    session.frozen = True
    for ring in session.rings:
        if ring.offload is not None:
            off, ring.offload = ring.offload, None
            off.detach()
        else:
            if ring.kick_fd is not None:
                session.loop.remove_reader(ring.kick_fd)
        if ring.deadline is not None:
            ring.deadline.cancel()
            ring.deadline = None
        ring.batcher = None


def thaw(session: Session) -> None:
    """Serve again after :func:`freeze` (the handover did not happen)."""
    session.frozen = False
    for ring in session.rings:
        if ring.kick_fd is not None:
            session.loop.add_reader(ring.kick_fd, session._on_kick, ring)
        if ring.queue is not None and not session._offload(ring):
            ring.scheduled = False
            session._schedule(ring)  # kicks that came while frozen


def snapshot(session: Session, connection_fd: int, *, mid_message: bool,
             peer: PeerSnapshot | None = None) -> tuple[bytes, list[int]]:
    """The frozen session as bytes and the fds they name, in order (the fds stay open and ours).

    :raise SnapshotError: the session cannot be carried (named by the reason).
    """
    if not session.frozen:
        raise SnapshotError("not-frozen", "a session is written down only when frozen")
    if mid_message:
        raise SnapshotError("mid-message", "part of a front-end message was read and not handled")
    return _describe(session, connection_fd, exact=True, peer=peer)


def live_snapshot(session: Session, connection_fd: int, peer: PeerSnapshot | None = None) -> tuple[bytes, list[int]]:
    """The serving session's control-plane state (the fd store's record), and its fds in order.

    Ring positions in it are whatever the event loop last saw (the kick lane moves them meanwhile):
    a process that resumes it takes them from the rings in guest memory (:func:`guest_used`).
    """
    return _describe(session, connection_fd, exact=False, peer=peer)


def _describe(session: Session, connection_fd: int, *, exact: bool,
              peer: PeerSnapshot | None) -> tuple[bytes, list[int]]:
    dev_snapshot = getattr(session.device, "snapshot", None)
    if dev_snapshot is None:
        raise SnapshotError("device-cannot-snapshot", type(session.device).__name__)
    owner, acked, features_set, protocol_features, status, _ = machine_state(session.machine)
    fds: list[int] = []

    def ref(fd: int | None) -> int | None:
        if fd is None:
            return None
        fds.append(fd)
        return len(fds) - 1

    def need(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    conn = ref(connection_fd)
    assert conn is not None
    backend = ref(session.backend_channel.fileno() if session.backend_channel is not None else None)
    rings = []
    for ring in session.rings:
        st, q = ring.state, ring.queue
        if q is not None:
            if q.broken:
                raise SnapshotError("ring-broken", f"ring {ring.index} was abandoned")
            if exact:
                if q.in_flight:
                    raise SnapshotError("buffers-in-flight", f"ring {ring.index}: {q.in_flight}")
                q.publish()
            last, used, signalled = q.last_avail_idx, q.used_idx, q.signalled
        else:
            last, used, signalled = ring.base, ring.base, None
        rings.append(RingSnapshot(ring.index, st.num, st.addr, st.started, st.enabled, st.polling, st.running,
                                  last, used, signalled, ref(ring.kick_fd), ref(ring.call_fd), ref(ring.err_fd)))
    regions = []
    for r in session.memory.regions:
        fd = ref(r.fd)
        if fd is None:
            raise SnapshotError("region-without-fd", f"region at {r.guest_phys_addr:#x}")
        regions.append(RegionSnapshot(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset, fd))
    rules = session.machine.shmem
    shmem = (session.shmem.describe(need, channel=rules.channel, mapped=rules.mapped)
             if rules.sizes else None)
    snap = SessionSnapshot(session.name, conn, backend, owner, acked, features_set, protocol_features, status,
                           tuple(rings), tuple(regions), dev_snapshot(), shmem, peer)
    return encode(snap), fds


def guest_used(snap: SessionSnapshot, fds: list[int]) -> dict[int, int]:
    """Each running ring's used index as the guest's memory holds it now (the fds stay the caller's).

    :raise SnapshotError: a ring's used ring is not in the snapshot's memory, or it cannot be mapped.
    """
    memory = MemoryMap()
    try:
        for g in snap.regions:
            _map_into(memory, fds[g.fd], vu.MemoryRegion(g.guest_phys_addr, g.size, g.userspace_addr, g.mmap_offset))
        out = {}
        for r in snap.rings:
            if r.running and r.addr is not None:
                out[r.index] = int.from_bytes(memory.view_va(r.addr.used_user_addr + 2, 2), "little")
        return out
    except ProtocolError as exc:
        raise SnapshotError(exc.reason, str(exc)) from None
    except OSError as exc:
        raise SnapshotError("unusable-fd", str(exc)) from None
    finally:
        memory.clear()


def restore(session: Session, snap: SessionSnapshot, fds: list[int]) -> socket.socket:
    """Bring a fresh ``session`` to the state ``snap`` records; returns the front-end's connection.

    Takes every fd in ``fds``: those it keeps are the session's (closed with it), the rest are
    closed here.  On failure every fd is closed (the session too) and SnapshotError says why.
    """
    owned: set[int] = set()  # fds the session holds now, or closed already
    try:
        return _restore(session, snap, fds, owned)
    except (ProtocolError, OSError, ValueError) as exc:
        session.close()
        for fd in fds:
            if fd not in owned:
                _close(fd)
        if isinstance(exc, SnapshotError):
            raise
        reason = exc.reason if isinstance(exc, ProtocolError) else "unusable-fd"
        raise SnapshotError(reason, str(exc)) from None


def _restore(session: Session, snap: SessionSnapshot, fds: list[int], owned: set[int]) -> socket.socket:
    if snap.vm != session.name:
        raise SnapshotError("wrong-vm", f"snapshot of {snap.vm!r} offered to {session.name!r}")
    machine = restore_machine(session.machine.device, snap)
    restore_device = getattr(session.device, "restore", None)
    if restore_device is None:
        raise SnapshotError("device-cannot-restore", type(session.device).__name__)
    for g in snap.regions:
        fd = fds[g.fd]
        _map_into(session.memory, fd, vu.MemoryRegion(g.guest_phys_addr, g.size, g.userspace_addr, g.mmap_offset))
        owned.add(fd)
        _close(fd)  # the region keeps a duplicate of its own
    session.machine = machine
    session.rings = [Ring(r) for r in machine.rings]
    restore_device(snap.device)
    if snap.backend_channel_fd is not None:
        fd = fds[snap.backend_channel_fd]
        owned.add(fd)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        session.backend_channel = sock
    for ring, r in zip(session.rings, snap.rings):
        ring.base = r.last_avail
        ring.polling = r.polling
        for which in ("call", "err"):
            i = getattr(r, f"{which}_fd")
            if i is not None:
                owned.add(fds[i])
                os.set_blocking(fds[i], False)
                setattr(ring, f"{which}_fd", fds[i])
        if r.kick_fd is not None:
            owned.add(fds[r.kick_fd])
            session._set_kick(ring, fds[r.kick_fd])
    acked = snap.acked_features
    for ring, r in zip(session.rings, snap.rings):
        if r.running:
            assert r.addr is not None
            session._start_ring(fx.StartRing(r.index, r.num, r.addr,
                                             event_idx=bool(acked & 1 << VIRTIO_RING_F_EVENT_IDX),
                                             indirect=bool(acked & 1 << VIRTIO_RING_F_INDIRECT_DESC)),
                                cursor=(r.used_idx, r.signalled))
    if snap.shmem is not None:
        session.shmem.restore(snap.shmem, fds, session.backend_channel, owned)
    conn_fd = fds[snap.connection_fd]
    owned.add(conn_fd)
    return socket.socket(fileno=conn_fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
