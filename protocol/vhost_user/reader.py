"""The incremental reader: bytes and fds in, one Message at a time out."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import ClassVar, Final, Literal

from ..errors import LocalProtocolError, MessageError
from .codec import Header, Message, decode_backend, decode_frontend, decode_header, decode_reply, error_fds
from .constants import HEADER_SIZE, BackendRequest, FrontendRequest

# ---------------------------------------------------------------------------
# Reader


class NeedData:
    """Sentinel type: :meth:`MessageReader.next_message` needs more bytes."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class MessageReader:
    """Incremental parser for one direction of one vhost-user socket.

    ``side`` names the *sender* of the bytes fed in: a back-end reads the
    main socket with ``MessageReader("frontend")`` (front-end requests, and
    on the back-end channel the front-end's replies to our BACKEND_*
    requests); a front-end uses ``MessageReader("backend")``.

    File descriptors: pass each recvmsg() chunk with the fds that came in
    its SCM_RIGHTS.  They are attributed to the message that the chunk's
    *last* byte belongs to -- equivalently, to the last message that starts
    inside the chunk, or, if none starts there, to the message the chunk's
    first byte belongs to.  Why: every sender we know (QEMU's
    vhost_user_write, rust-vmm, libvhost-user) passes a message's fds with
    the sendmsg() that starts that message, and Linux attaches them to
    that write's first skb.  unix_stream_read_generic() glues the data of
    several queued skbs into one recvmsg() but *stops right after* the skb
    carrying fds, delivering those fds with that call.  So fds arrive with
    the chunk that contains their message's first byte, and that message is
    the last one to start in the chunk; the chunk may begin with the tail
    (or the whole) of earlier fd-less messages, e.g. SET_VRING_NUM,
    SET_VRING_ADDR and SET_VRING_KICK's fd in one recvmsg().  Attributing
    fds to the chunk's first byte would hand KICK's fd to SET_VRING_NUM.

    After a MessageError the reader is dead: the exception carries in
    ``err.fds`` every fd the reader still held (the failed message's and any
    buffered after it), for the caller to close; further calls raise
    LocalProtocolError.  ``receive_data(b"")`` signals EOF; afterwards
    NEED_DATA from :meth:`next_message` means a clean end of stream (see
    :attr:`closed`), while a partial message raises "truncated-message".
    """

    def __init__(self, side: Literal["frontend", "backend"]) -> None:
        if side not in ("frontend", "backend"):
            raise LocalProtocolError("bad-side", f"side={side!r}")
        self.side: Final = side
        self._buf = bytearray()
        self._pos = 0  # index in _buf of the first unconsumed byte
        self._base = 0  # stream offset of _buf[_pos]
        # (stream offset of the byte the fds are attributed to, fds), ascending
        self._fds: deque[tuple[int, tuple[int, ...]]] = deque()
        self._header: Header | None = None
        self._eof = False
        self._failed = False

    @property
    def closed(self) -> bool:
        """EOF was received and every byte and fd was consumed."""
        return self._eof and not self.buffered and not self._fds and not self._failed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as (part of) a message."""
        return len(self._buf) - self._pos

    @property
    def held_fds(self) -> int:
        """fds received and not yet handed out with a message (a sender can pile them up)."""
        return sum(len(fds) for _, fds in self._fds)

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Buffer a received chunk and its fds; empty ``data`` means EOF.

        On LocalProtocolError (after EOF or a failure) the fds stay the caller's.
        """
        if self._failed:
            raise LocalProtocolError("reader-failed", "receive_data after a MessageError")
        if self._eof:
            raise LocalProtocolError("data-after-eof", "receive_data after EOF")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        end = self._base + len(self._buf) + len(data)
        if fds:
            # Attributed to the chunk's last byte; fds with EOF sit past the
            # stream's end, where no message can claim them ("stray-fds").
            self._fds.append((end - 1 if len(data) else end, tuple(fds)))
        if len(data) == 0:
            self._eof = True
        else:
            self._buf += data

    def _take_fds(self, end: int) -> tuple[int, ...]:
        out: list[int] = []
        while self._fds and self._fds[0][0] < end:
            out.extend(self._fds.popleft()[1])
        return tuple(out)

    def release_fds(self) -> tuple[int, ...]:
        """Give up every fd still held (the connection is going away); the caller closes them."""
        return self._take_fds(1 << 64)

    def _fail(self, err: MessageError) -> MessageError:
        """Enter the ERROR state; hand every fd still held to the exception."""
        self._failed = True
        setattr(err, "fds", error_fds(err) + self._take_fds(1 << 64))
        self._buf.clear()
        self._pos = 0
        self._header = None
        return err

    def next_message(
        self, expect_reply_to: FrontendRequest | BackendRequest | None = None
    ) -> Message | NeedData:
        """The next complete message, or NEED_DATA.

        With ``expect_reply_to`` the next message must be the reply to that
        request (sent by our peer, so a FrontendRequest when side is
        "backend" and a BackendRequest when side is "frontend").
        """
        if self._failed:
            raise LocalProtocolError("reader-failed", "next_message after a MessageError")
        if expect_reply_to is not None:
            want = FrontendRequest if self.side == "backend" else BackendRequest
            if not isinstance(expect_reply_to, want):
                raise LocalProtocolError(
                    "bad-request-type",
                    f"a {self.side} sends replies to {want.__name__}, not {expect_reply_to!r}",
                )
        pos = self._pos
        try:
            header = self._header
            if header is None:
                if self.buffered < HEADER_SIZE:
                    return self._starved()
                header = decode_header(bytes(self._buf[pos : pos + HEADER_SIZE]))
                self._header = header
            total = HEADER_SIZE + header.size
            if self.buffered < total:
                return self._starved()
        except MessageError as err:
            raise self._fail(err) from None

        payload = bytes(self._buf[pos + HEADER_SIZE : pos + total])
        fds = self._take_fds(self._base + total)
        self._pos = pos + total
        self._base += total
        self._header = None
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        try:
            if expect_reply_to is not None:
                return decode_reply(header, payload, fds, expect_reply_to)
            if self.side == "frontend":
                return decode_frontend(header, payload, fds)
            return decode_backend(header, payload, fds)
        except MessageError as err:
            raise self._fail(err) from None

    def _starved(self) -> NeedData:
        if not self._eof:
            return NEED_DATA
        if self.buffered:
            raise MessageError(
                "truncated-message", f"EOF with {self.buffered} bytes of a partial message"
            )
        if self._fds:
            raise MessageError("stray-fds", "EOF with file descriptors not tied to any message")
        return NEED_DATA
