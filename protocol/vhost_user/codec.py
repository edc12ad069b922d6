"""Headers and messages: decode a header and a payload into a Message, encode requests and replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LocalProtocolError, MessageError
from .constants import (
    _HEADER,
    _KNOWN_FLAGS,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    VERSION_MASK,
    VHOST_USER_VERSION,
    BackendRequest,
    FrontendRequest,
    _name,
)
from .payloads import Payload, _check_uint, _field_error
from .specs import PayloadSpec, spec_for

# ---------------------------------------------------------------------------
# Header and message


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    def __post_init__(self) -> None:
        _check_uint("Header", "request", self.request, 32)
        _check_uint("Header", "flags", self.flags, 32)
        _check_uint("Header", "size", self.size, 32)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def encode(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)


def _check_header(h: Header) -> None:
    if h.flags & VERSION_MASK != VHOST_USER_VERSION:
        raise MessageError(
            "bad-version", f"flags={h.flags:#x}: version {h.flags & VERSION_MASK}, expected 1"
        )
    if h.flags & ~_KNOWN_FLAGS:
        raise MessageError("reserved-flags", f"flags={h.flags:#x} sets reserved bits")
    if h.size > MAX_PAYLOAD_SIZE:
        raise MessageError(
            "oversized-payload", f"header size {h.size} > {MAX_PAYLOAD_SIZE} (request {h.request})"
        )


def decode_header(b: bytes | bytearray | memoryview) -> Header:
    """Parse and validate the 12-byte header.  Unknown request ids pass here."""
    if len(b) != HEADER_SIZE:
        raise LocalProtocolError("bad-header-length", f"{len(b)} bytes given, need {HEADER_SIZE}")
    h = Header(*_HEADER.unpack(b))
    _check_header(h)
    return h


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message.  ``fds`` are the caller's to close, always."""

    request: FrontendRequest | BackendRequest
    flags: int
    payload: Payload | None = None
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def _attach_fds(err: MessageError, fds: Sequence[int]) -> MessageError:
    if not hasattr(err, "fds"):
        setattr(err, "fds", tuple(fds))
    return err


def error_fds(err: BaseException) -> tuple[int, ...]:
    """The fds a MessageError hands back to the caller to close (``err.fds``)."""
    fds = getattr(err, "fds", ())
    return tuple(fds) if isinstance(fds, tuple) else ()


def _size_error(what: str, n: int, shapes: Sequence[PayloadSpec]) -> MessageError:
    lo = min(s.min_size for s in shapes)
    hi = max(s.max_size for s in shapes)
    if n < lo:
        return MessageError("short-payload", f"{what}: {n} bytes, need at least {lo}")
    if n > hi:
        return MessageError("oversized-payload", f"{what}: {n} bytes, at most {hi} allowed")
    sizes = ", ".join(
        str(s.min_size) if s.min_size == s.max_size else f"{s.min_size}..{s.max_size}"
        for s in shapes
    )
    return MessageError("bad-payload-size", f"{what}: {n} bytes, expected {sizes}")


def _decode_shape(
    what: str, shapes: Sequence[PayloadSpec], data: bytes, nfds: int
) -> Payload | None:
    n = len(data)
    for shape in shapes:
        if shape.min_size <= n <= shape.max_size:
            break
    else:
        raise _size_error(what, n, shapes)
    payload: Payload | None
    if shape.kind is None:
        payload = None
    else:
        try:
            payload = shape.kind.decode(data)
        except LocalProtocolError as exc:
            raise _field_error(exc) from None
    allowed = shape.fds.allowed(payload)
    if nfds not in allowed:
        raise MessageError(
            "fd-count-mismatch",
            f"{what}: {nfds} fds, expected {' or '.join(map(str, allowed))} ({shape.fds.value})",
        )
    return payload


def _decode_request(
    header: Header,
    payload: bytes,
    fds: Sequence[int],
    enum: type[FrontendRequest] | type[BackendRequest],
) -> Message:
    if len(payload) != header.size:
        raise LocalProtocolError(
            "payload-length-mismatch", f"header says {header.size}, got {len(payload)} bytes"
        )
    try:
        _check_header(header)
        try:
            req: FrontendRequest | BackendRequest = enum(header.request)
        except ValueError:
            raise MessageError(
                "unknown-request", f"{enum.__name__} id {header.request} is not defined"
            ) from None
        if header.flags & FLAG_REPLY:
            raise MessageError("unexpected-reply-flag", f"{_name(req)} request has REPLY set")
        shape = spec_for(req).request
        obj = _decode_shape(_name(req), (shape,), bytes(payload), len(fds))
    except MessageError as err:
        raise _attach_fds(err, fds)
    return Message(req, header.flags, obj, tuple(fds))


def decode_frontend(header: Header, payload: bytes, fds: Sequence[int] = ()) -> Message:
    """Decode a request sent by the front-end (what a back-end receives)."""
    return _decode_request(header, payload, fds, FrontendRequest)


def decode_backend(header: Header, payload: bytes, fds: Sequence[int] = ()) -> Message:
    """Decode a request sent by the back-end on the back-end channel."""
    return _decode_request(header, payload, fds, BackendRequest)


def decode_reply(
    header: Header,
    payload: bytes,
    fds: Sequence[int],
    request: FrontendRequest | BackendRequest,
) -> Message:
    """Decode the reply to ``request`` (which we sent).

    The reply must carry flags exactly 0x5 ("bad-reply-flags") and the same
    request id ("reply-mismatch").  Its payload is one of the shapes listed
    for ``request`` (for most requests only the REPLY_ACK u64).
    """
    spec = spec_for(request)
    if len(payload) != header.size:
        raise LocalProtocolError(
            "payload-length-mismatch", f"header says {header.size}, got {len(payload)} bytes"
        )
    try:
        _check_header(header)
        if header.flags != REPLY_FLAGS:
            raise MessageError(
                "bad-reply-flags", f"reply flags {header.flags:#x}, expected {REPLY_FLAGS:#x}"
            )
        if header.request != request:
            raise MessageError(
                "reply-mismatch", f"reply to id {header.request}, expected {_name(request)}"
            )
        obj = _decode_shape(f"{_name(request)} reply", spec.replies, bytes(payload), len(fds))
    except MessageError as err:
        raise _attach_fds(err, fds)
    return Message(request, header.flags, obj, tuple(fds))


# ---------------------------------------------------------------------------
# Encoding


def _check_outgoing(
    request: int, payload: Payload | None, shapes: Sequence[PayloadSpec], body: bytes
) -> None:
    for shape in shapes:
        if shape.kind is None:
            if payload is None:
                return
        elif isinstance(payload, shape.kind) and shape.min_size <= len(body) <= shape.max_size:
            return
    kinds = ", ".join("empty" if s.kind is None else s.kind.__name__ for s in shapes)
    raise LocalProtocolError(
        "bad-payload-type",
        f"{_name(request)}: {type(payload).__name__} ({len(body)} bytes) is not one of {kinds}",
    )


def _encode(request: int, body: bytes, flags: int) -> bytes:
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError("oversized-payload", f"{len(body)} bytes > {MAX_PAYLOAD_SIZE}")
    return _HEADER.pack(request, flags, len(body)) + body


def encode_message(
    request: int,
    payload: Payload | None = None,
    *,
    flags: int = VHOST_USER_VERSION,
    need_reply: bool = False,
) -> bytes:
    """Header + payload bytes of a request; fds travel separately (SCM_RIGHTS).

    ``flags`` may hold the version and NEED_REPLY only.  For enum members
    the payload type is checked against the table (LocalProtocolError
    "bad-payload-type").  Replies use :func:`encode_reply`.
    """
    _check_uint("encode_message", "request", request, 32)
    if flags & VERSION_MASK != VHOST_USER_VERSION or flags & ~(VERSION_MASK | FLAG_NEED_REPLY):
        raise LocalProtocolError("bad-flags", f"flags={flags:#x} for a request")
    if need_reply:
        flags |= FLAG_NEED_REPLY
    body = b"" if payload is None else payload.encode()
    if isinstance(request, (FrontendRequest, BackendRequest)):
        _check_outgoing(request, payload, (spec_for(request).request,), body)
    return _encode(request, body, flags)


def encode_reply(request: int, payload: Payload | None = None) -> bytes:
    """Header (flags exactly 0x5) + payload of the reply to ``request``."""
    _check_uint("encode_reply", "request", request, 32)
    body = b"" if payload is None else payload.encode()
    if isinstance(request, (FrontendRequest, BackendRequest)):
        _check_outgoing(request, payload, spec_for(request).replies, body)
    return _encode(request, body, REPLY_FLAGS)
