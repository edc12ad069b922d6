"""Live handover between two service processes over a unix socket (the shell of protocol/handover.py).

Theory of operation: the new process (``serve --take-over CONTROL_SOCKET``)
connects to the running one's control socket and sends ``handover``.  The
old process answers on that connection with the frames of
protocol/handover.py, driven here with blocking calls *on its event loop
thread*: while the exchange runs, no message, kick or timer of any session
is served, which is what makes the point quiescent.  It freezes every session
(vhost/handover.py), sends each VM's listening socket and each session's
snapshot with its fds (SCM_RIGHTS; a shared socket's session with its
peer's identity, checked again by the new process), and on ACK sends BYE and exits at once,
without closing an fd, undoing a clamp or restoring a thread: the fds now
live in the new process too, and the threads are its charge.  Without ACK it
thaws every session and serves on.

The new process then waits for the old one to be gone (pidfd), so the
control socket, the metrics port and the state file are its own, and the
daemon starts from the received listening sockets and resumes each session
(Service.resume).  A session whose snapshot cannot be resumed is closed
alone, logged and counted (``handover_dropped``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhost_user_cpufreq.protocol.errors import ProtocolError
from vhost_user_cpufreq.protocol.handover import (
    F_KEEPS_STORE,
    MAX_FRAME_FDS,
    Frame,
    FrameReader,
    HandoverError,
    NewSide,
    OldSide,
)
from vhost_user_cpufreq.protocol.handover import Outcome
from vhost_user_cpufreq.protocol.session_snapshot import SnapshotError

from ..vhost.handover import freeze, snapshot, thaw
from ..vhost.transport import FdsTruncated, recv_with_fds, send_with_fds

if TYPE_CHECKING:
    from .vms import Service, VmSlot

__all__ = ["Taken", "give_over", "take_over", "HANDOVER_TIMEOUT"]

log = logging.getLogger("vhost_user_cpufreq.handover")

#: the longest either side waits for the other's next frame
HANDOVER_TIMEOUT = 10.0


@dataclass
class Taken:
    """What the new process received: listening sockets by VM, sessions (snapshot, fds), the old pid."""

    old_pid: int
    not_carried: int = 0  # sessions the old process could not write down (closed when it exited)
    origin: str = "handover"  # or "fdstore": kept in systemd's fd store by a process that died or stopped
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (VM, reason) of sessions refused before resume
    listeners: dict[str, socket.socket] = field(default_factory=dict)
    sessions: list[tuple[bytes, list[int]]] = field(default_factory=list)
    #: by session index: (VM, last serial, the store's names of its fds, its record memfd): the old
    #: process's entries in systemd's fd store, for a new process that keeps the store too
    stores: dict[int, tuple[str, int, tuple[str, ...], int]] = field(default_factory=dict)


def _next(reader: FrameReader, sock: socket.socket) -> Frame:
    """The next frame; ConnectionError when the peer closes first."""
    while True:
        f = reader.next_frame()
        if f is not None:
            return f
        try:
            data, fds = recv_with_fds(sock, 1 << 16, max_fds=MAX_FRAME_FDS)
        except FdsTruncated as exc:
            raise HandoverError(exc.reason, "more fds than a frame may carry") from None
        reader.receive(data, fds)
        if not data:
            raise ConnectionError("the other process closed the handover connection")


# -- the old process ------------------------------------------------------------------------------
def give_over(service: "Service", sock: socket.socket, timeout: float = HANDOVER_TIMEOUT) -> bool:
    """Hand every VM over on ``sock``; True once the successor has it all (the caller exits now)."""
    keeper = service.keeper
    old = OldSide(os.getpid(), F_KEEPS_STORE if keeper is not None and keeper.enabled else 0)
    reader = FrameReader()
    sock.settimeout(timeout)
    frozen: list["VmSlot"] = []
    afresh: set[str] = set()  # VMs whose store entries the successor cannot go on with
    t0 = time.monotonic()
    try:
        send_with_fds(sock, old.hello())
        old.receive(_next(reader, sock))
        if old.state == "aborted":
            log.warning("the new process refused the handover; serving on")
            return False
        for slot in service.vms.values():
            if slot.connection is not None:
                # (a VM of the shared socket goes with its peer's identity: the successor checks it again)
                freeze(slot.connection.session)
                frozen.append(slot)
        for name, slot in service.vms.items():
            if slot.server is not None:
                send_with_fds(sock, old.listener(name), [slot.server.fileno()])
        for slot in frozen:
            conn = slot.connection
            assert conn is not None
            try:
                raw, fds = snapshot(conn.session, conn.sock.fileno(), mid_message=conn.reader.buffered > 0,
                                    peer=slot.peer_record)
            except SnapshotError as exc:
                # Not carried: its connection closes when this process exits.
                slot.log.error("session cannot be handed over (its front-end will see the connection close): %s",
                               exc)
                old.not_carried += 1
                afresh.add(slot.config.name)  # out of the store too, or systemd would hold its connection open
                continue
            send_with_fds(sock, old.session(raw, len(fds)), fds)
            if old.both_keep_store and keeper is not None:
                entries = keeper.entries(slot.config.name, fds)
                if entries is None:  # the successor stores the session afresh
                    afresh.add(slot.config.name)
                else:
                    record_fd, serial, names = entries
                    send_with_fds(sock, old.store(slot.config.name, serial, names), [record_fd])
        send_with_fds(sock, old.done())
        old.receive(_next(reader, sock))
    except (OSError, ProtocolError) as exc:
        log.error("handover failed at %s: %s; serving on", old.state, exc)
    if old.outcome() is Outcome.NEW_SERVES:
        if keeper is not None and keeper.enabled:
            # A successor that keeps no store: what systemd holds of ours would keep QEMU's connections open
            # after the successor closed them, and a later start of the unit would serve them again.
            keeper.forget(None if not old.both_keep_store else afresh)
        try:
            send_with_fds(sock, old.bye())
        except OSError:
            pass  # the successor learns it from our exit
        log.info("handed %d VMs and %d sessions over to pid %s in %.1f ms; exiting", old.sent_listeners,
                 old.sent_sessions, old.peer_pid, 1000 * (time.monotonic() - t0))
        return True
    for fd in reader.release_fds():
        os.close(fd)
    for slot in frozen:
        if slot.connection is not None:
            thaw(slot.connection.session)
    return False


# -- the new process ------------------------------------------------------------------------------
def take_over(control_path: str, timeout: float = HANDOVER_TIMEOUT, *, keeps_store: bool = False) -> Taken | None:
    """Ask the service on ``control_path`` for everything; None if it serves on (nothing kept here).

    ``keeps_store``: this process keeps systemd's fd store (the old one's entries come too).
    """
    new = NewSide(os.getpid(), F_KEEPS_STORE if keeps_store else 0)
    reader = FrameReader()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(control_path)
            sock.sendall(b"handover\n")
            while new.state not in ("complete", "aborted"):
                answer = new.receive(_next(reader, sock))
                if answer is not None:
                    send_with_fds(sock, answer)
        except (OSError, ProtocolError) as exc:
            log.warning("handover from %s ended at %s: %s", control_path, new.state, exc)
    outcome = new.outcome()
    if outcome is not Outcome.OLD_SERVES and new.peer_pid is not None:
        # The old process exits right after BYE; when BYE was lost, its exit is the answer.
        gone = _wait_exit(new.peer_pid, timeout)
        if outcome is Outcome.UNCERTAIN:
            outcome = Outcome.NEW_SERVES if gone else Outcome.OLD_SERVES
        elif not gone:
            log.warning("pid %d sent BYE but has not exited after %.0f s", new.peer_pid, timeout)
    leftovers = reader.release_fds()
    if outcome is not Outcome.NEW_SERVES or new.peer_pid is None:
        for fd in new.received_fds() + leftovers:
            os.close(fd)
        return None
    for fd in leftovers:
        os.close(fd)
    taken = Taken(new.peer_pid, new.not_carried)
    for name, fd in new.listeners:
        taken.listeners[name] = socket.socket(fileno=fd)
    taken.sessions = [(raw, list(fds)) for raw, fds in new.sessions]
    taken.stores = dict(new.stores)
    return taken


def _wait_exit(pid: int, timeout: float) -> bool:
    """Has ``pid`` exited (a zombie counts) within ``timeout``?"""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        r, _, _ = select.select([pfd], [], [], timeout)
        return bool(r)
    finally:
        os.close(pfd)
