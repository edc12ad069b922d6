"""The handover exchange between a running service process (old) and its successor (new), sans-IO.

Theory of operation: the new process asks the old one (control socket line
``handover``) and the connection then carries frames: a 12-byte header
(magic ``VUCH``, type, fd count, body length) and a body; a frame's fds go
with it in SCM_RIGHTS and the reader hands them out in order, so a frame
whose fds did not arrive is an error, never a misattribution.

::

    old                                   new
     | -- HELLO(version, pid, flags) -----> |
     | <----- HELLO(version, pid, flags) -- |   (or ABORT: the old goes on)
     |    old stops serving (quiescent)     |
     | -- LISTENER(vm) + 1 fd -----------> |   one per VM
     | -- SESSION(snapshot) + n fds -----> |   one per connected front-end
     | -- STORE(names) + 1 fd -----------> |   after a SESSION, if both keep systemd's fd store
     | -- DONE(listeners, sessions, lost) > |   lost: sessions it could not write down
     | <------------------------- ACK ---- |   the new has it all
     | -- BYE ---------------------------> |   the old will never serve again
     |    old exits, closing nothing       |   new serves

Who serves after a cut is decided by one rule: the old process commits to
leaving when it reads ACK, not before.  A cut before ACK, a refused hello or
a timeout: the old resumes serving and the new closes what it received.  A
cut after the new sent ACK and before BYE is the one doubt; the new waits for
the old process to exit (it then serves) or to be seen alive after closing
the connection (it resumed: the new gives everything back).  :class:`Outcome`
names each case; :class:`OldSide` and :class:`NewSide` move only through the
transitions drawn above and raise :class:`HandoverError` on anything else.

systemd's fd store (protocol/fdstore.py): a HELLO flag says a process keeps
one.  When both do, each SESSION is followed by STORE: the store's name of
each of the session's fds (in the snapshot's order), the last serial number
given, and the session's record memfd, so the new process goes on with the
very entries the store holds (systemd keeps an open file once, under the
first name it was given: a new name for it would be ignored).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .fdstore import parse_name

__all__ = ["HANDOVER_VERSION", "HandoverError", "FrameType", "Frame", "FrameReader", "Outcome", "OldSide",
           "NewSide", "encode_frame", "MAX_FRAME_FDS", "F_KEEPS_STORE"]

HANDOVER_VERSION = 2  # 2: HELLO flags, STORE
_HEADER = struct.Struct("<4sBxHI")  # magic, type, pad, number of fds, body length
_MAGIC = b"VUCH"
MAX_BODY = 1 << 17
#: a session's fds: connection, back-end channel, 3 per ring, one per memory region (32)
MAX_FRAME_FDS = 64
_HELLO = struct.Struct("<HIB")  # version, pid, flags
#: HELLO flag: this process keeps systemd's fd store (it has $FDSTORE)
F_KEEPS_STORE = 1
_STORE = struct.Struct("<Q")  # the last serial number given to an object of the VM
_DONE = struct.Struct("<III")  # listeners, sessions, sessions that could not be carried


class HandoverError(RemoteProtocolError):
    """The other process broke the exchange; ``reason`` says how."""


class FrameType(enum.IntEnum):
    HELLO = 1
    LISTENER = 2
    SESSION = 3
    DONE = 4
    ACK = 5
    BYE = 6
    ABORT = 7
    STORE = 8


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: bytes
    fds: tuple[int, ...] = ()


def encode_frame(kind: FrameType, body: bytes = b"", nfds: int = 0) -> bytes:
    if len(body) > MAX_BODY or nfds > MAX_FRAME_FDS:
        raise HandoverError("frame-too-large", f"{kind.name}: {len(body)} bytes, {nfds} fds")
    return _HEADER.pack(_MAGIC, kind, nfds, len(body)) + body


class FrameReader:
    """Bytes and fds in, frames out.  Owns the fds it holds until a frame takes them."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def receive(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes come."""
        if len(self._buf) < _HEADER.size:
            return None
        magic, kind, nfds, length = _HEADER.unpack_from(self._buf)
        if magic != _MAGIC:
            raise HandoverError("bad-magic", f"{bytes(magic)!r}")
        try:
            t = FrameType(kind)
        except ValueError:
            raise HandoverError("unknown-frame", f"type {kind}") from None
        if length > MAX_BODY or nfds > MAX_FRAME_FDS:
            raise HandoverError("frame-too-large", f"{t.name}: {length} bytes, {nfds} fds")
        if len(self._buf) < _HEADER.size + length:
            return None
        if len(self._fds) < nfds:
            raise HandoverError("missing-fd", f"{t.name} announces {nfds} fds, {len(self._fds)} arrived")
        body = bytes(self._buf[_HEADER.size:_HEADER.size + length])
        del self._buf[:_HEADER.size + length]
        return Frame(t, body, tuple(self._fds.popleft() for _ in range(nfds)))

    @property
    def pending(self) -> bool:
        """Bytes of a frame not yet complete are buffered (a cut here lost part of a frame)."""
        return bool(self._buf)

    def release_fds(self) -> list[int]:
        """The fds no frame took (the caller closes them)."""
        out = list(self._fds)
        self._fds.clear()
        return out


class Outcome(enum.Enum):
    OLD_SERVES = "old-serves"  # the handover did not happen: the old process goes on
    NEW_SERVES = "new-serves"  # it happened: the old process has stopped for good
    UNCERTAIN = "uncertain"  # new side only: ACK sent, no BYE; ask whether the old process exited


class _Side:
    def __init__(self, pid: int, flags: int = 0) -> None:
        self.pid = pid
        self.flags = flags
        self.peer_pid: int | None = None
        self.peer_flags = 0
        self.reader = FrameReader()
        self.state = "start"

    def _expect(self, *states: str) -> None:
        if self.state not in states:
            raise HandoverError("out-of-order", f"in state {self.state}")

    def _hello(self) -> bytes:
        return encode_frame(FrameType.HELLO, _HELLO.pack(HANDOVER_VERSION, self.pid, self.flags))

    def _read_hello(self, f: Frame) -> None:
        if len(f.body) >= 2 and f.body[:2] != _HELLO.pack(HANDOVER_VERSION, 0, 0)[:2]:
            (version,) = struct.unpack_from("<H", f.body)
            raise HandoverError("version-mismatch", f"peer speaks handover version {version}, we {HANDOVER_VERSION}")
        if len(f.body) != _HELLO.size or f.fds:
            raise HandoverError("bad-hello", f"{len(f.body)} bytes, {len(f.fds)} fds")
        _, pid, flags = _HELLO.unpack(f.body)
        if flags & ~F_KEEPS_STORE:
            raise HandoverError("bad-hello", f"flags {flags:#x}")
        self.peer_pid, self.peer_flags = pid, flags

    @property
    def both_keep_store(self) -> bool:
        return bool(self.flags & self.peer_flags & F_KEEPS_STORE)


class OldSide(_Side):
    """The running process: offers, sends everything, commits on ACK."""

    def __init__(self, pid: int, flags: int = 0) -> None:
        super().__init__(pid, flags)
        self.sent_listeners = 0
        self.sent_sessions = 0
        self.not_carried = 0  # sessions that could not be written down (their front-ends see a close)

    def hello(self) -> bytes:
        self._expect("start")
        self.state = "hello-sent"
        return self._hello()

    def receive(self, f: Frame) -> None:
        """Apply a frame from the new process."""
        if f.type is FrameType.ABORT:
            self.state = "aborted"
            return
        if f.type is FrameType.HELLO:
            self._expect("hello-sent")
            self._read_hello(f)
            self.state = "sending"
        elif f.type is FrameType.ACK:
            self._expect("done-sent")
            if f.body or f.fds:
                raise HandoverError("bad-ack", "ACK carries nothing")
            self.state = "committed"
        else:
            raise HandoverError("out-of-order", f"{f.type.name} from the new process")

    def listener(self, vm: str) -> bytes:
        self._expect("sending")
        name = vm.encode()
        if not 0 < len(name) <= 256:
            raise HandoverError("bad-name", repr(vm))
        self.sent_listeners += 1
        return encode_frame(FrameType.LISTENER, name, 1)

    def session(self, snapshot: bytes, nfds: int) -> bytes:
        self._expect("sending")
        self.sent_sessions += 1
        return encode_frame(FrameType.SESSION, snapshot, nfds)

    def store(self, vm: str, serial: int, names: list[str] | tuple[str, ...]) -> bytes:
        """The store's entries of the session just sent (its record memfd goes with it)."""
        self._expect("sending")
        if not self.both_keep_store or not self.sent_sessions:
            raise HandoverError("out-of-order", "STORE without a session, or a peer that keeps no store")
        return encode_frame(FrameType.STORE, _STORE.pack(serial) + "\n".join([vm, *names]).encode(), 1)

    def done(self) -> bytes:
        self._expect("sending")
        self.state = "done-sent"
        return encode_frame(FrameType.DONE, _DONE.pack(self.sent_listeners, self.sent_sessions, self.not_carried))

    def bye(self) -> bytes:
        self._expect("committed")
        self.state = "gone"
        return encode_frame(FrameType.BYE)

    def outcome(self) -> Outcome:
        """Who serves if the exchange ends now (a cut, a timeout, an error)."""
        return Outcome.NEW_SERVES if self.state in ("committed", "gone") else Outcome.OLD_SERVES


class NewSide(_Side):
    """The successor: collects listeners and sessions, acknowledges, waits for the old to leave."""

    def __init__(self, pid: int, flags: int = 0) -> None:
        super().__init__(pid, flags)
        self.listeners: list[tuple[str, int]] = []
        self.sessions: list[tuple[bytes, tuple[int, ...]]] = []
        #: by session index: (VM, last serial, the store's name of each of its fds, its record memfd)
        self.stores: dict[int, tuple[str, int, tuple[str, ...], int]] = {}
        self.not_carried = 0  # sessions the old process could not write down

    def receive(self, f: Frame) -> bytes | None:
        """Apply a frame from the old process; returns the frame to answer with, if any."""
        if f.type is FrameType.ABORT:
            self._expect("start", "receiving")
            self.state = "aborted"
            return None
        if f.type is FrameType.HELLO:
            self._expect("start")
            try:
                self._read_hello(f)
            except HandoverError as exc:
                self.state = "aborted"
                return encode_frame(FrameType.ABORT, exc.reason.encode())
            self.state = "receiving"
            return self._hello()
        if f.type is FrameType.LISTENER:
            self._expect("receiving")
            if len(f.fds) != 1:
                raise HandoverError("bad-listener", f"{len(f.fds)} fds")
            try:
                name = f.body.decode()
            except UnicodeDecodeError:
                raise HandoverError("bad-listener", "name is not UTF-8") from None
            self.listeners.append((name, f.fds[0]))
            return None
        if f.type is FrameType.SESSION:
            self._expect("receiving")
            self.sessions.append((f.body, f.fds))  # decoded (and refused alone) by the caller
            return None
        if f.type is FrameType.STORE:
            self._expect("receiving")
            index = len(self.sessions) - 1
            if not self.both_keep_store or index < 0 or index in self.stores or len(f.fds) != 1:
                raise HandoverError("bad-store", f"STORE after {len(self.sessions)} sessions, {len(f.fds)} fds")
            self.stores[index] = (*_store_body(f.body), f.fds[0])
            return None
        if f.type is FrameType.DONE:
            self._expect("receiving")
            if len(f.body) != _DONE.size or f.fds:
                raise HandoverError("bad-done", f"{len(f.body)} bytes")
            nl, ns, self.not_carried = _DONE.unpack(f.body)
            if (nl, ns) != (len(self.listeners), len(self.sessions)):
                raise HandoverError("count-mismatch", f"DONE says {nl} listeners and {ns} sessions, "
                                    f"{len(self.listeners)} and {len(self.sessions)} came")
            self.state = "ack-sent"
            return encode_frame(FrameType.ACK)
        if f.type is FrameType.BYE:
            self._expect("ack-sent")
            self.state = "complete"
            return None
        raise HandoverError("out-of-order", f"{f.type.name} from the old process")

    def outcome(self) -> Outcome:
        if self.state == "complete":
            return Outcome.NEW_SERVES
        if self.state == "ack-sent":
            return Outcome.UNCERTAIN
        return Outcome.OLD_SERVES

    def received_fds(self) -> list[int]:
        """Every fd taken so far (to close them all when the old process serves on)."""
        return ([fd for _, fd in self.listeners] + [fd for _, fds in self.sessions for fd in fds]
                + [s[3] for s in self.stores.values()])


def _store_body(body: bytes) -> tuple[str, int, tuple[str, ...]]:
    if len(body) < _STORE.size:
        raise HandoverError("bad-store", f"{len(body)} bytes")
    (serial,) = _STORE.unpack_from(body)
    try:
        vm, *names = body[_STORE.size:].decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise HandoverError("bad-store", "names are not ASCII") from None
    for name in names:
        parsed = parse_name(name)
        if parsed is None or parsed[0] != vm or parsed[1] != "f":
            raise HandoverError("bad-store", f"{name[:80]!r} is not a name of VM {vm[:80]!r}'s objects")
    return vm, serial, tuple(names)
