"""asyncio transport: unix stream sockets carrying vhost-user messages and fds.

asyncio's streams cannot carry SCM_RIGHTS, so a :class:`Connection` drives a
non-blocking socket directly with ``loop.add_reader`` and ``recvmsg``.  It is
the thin shell around the sans-IO pieces: bytes and fds go into a
``MessageReader``, messages go to the :class:`Session`, replies go back out.
Anything that goes wrong with one connection ends that connection only:
``closed`` resolves and the owner (the service) forgets the session.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from typing import Callable

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import ProtocolError

from ..counters import Counters
from .session import Session

__all__ = ["Connection", "FdsTruncated", "recv_with_fds", "send_with_fds", "peer_credentials", "MAX_FDS"]

#: More than any message carries (SET_MEM_TABLE: 8); extra fds are closed.
MAX_FDS = 32
#: fds a front-end may have in flight to us at once: those of messages not yet complete.
#: Sent one byte of a message at a time, each with MAX_FDS fds, they would pile up.
MAX_HELD_FDS = 2 * MAX_FDS
_RECV_SIZE = 65536
_FD_SIZE = array.array("i").itemsize


class FdsTruncated(ConnectionError):
    """More fds came with one message than the receiver allows (the kernel dropped the rest)."""

    reason = "fds-truncated"


def recv_with_fds(sock: socket.socket, size: int = _RECV_SIZE, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: data and every fd passed with it, at most ``max_fds``.

    :raise FdsTruncated: more came; the fds that did arrive are closed.
    """
    # Close-on-exec from the start: nothing the service runs may inherit a front-end's fds.
    data, ancdata, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise FdsTruncated(f"more than {max_fds} fds in one message (control data truncated)")
    return data, fds


def send_with_fds(sock: socket.socket, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
    """Send all of ``data`` (with ``fds`` on the first byte); raises BlockingIOError if the peer stalls."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class Connection:
    """One front-end connection and its session."""

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        *,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        log: logging.LoggerAdapter[logging.Logger],
        on_close: Callable[["Connection"], None] | None = None,
    ) -> None:
        self.sock = sock
        self.session = session
        self.loop = loop
        self.counters = counters
        self.log = log
        self.reader = vu.MessageReader("frontend")
        self.closed: asyncio.Future[str] = loop.create_future()
        self._on_close = on_close
        #: called with (True, the bytes about to be read, or None when fds come with them) before each
        #: read from the socket and with (False, None) once everything read was handled (the fd store
        #: marks its record busy meanwhile, or keeps the bytes to handle again: service/fdstore.py)
        self.watch: Callable[[bool, bytes | None], None] | None = None
        self.peer_pid, self.peer_uid, self.peer_gid = peer_credentials(sock)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)
        session.on_fatal = self._fatal

    def _fatal(self, reason: str) -> None:
        """The session (its device) cannot go on: closed and counted as a protocol error would be."""
        if not self.closed.done():
            self.counters.inc("sessions_closed", reason)
            self.close(reason)

    def _readable(self) -> None:
        if self.watch is None:
            self._receive()
            return
        try:
            # Looked at before it is taken: a process killed meanwhile loses nothing.
            data, anc, _, _ = self.sock.recvmsg(_RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                                                socket.MSG_PEEK | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        peeked: bytes | None = data
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                for fd in arr:
                    _close_quietly(fd)  # duplicates made by the peek; the read below takes the real ones
                peeked = None
        self.watch(True, peeked)
        try:
            self._receive(len(data) if peeked else _RECV_SIZE)
        finally:
            if not self.closed.done():
                self.watch(False, None)

    def replay(self, data: bytes) -> None:
        """Handle ``data`` as if it had just been read (messages a predecessor read and did not answer)."""
        if not self.closed.done():
            self._consume(data, [])

    def _receive(self, size: int = _RECV_SIZE) -> None:
        try:
            data, fds = recv_with_fds(self.sock, size)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        self._consume(data, fds)

    def _consume(self, data: bytes, fds: list[int]) -> None:
        try:
            self.reader.receive_data(data, fds)
            while True:
                msg = self.reader.next_message()
                if msg is vu.NEED_DATA:
                    break
                assert isinstance(msg, vu.Message)
                self.log.debug("<- %s", vu.describe(msg))
                reply = self.session.handle(msg)
                if reply is not None:
                    try:
                        send_with_fds(self.sock, *reply)
                    except BlockingIOError:
                        self.counters.inc("sessions_closed", "peer-not-reading")
                        self.close("front-end does not read its replies")
                        return
                    except OSError as exc:
                        # Typically EPIPE: the front-end died with requests in flight.
                        self.counters.inc("sessions_closed", "send-failed")
                        self.close(f"send failed: {exc.strerror or exc}")
                        return
            if self.reader.held_fds > MAX_HELD_FDS:
                self.counters.inc("sessions_closed", "too-many-fds")
                self.log.warning("closing session: %d fds held for messages not yet complete (at most %d)",
                                 self.reader.held_fds, MAX_HELD_FDS)
                self.close("too-many-fds")
                return
        except ProtocolError as exc:
            for fd in getattr(exc, "fds", ()):
                _close_quietly(fd)
            if exc.reason != "truncated-message" or data:
                self.counters.inc("sessions_closed", exc.reason)
                self.log.warning("closing session: %s", str(exc))
            self.close(exc.reason)
            return
        if not data:
            self.close("front-end disconnected")

    def close(self, why: str = "closed") -> None:
        if self.closed.done():
            return
        self.loop.remove_reader(self.sock.fileno())
        self.session.close()
        try:
            # fds of messages received but not handled (after a refused one, or a truncated tail)
            held = self.reader.release_fds()
        except ProtocolError:
            held = ()
        for fd in held:
            _close_quietly(fd)
        self.reader = vu.MessageReader("frontend")
        self.sock.close()
        self.closed.set_result(why)
        self.log.info("session ended: %s", why)
        if self._on_close is not None:
            self._on_close(self)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
