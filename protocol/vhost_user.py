"""Sans-IO vhost-user wire format: headers, payloads, file-descriptor rules.

Bytes and fd numbers in, typed :class:`Message` objects out, and back, in
the style of h11: nothing here reads a socket or closes a descriptor.  The
facts come from QEMU's ``docs/interop/vhost-user.rst`` (section names are
quoted in the tables below) and, where the text is silent or wrong, from
what QEMU's ``hw/virtio/vhost-user.c`` actually puts on the wire.

Wire facts worth knowing before reading the code:

* A message is a 12-byte header ``{u32 request, u32 flags, u32 size}``
  followed by ``size`` payload bytes.  The spec says "machine native byte
  order"; every host we run on is little-endian, so we use ``<`` formats.
* ``flags``: bits 0-1 the version (must be 1), bit 2 REPLY, bit 3
  NEED_REPLY; every other bit must be zero.  QEMU rejects any reply whose
  flags are not exactly ``0x5``, and so do we.
* ``SET_MEM_TABLE``: QEMU sends ``size = 8 + 32 * nregions`` (not the full
  8-slot array) and exactly one fd per region, in region order.  We require
  exactly that.  The post-copy acknowledgement QEMU sends back is a
  ``SET_MEM_TABLE`` whose 8-byte payload is a zero u64: it decodes here as a
  table with zero regions and zero fds.
* ``REM_MEM_REG``: the spec says no fd SHOULD be sent but a back-end MAY
  accept one (older QEMU sent the region's fd), which must then be closed
  unused.  We accept 0 or 1.
* ``SET_LOG_BASE``: the spec lists "u64" as the payload but QEMU sends the
  16-byte log description (size, offset) plus, with ``LOG_SHMFD``, the fd.
* The vring address table in the spec draws a ``size`` column that does
  not exist: the payload is ``u32 index, u32 flags, u64 desc, u64 used,
  u64 avail, u64 log`` = 40 bytes (``struct vhost_vring_addr``).
* ``VhostUserInflight`` and ``struct vhost_iotlb_msg`` are *not* packed in
  C: they carry tail padding (24 and 32 bytes on the wire).
* With ``XEN_MMAP`` negotiated, memory regions grow to 40 bytes.  We never
  offer that feature, so the decoders only know the 32-byte region.
* fds are attributed to the message containing the *last* byte of the
  recvmsg() chunk they arrived with (see :class:`MessageReader`): Linux
  glues queued fd-less messages in front of the one carrying fds.
* ``GET_SHMEM_CONFIG`` (44), ``BACKEND_SHMEM_MAP``/``UNMAP`` (9/10) and
  ``PROTOCOL_F_SHMEM`` (20) come from the 2025 "VIRTIO Shared Memory"
  series (Albert Esteve); the shared-memory config struct grew from 8 to
  256 size slots during review, so we accept any whole number of slots up
  to 256 and send 256.
"""

from __future__ import annotations

import re
import struct
import uuid as _uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum
from typing import ClassVar, Final, Literal, Self, TypeAlias, Union

from .errors import LocalProtocolError, MessageError

__all__ = [
    # constants
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VERSION_MASK",
    "FLAG_REPLY",
    "FLAG_NEED_REPLY",
    "REPLY_FLAGS",
    "HEADER_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_CONFIG_SIZE",
    "CONFIG_HEADER_SIZE",
    "MEMORY_BASELINE_NREGIONS",
    "MAX_SHMEM_REGIONS",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "SHMEM_MAP_FLAG_RW",
    # enums
    "FrontendRequest",
    "BackendRequest",
    "ProtocolFeature",
    "IotlbType",
    "IotlbPerm",
    "TransferDirection",
    "MigrationPhase",
    # payloads
    "U64",
    "VringState",
    "VringAddr",
    "MemoryRegion",
    "MemoryTable",
    "SingleMemoryRegion",
    "ConfigSpace",
    "Log",
    "InflightDesc",
    "DeviceStateTransfer",
    "IotlbMsg",
    "VringArea",
    "SharedObject",
    "ShmemConfig",
    "ShmemMap",
    "RawPayload",
    "Payload",
    # tables
    "FdRule",
    "ReplyPolicy",
    "PayloadSpec",
    "RequestSpec",
    "FRONTEND_SPECS",
    "BACKEND_SPECS",
    "spec_for",
    "expects_reply",
    # messages
    "Header",
    "Message",
    "decode_header",
    "decode_frontend",
    "decode_backend",
    "decode_reply",
    "encode_message",
    "encode_reply",
    "vring_index",
    "vring_nofd",
    "error_fds",
    "describe",
    # reader
    "NeedData",
    "NEED_DATA",
    "MessageReader",
]

# ---------------------------------------------------------------------------
# Constants

VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
VHOST_USER_VERSION: Final = 0x1
VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
REPLY_FLAGS: Final = VHOST_USER_VERSION | FLAG_REPLY  # exactly 0x5
_KNOWN_FLAGS: Final = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER_SIZE: Final = 12
#: Hard cap on ``header.size``.  The largest payload a front-end legally sends
#: is SET_CONFIG/GET_CONFIG (12 + 256); the largest reply we parse is the
#: 2056-byte shared-memory config.  Crypto sessions (which we never act on)
#: also fit.  Anything above is rejected before it is buffered.
MAX_PAYLOAD_SIZE: Final = 4096
MAX_CONFIG_SIZE: Final = 256  # VHOST_USER_MAX_CONFIG_SIZE
CONFIG_HEADER_SIZE: Final = 12  # VHOST_USER_CONFIG_HDR_SIZE
MEMORY_BASELINE_NREGIONS: Final = 8  # VHOST_MEMORY_BASELINE_NREGIONS
MAX_SHMEM_REGIONS: Final = 256  # VIRTIO_MAX_SHMEM_REGIONS
VRING_IDX_MASK: Final = 0xFF  # VHOST_USER_VRING_IDX_MASK
VRING_NOFD_MASK: Final = 1 << 8  # VHOST_USER_VRING_NOFD_MASK
SHMEM_MAP_FLAG_RW: Final = 1 << 0  # VHOST_USER_FLAG_MAP_RW

_HEADER: Final = struct.Struct("<III")
_U64: Final = struct.Struct("<Q")
_U32x2: Final = struct.Struct("<II")
_VRING_ADDR: Final = struct.Struct("<IIQQQQ")
_REGION: Final = struct.Struct("<QQQQ")
_SINGLE_REGION: Final = struct.Struct("<8xQQQQ")
_CONFIG_HDR: Final = struct.Struct("<III")
_LOG: Final = struct.Struct("<QQ")
_INFLIGHT: Final = struct.Struct("<QQHH4x")
_IOTLB: Final = struct.Struct("<QQQBB6x")
_VRING_AREA: Final = struct.Struct("<QQQ")
_SHMEM_MAP: Final = struct.Struct("<B7xQQQQ")
_SHMEM_CFG_HDR: Final = struct.Struct("<I4x")
_SHMEM_SIZES: Final = struct.Struct(f"<{MAX_SHMEM_REGIONS}Q")

# ---------------------------------------------------------------------------
# Enumerations


class FrontendRequest(IntEnum):
    """Front-end message types (``VHOST_USER_*``), spec "Front-end message types"."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # previously SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(IntEnum):
    """Back-end message types (``VHOST_USER_BACKEND_*``), spec "Back-end message types"."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(IntEnum):
    """Bit numbers of ``VHOST_USER_PROTOCOL_F_*``, spec "Protocol features"."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4  # the spec's #define list spells it F_MTU; QEMU's code F_NET_MTU
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20

    @property
    def mask(self) -> int:
        return 1 << self.value


class IotlbType(IntEnum):
    """``type`` of an IOTLB message, spec "An IOTLB message"."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(IntEnum):
    """``permissions flags`` of an IOTLB message."""

    NONE = 0
    READ = 1
    WRITE = 2
    READ_WRITE = 3


class TransferDirection(IntEnum):
    """Device state transfer direction, spec "Device state transfer parameters"."""

    SAVE = 0
    LOAD = 1


class MigrationPhase(IntEnum):
    STOPPED = 0


# ---------------------------------------------------------------------------
# Field helpers


def _check_uint(owner: str, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise LocalProtocolError("bad-field", f"{owner}.{name}={value!r} is not a u{bits}")


def _check_size(what: str, n: int, lo: int, hi: int) -> None:
    if n < lo:
        raise MessageError("short-payload", f"{what}: {n} bytes, need at least {lo}")
    if n > hi:
        raise MessageError("oversized-payload", f"{what}: {n} bytes, at most {hi} allowed")


def _field_error(exc: LocalProtocolError) -> MessageError:
    return MessageError("bad-field", exc.detail)


class _Fixed:
    """Mixin for a payload that is exactly one struct of unsigned fields, in field order.

    A subclass (a frozen, slotted dataclass) names its ``_STRUCT`` and the
    ``_WHAT`` its size errors say.  Each field is checked against the width of
    its struct code (B, H, I, Q); ``MIN_SIZE`` and ``MAX_SIZE`` are the
    struct's size.  A subclass with further rules extends ``__post_init__``;
    ``decode`` turns any field error into the peer's fault.
    """

    __slots__ = ()
    MIN_SIZE: ClassVar[int]
    MAX_SIZE: ClassVar[int]
    _STRUCT: ClassVar[struct.Struct]
    _WHAT: ClassVar[str]
    _BITS: ClassVar[tuple[int, ...]]

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.MIN_SIZE = cls.MAX_SIZE = cls._STRUCT.size
        codes = re.sub(r"\d*x", "", cls._STRUCT.format.lstrip("<"))
        cls._BITS = tuple(8 * struct.calcsize(c) for c in codes)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f, bits in zip(fields(self), self._BITS):  # type: ignore[arg-type]
            _check_uint(owner, f.name, getattr(self, f.name), bits)

    def encode(self) -> bytes:
        return self._STRUCT.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size(cls._WHAT, len(b), cls._STRUCT.size, cls._STRUCT.size)
        try:
            return cls(*cls._STRUCT.unpack(b))
        except LocalProtocolError as exc:
            raise _field_error(exc) from None


# ---------------------------------------------------------------------------
# Payload types
#
# Every payload is a frozen, slotted dataclass.  Constructing one with an
# out-of-range field is a local bug (LocalProtocolError "bad-field");
# ``decode`` turns the same failure into MessageError("bad-field") because
# there the peer is at fault.  ``decode`` size failures: "short-payload",
# "oversized-payload", or "bad-payload-size" for a length inside the bounds
# that disagrees with a count or size field.


@dataclass(frozen=True, slots=True)
class U64(_Fixed):
    """A single 64-bit integer (spec "A single 64-bit integer")."""

    _STRUCT: ClassVar[struct.Struct] = _U64
    _WHAT: ClassVar[str] = "u64"

    value: int


@dataclass(frozen=True, slots=True)
class VringState(_Fixed):
    """A vring state description / descriptor index (``struct vhost_vring_state``)."""

    _STRUCT: ClassVar[struct.Struct] = _U32x2
    _WHAT: ClassVar[str] = "vring state"

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr(_Fixed):
    """A vring address description (``struct vhost_vring_addr``, 40 bytes)."""

    _STRUCT: ClassVar[struct.Struct] = _VRING_ADDR
    _WHAT: ClassVar[str] = "vring address"
    #: ``flags`` bit: log writes to the used ring (VHOST_VRING_F_LOG).
    F_LOG: ClassVar[int] = 1 << 0

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class MemoryRegion(_Fixed):
    """A memory region description (32 bytes; not a message payload by itself)."""

    _STRUCT: ClassVar[struct.Struct] = _REGION
    _WHAT: ClassVar[str] = "memory region"
    SIZE: ClassVar[int] = 32

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """Multiple memory regions description: ``u32 nregions, u32 padding, regions``.

    Exactly ``8 + 32 * nregions`` bytes (what QEMU sends), ``nregions <= 8``.
    Zero regions is representable: QEMU's post-copy acknowledgement is one.
    """

    MIN_SIZE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = 8 + 32 * MEMORY_BASELINE_NREGIONS

    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.regions, tuple):
            object.__setattr__(self, "regions", tuple(self.regions))
        if len(self.regions) > MEMORY_BASELINE_NREGIONS:
            raise LocalProtocolError(
                "bad-field",
                f"MemoryTable has {len(self.regions)} regions, "
                f"at most {MEMORY_BASELINE_NREGIONS} allowed",
            )
        for r in self.regions:
            if not isinstance(r, MemoryRegion):
                raise LocalProtocolError("bad-field", f"MemoryTable region {r!r}")

    def encode(self) -> bytes:
        return _U32x2.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("memory table", len(b), cls.MIN_SIZE, cls.MAX_SIZE)
        nregions = _U32x2.unpack_from(b)[0]
        if nregions > MEMORY_BASELINE_NREGIONS:
            raise MessageError(
                "bad-field", f"memory table: nregions={nregions} > {MEMORY_BASELINE_NREGIONS}"
            )
        if len(b) != 8 + 32 * nregions:
            raise MessageError(
                "bad-payload-size",
                f"memory table: nregions={nregions} needs {8 + 32 * nregions} bytes, got {len(b)}",
            )
        regions = tuple(
            MemoryRegion(*_REGION.unpack_from(b, 8 + 32 * i)) for i in range(nregions)
        )
        return cls(regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """Single memory region description: ``u64 padding`` + region (40 bytes)."""

    MIN_SIZE: ClassVar[int] = 40
    MAX_SIZE: ClassVar[int] = 40

    region: MemoryRegion

    def __post_init__(self) -> None:
        if not isinstance(self.region, MemoryRegion):
            raise LocalProtocolError("bad-field", f"SingleMemoryRegion.region={self.region!r}")

    def encode(self) -> bytes:
        r = self.region
        return _SINGLE_REGION.pack(
            r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        )

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("single memory region", len(b), 40, 40)
        return cls(MemoryRegion(*_SINGLE_REGION.unpack(b)))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Virtio device config space: ``u32 offset, u32 size, u32 flags, payload``.

    ``len(payload) == size <= 256``; on the wire ``12 + size`` bytes.  A
    GET_CONFIG *request* carries ``size`` (ignored) bytes too.  ``payload``
    is kept out of ``repr`` so it never lands in a log line by accident.
    """

    MIN_SIZE: ClassVar[int] = CONFIG_HEADER_SIZE
    MAX_SIZE: ClassVar[int] = CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE
    #: ``flags`` value: front-end message used for live migration.
    FLAG_MIGRATION: ClassVar[int] = 1

    offset: int
    size: int
    flags: int
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_uint("ConfigSpace", "offset", self.offset, 32)
        _check_uint("ConfigSpace", "size", self.size, 32)
        _check_uint("ConfigSpace", "flags", self.flags, 32)
        if not isinstance(self.payload, bytes):
            if not isinstance(self.payload, (bytearray, memoryview)):
                raise LocalProtocolError("bad-field", "ConfigSpace.payload must be bytes")
            object.__setattr__(self, "payload", bytes(self.payload))
        if self.size > MAX_CONFIG_SIZE:
            raise LocalProtocolError(
                "bad-field", f"ConfigSpace.size={self.size} > {MAX_CONFIG_SIZE}"
            )
        if len(self.payload) != self.size:
            raise LocalProtocolError(
                "bad-field", f"ConfigSpace payload has {len(self.payload)} bytes, size={self.size}"
            )

    def encode(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("config space", len(b), cls.MIN_SIZE, cls.MAX_SIZE)
        offset, size, flags = _CONFIG_HDR.unpack_from(b)
        if size > MAX_CONFIG_SIZE:
            raise MessageError("bad-field", f"config space: size={size} > {MAX_CONFIG_SIZE}")
        if len(b) != CONFIG_HEADER_SIZE + size:
            raise MessageError(
                "bad-payload-size",
                f"config space: size={size} needs {CONFIG_HEADER_SIZE + size} bytes, got {len(b)}",
            )
        return cls(offset, size, flags, bytes(b[CONFIG_HEADER_SIZE:]))


@dataclass(frozen=True, slots=True)
class Log(_Fixed):
    """Log description: ``u64 mmap_size, u64 mmap_offset`` (16 bytes)."""

    _STRUCT: ClassVar[struct.Struct] = _LOG
    _WHAT: ClassVar[str] = "log description"

    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class InflightDesc(_Fixed):
    """Inflight description: ``u64, u64, u16 num_queues, u16 queue_size`` + 4 pad = 24."""

    _STRUCT: ClassVar[struct.Struct] = _INFLIGHT
    _WHAT: ClassVar[str] = "inflight description"

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(_Fixed):
    """Device state transfer parameters: ``u32 direction, u32 phase``.

    Values are not restricted to the known enums here (the spec expects new
    phases); the session decides what it supports.
    """

    _STRUCT: ClassVar[struct.Struct] = _U32x2
    _WHAT: ClassVar[str] = "device state transfer"

    direction: int
    phase: int


@dataclass(frozen=True, slots=True)
class IotlbMsg(_Fixed):
    """``struct vhost_iotlb_msg``: ``u64 iova, u64 size, u64 uaddr, u8 perm, u8 type`` + 6 pad.

    ``perm`` must be 0..3 and ``msg_type`` 1..4 (spec "An IOTLB message").
    """

    _STRUCT: ClassVar[struct.Struct] = _IOTLB
    _WHAT: ClassVar[str] = "iotlb message"

    iova: int
    size: int
    uaddr: int
    perm: int
    msg_type: int

    def __post_init__(self) -> None:
        _Fixed.__post_init__(self)
        if self.perm > IotlbPerm.READ_WRITE:
            raise LocalProtocolError("bad-field", f"IotlbMsg.perm={self.perm} not in 0..3")
        if not IotlbType.MISS <= self.msg_type <= IotlbType.ACCESS_FAIL:
            raise LocalProtocolError("bad-field", f"IotlbMsg.msg_type={self.msg_type} not in 1..4")


@dataclass(frozen=True, slots=True)
class VringArea(_Fixed):
    """Vring area description: ``u64 (index | NOFD), u64 size, u64 offset`` (24 bytes)."""

    _STRUCT: ClassVar[struct.Struct] = _VRING_AREA
    _WHAT: ClassVar[str] = "vring area"

    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD_MASK)


@dataclass(frozen=True, slots=True)
class SharedObject:
    """``VhostUserShared``: a 16-byte UUID in RFC 4122 (big-endian) byte order."""

    MIN_SIZE: ClassVar[int] = 16
    MAX_SIZE: ClassVar[int] = 16

    uuid: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, bytes):
            if not isinstance(self.uuid, (bytearray, memoryview)):
                raise LocalProtocolError("bad-field", "SharedObject.uuid must be bytes")
            object.__setattr__(self, "uuid", bytes(self.uuid))
        if len(self.uuid) != 16:
            raise LocalProtocolError("bad-field", f"SharedObject.uuid has {len(self.uuid)} bytes")

    def as_uuid(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.uuid)

    def encode(self) -> bytes:
        return self.uuid

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("shared object", len(b), 16, 16)
        return cls(bytes(b))


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """``VhostUserShMemConfig``: ``u32 nregions, u32 padding, u64 memory_sizes[]``.

    ``memory_sizes`` is indexed by shmid; trailing zero slots are dropped on
    construction (so encode/decode round-trips) and re-added on encode,
    which always sends all 256 slots.  Decoding accepts any whole number of
    slots up to 256 (an earlier revision of the series had 8).
    """

    MIN_SIZE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = 8 + 8 * MAX_SHMEM_REGIONS

    nregions: int
    memory_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("ShmemConfig", "nregions", self.nregions, 32)
        if self.nregions > MAX_SHMEM_REGIONS:
            raise LocalProtocolError(
                "bad-field", f"ShmemConfig.nregions={self.nregions} > {MAX_SHMEM_REGIONS}"
            )
        sizes = list(self.memory_sizes)
        if len(sizes) > MAX_SHMEM_REGIONS:
            raise LocalProtocolError("bad-field", f"ShmemConfig has {len(sizes)} size slots")
        for i, s in enumerate(sizes):
            _check_uint("ShmemConfig", f"memory_sizes[{i}]", s, 64)
        while sizes and sizes[-1] == 0:
            sizes.pop()
        object.__setattr__(self, "memory_sizes", tuple(sizes))

    def encode(self) -> bytes:
        slots = list(self.memory_sizes) + [0] * (MAX_SHMEM_REGIONS - len(self.memory_sizes))
        return _SHMEM_CFG_HDR.pack(self.nregions) + _SHMEM_SIZES.pack(*slots)

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("shmem config", len(b), cls.MIN_SIZE, cls.MAX_SIZE)
        if (len(b) - 8) % 8:
            raise MessageError(
                "bad-payload-size", f"shmem config: {len(b)} bytes is not 8 + 8*k"
            )
        nregions = _SHMEM_CFG_HDR.unpack_from(b)[0]
        count = (len(b) - 8) // 8
        sizes = struct.unpack_from(f"<{count}Q", b, 8)
        try:
            return cls(nregions, sizes)
        except LocalProtocolError as exc:
            raise _field_error(exc) from None


@dataclass(frozen=True, slots=True)
class ShmemMap(_Fixed):
    """``VhostUserMMap``: ``u8 shmid, 7 pad, u64 fd_offset, shm_offset, len, flags`` (40)."""

    _STRUCT: ClassVar[struct.Struct] = _SHMEM_MAP
    _WHAT: ClassVar[str] = "shmem map"

    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Opaque bytes for payloads we size-check but never interpret (crypto sessions)."""

    MIN_SIZE: ClassVar[int] = 0
    MAX_SIZE: ClassVar[int] = MAX_PAYLOAD_SIZE

    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes):
            if not isinstance(self.data, (bytearray, memoryview)):
                raise LocalProtocolError("bad-field", "RawPayload.data must be bytes")
            object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError("bad-field", f"RawPayload of {len(self.data)} bytes")

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, b: bytes) -> Self:
        _check_size("raw payload", len(b), cls.MIN_SIZE, cls.MAX_SIZE)
        return cls(bytes(b))


Payload: TypeAlias = Union[
    U64,
    VringState,
    VringAddr,
    MemoryTable,
    SingleMemoryRegion,
    ConfigSpace,
    Log,
    InflightDesc,
    DeviceStateTransfer,
    IotlbMsg,
    VringArea,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    RawPayload,
]
PayloadType: TypeAlias = Union[
    type[U64],
    type[VringState],
    type[VringAddr],
    type[MemoryTable],
    type[SingleMemoryRegion],
    type[ConfigSpace],
    type[Log],
    type[InflightDesc],
    type[DeviceStateTransfer],
    type[IotlbMsg],
    type[VringArea],
    type[SharedObject],
    type[ShmemConfig],
    type[ShmemMap],
    type[RawPayload],
]

# ---------------------------------------------------------------------------
# Per-request tables


def vring_index(value: int) -> int:
    """Ring index in the u64 of SET_VRING_KICK/CALL/ERR (bits 0-7)."""
    return value & VRING_IDX_MASK


def vring_nofd(value: int) -> bool:
    """The invalid-FD flag (bit 8) of SET_VRING_KICK/CALL/ERR, SET_DEVICE_STATE_FD replies."""
    return bool(value & VRING_NOFD_MASK)


class FdRule(Enum):
    """How many file descriptors travel with a message."""

    NONE = "0"
    ONE = "1"
    OPTIONAL = "0 or 1"
    PER_REGION = "one per memory region"
    UNLESS_NOFD = "1 unless VRING_NOFD_MASK is set in the u64"

    def allowed(self, payload: Payload | None) -> tuple[int, ...]:
        """The fd counts this rule accepts for ``payload``."""
        if self is FdRule.NONE:
            return (0,)
        if self is FdRule.ONE:
            return (1,)
        if self is FdRule.OPTIONAL:
            return (0, 1)
        if self is FdRule.PER_REGION:
            assert isinstance(payload, MemoryTable)
            return (len(payload.regions),)
        if isinstance(payload, U64):
            return (0,) if payload.value & VRING_NOFD_MASK else (1,)
        assert isinstance(payload, VringArea)
        return (0,) if payload.nofd else (1,)


class ReplyPolicy(Enum):
    """When the receiver of a request must answer it."""

    #: Only when the request carries NEED_REPLY (REPLY_ACK): a u64 status.
    ON_NEED_REPLY = "only with NEED_REPLY"
    #: The request always has an explicit reply.
    ALWAYS = "always"
    #: SET_LOG_BASE: a reply iff LOG_SHMFD was negotiated.
    IF_LOG_SHMFD = "if LOG_SHMFD negotiated"


@dataclass(frozen=True, slots=True)
class PayloadSpec:
    """One accepted payload shape: type (None = empty), size bounds, fd rule."""

    kind: PayloadType | None
    min_size: int
    max_size: int
    fds: FdRule


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What a request carries, and the reply shapes accepted for it (tried in order)."""

    request: PayloadSpec
    replies: tuple[PayloadSpec, ...]
    reply: ReplyPolicy


def _p(
    kind: PayloadType | None,
    fds: FdRule = FdRule.NONE,
    *,
    lo: int | None = None,
    hi: int | None = None,
) -> PayloadSpec:
    if kind is None:
        return PayloadSpec(None, 0, 0, fds)
    return PayloadSpec(
        kind,
        kind.MIN_SIZE if lo is None else lo,
        kind.MAX_SIZE if hi is None else hi,
        fds,
    )


_EMPTY: Final = _p(None)
_ACK: Final = _p(U64)  # REPLY_ACK status / "u64" reply
#: Replies to requests that have no explicit reply: the REPLY_ACK u64.
_ACK_ONLY: Final = (_ACK,)
_NOTHING = ReplyPolicy.ON_NEED_REPLY
_ALWAYS = ReplyPolicy.ALWAYS


def _rs(
    request: PayloadSpec,
    replies: tuple[PayloadSpec, ...] = _ACK_ONLY,
    reply: ReplyPolicy = _NOTHING,
) -> RequestSpec:
    return RequestSpec(request, replies, reply)


_F = FrontendRequest
_B = BackendRequest
_CRYPTO = _p(RawPayload, lo=1, hi=MAX_PAYLOAD_SIZE)

#: One row per front-end request; the comment names the spec section
#: (docs/interop/vhost-user.rst, "Front-end message types" unless noted).
FRONTEND_SPECS: Final[dict[FrontendRequest, RequestSpec]] = {
    # VHOST_USER_GET_FEATURES: N/A -> u64
    _F.GET_FEATURES: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_SET_FEATURES: u64
    _F.SET_FEATURES: _rs(_p(U64)),
    # VHOST_USER_SET_OWNER: N/A
    _F.SET_OWNER: _rs(_EMPTY),
    # VHOST_USER_RESET_OWNER (deprecated): N/A
    _F.RESET_OWNER: _rs(_EMPTY),
    # VHOST_USER_SET_MEM_TABLE: multiple memory regions, one fd per region;
    # postcopy reply: multiple memory regions (no fds), else the REPLY_ACK u64.
    _F.SET_MEM_TABLE: _rs(_p(MemoryTable, FdRule.PER_REGION), (_ACK, _p(MemoryTable))),
    # VHOST_USER_SET_LOG_BASE: log description (QEMU sends 16 bytes, spec
    # text says u64) + the log fd with LOG_SHMFD; reply (LOG_SHMFD): QEMU
    # ignores its body, libvhost-user sends a u64.
    _F.SET_LOG_BASE: _rs(
        _p(Log, FdRule.OPTIONAL), (_EMPTY, _ACK), ReplyPolicy.IF_LOG_SHMFD
    ),
    # VHOST_USER_SET_LOG_FD: N/A + eventfd
    _F.SET_LOG_FD: _rs(_p(None, FdRule.ONE)),
    # VHOST_USER_SET_VRING_NUM: vring state description
    _F.SET_VRING_NUM: _rs(_p(VringState)),
    # VHOST_USER_SET_VRING_ADDR: vring address description
    _F.SET_VRING_ADDR: _rs(_p(VringAddr)),
    # VHOST_USER_SET_VRING_BASE: vring descriptor index/indices
    _F.SET_VRING_BASE: _rs(_p(VringState)),
    # VHOST_USER_GET_VRING_BASE: vring state -> vring descriptor index/indices
    _F.GET_VRING_BASE: _rs(_p(VringState), (_p(VringState),), _ALWAYS),
    # VHOST_USER_SET_VRING_KICK: u64 (index | NOFD) + fd unless NOFD
    _F.SET_VRING_KICK: _rs(_p(U64, FdRule.UNLESS_NOFD)),
    # VHOST_USER_SET_VRING_CALL: same
    _F.SET_VRING_CALL: _rs(_p(U64, FdRule.UNLESS_NOFD)),
    # VHOST_USER_SET_VRING_ERR: same
    _F.SET_VRING_ERR: _rs(_p(U64, FdRule.UNLESS_NOFD)),
    # VHOST_USER_GET_PROTOCOL_FEATURES: N/A -> u64
    _F.GET_PROTOCOL_FEATURES: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_SET_PROTOCOL_FEATURES: u64
    _F.SET_PROTOCOL_FEATURES: _rs(_p(U64)),
    # VHOST_USER_GET_QUEUE_NUM: N/A -> u64
    _F.GET_QUEUE_NUM: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_SET_VRING_ENABLE: vring state description
    _F.SET_VRING_ENABLE: _rs(_p(VringState)),
    # VHOST_USER_SEND_RARP: u64 (first 6 bytes: MAC)
    _F.SEND_RARP: _rs(_p(U64)),
    # VHOST_USER_NET_SET_MTU: u64
    _F.NET_SET_MTU: _rs(_p(U64)),
    # VHOST_USER_SET_BACKEND_REQ_FD: N/A + socket fd
    _F.SET_BACKEND_REQ_FD: _rs(_p(None, FdRule.ONE)),
    # VHOST_USER_IOTLB_MSG: struct vhost_iotlb_msg -> u64 ("has to acknowledge")
    _F.IOTLB_MSG: _rs(_p(IotlbMsg), (_ACK,), _ALWAYS),
    # VHOST_USER_SET_VRING_ENDIAN: vring state description
    _F.SET_VRING_ENDIAN: _rs(_p(VringState)),
    # VHOST_USER_GET_CONFIG: config space -> config space (an empty reply
    # body is the back-end's error indication)
    _F.GET_CONFIG: _rs(_p(ConfigSpace), (_EMPTY, _p(ConfigSpace)), _ALWAYS),
    # VHOST_USER_SET_CONFIG: config space
    _F.SET_CONFIG: _rs(_p(ConfigSpace)),
    # VHOST_USER_CREATE_CRYPTO_SESSION: crypto session description (both ways)
    _F.CREATE_CRYPTO_SESSION: _rs(_CRYPTO, (_CRYPTO,), _ALWAYS),
    # VHOST_USER_CLOSE_CRYPTO_SESSION: u64
    _F.CLOSE_CRYPTO_SESSION: _rs(_p(U64)),
    # VHOST_USER_POSTCOPY_ADVISE: N/A -> userfault fd (QEMU wants an empty
    # body; no fd means the back-end failed)
    _F.POSTCOPY_ADVISE: _rs(
        _EMPTY, (_p(None, FdRule.OPTIONAL), _p(U64, FdRule.OPTIONAL)), _ALWAYS
    ),
    # VHOST_USER_POSTCOPY_LISTEN: N/A
    _F.POSTCOPY_LISTEN: _rs(_EMPTY),
    # VHOST_USER_POSTCOPY_END: N/A -> u64
    _F.POSTCOPY_END: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_GET_INFLIGHT_FD: inflight description -> inflight
    # description + fd (no fd when mmap_size is 0)
    _F.GET_INFLIGHT_FD: _rs(_p(InflightDesc), (_p(InflightDesc, FdRule.OPTIONAL),), _ALWAYS),
    # VHOST_USER_SET_INFLIGHT_FD: inflight description + fd
    _F.SET_INFLIGHT_FD: _rs(_p(InflightDesc, FdRule.ONE)),
    # VHOST_USER_GPU_SET_SOCKET: N/A + socket fd
    _F.GPU_SET_SOCKET: _rs(_p(None, FdRule.ONE)),
    # VHOST_USER_RESET_DEVICE: N/A
    _F.RESET_DEVICE: _rs(_EMPTY),
    # VHOST_USER_VRING_KICK: vring state description
    _F.VRING_KICK: _rs(_p(VringState)),
    # VHOST_USER_GET_MAX_MEM_SLOTS: N/A -> u64
    _F.GET_MAX_MEM_SLOTS: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_ADD_MEM_REG: single memory region + exactly one fd;
    # postcopy reply: single memory region, else the REPLY_ACK u64
    _F.ADD_MEM_REG: _rs(_p(SingleMemoryRegion, FdRule.ONE), (_ACK, _p(SingleMemoryRegion))),
    # VHOST_USER_REM_MEM_REG: single memory region; no fd SHOULD be sent,
    # but one MAY be accepted (and must be closed unused)
    _F.REM_MEM_REG: _rs(
        _p(SingleMemoryRegion, FdRule.OPTIONAL), (_ACK, _p(SingleMemoryRegion))
    ),
    # VHOST_USER_SET_STATUS: u64
    _F.SET_STATUS: _rs(_p(U64)),
    # VHOST_USER_GET_STATUS: N/A -> u64
    _F.GET_STATUS: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_GET_SHARED_OBJECT: VhostUserShared -> u64 + dma-buf fd on success
    _F.GET_SHARED_OBJECT: _rs(_p(SharedObject), (_p(U64, FdRule.OPTIONAL),), _ALWAYS),
    # VHOST_USER_SET_DEVICE_STATE_FD: transfer parameters + fd -> u64, with
    # an fd unless bit 8 (invalid FD) is set
    _F.SET_DEVICE_STATE_FD: _rs(
        _p(DeviceStateTransfer, FdRule.ONE), (_p(U64, FdRule.UNLESS_NOFD),), _ALWAYS
    ),
    # VHOST_USER_CHECK_DEVICE_STATE: N/A -> u64
    _F.CHECK_DEVICE_STATE: _rs(_EMPTY, (_ACK,), _ALWAYS),
    # VHOST_USER_GET_SHMEM_CONFIG (shared-memory series): N/A -> VhostUserShMemConfig
    _F.GET_SHMEM_CONFIG: _rs(_EMPTY, (_p(ShmemConfig),), _ALWAYS),
}

#: One row per back-end request ("Back-end message types"); replies are
#: sent by the front-end.
BACKEND_SPECS: Final[dict[BackendRequest, RequestSpec]] = {
    # VHOST_USER_BACKEND_IOTLB_MSG: struct vhost_iotlb_msg
    _B.IOTLB_MSG: _rs(_p(IotlbMsg)),
    # VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: N/A
    _B.CONFIG_CHANGE_MSG: _rs(_EMPTY),
    # VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG: vring area + fd unless NOFD
    # (QEMU: "area->u64 & VHOST_USER_VRING_NOFD_MASK" de-registers)
    _B.VRING_HOST_NOTIFIER_MSG: _rs(_p(VringArea, FdRule.UNLESS_NOFD)),
    # VHOST_USER_BACKEND_VRING_CALL: vring state description
    _B.VRING_CALL: _rs(_p(VringState)),
    # VHOST_USER_BACKEND_VRING_ERR: vring state description
    _B.VRING_ERR: _rs(_p(VringState)),
    # VHOST_USER_BACKEND_SHARED_OBJECT_ADD: VhostUserShared
    _B.SHARED_OBJECT_ADD: _rs(_p(SharedObject)),
    # VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE: VhostUserShared
    _B.SHARED_OBJECT_REMOVE: _rs(_p(SharedObject)),
    # VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP: VhostUserShared -> dma-buf fd and u64
    _B.SHARED_OBJECT_LOOKUP: _rs(_p(SharedObject), (_p(U64, FdRule.OPTIONAL),), _ALWAYS),
    # VHOST_USER_BACKEND_SHMEM_MAP: fd + VhostUserMMap
    _B.SHMEM_MAP: _rs(_p(ShmemMap, FdRule.ONE)),
    # VHOST_USER_BACKEND_SHMEM_UNMAP: VhostUserMMap (QEMU replies only on NEED_REPLY)
    _B.SHMEM_UNMAP: _rs(_p(ShmemMap)),
}

assert set(FRONTEND_SPECS) == set(FrontendRequest)
assert set(BACKEND_SPECS) == set(BackendRequest)


def spec_for(request: FrontendRequest | BackendRequest) -> RequestSpec:
    """The table row of an enum member (plain ints are ambiguous: ids overlap)."""
    if isinstance(request, FrontendRequest):
        return FRONTEND_SPECS[request]
    if isinstance(request, BackendRequest):
        return BACKEND_SPECS[request]
    raise LocalProtocolError(
        "bad-request-type", f"{request!r} is not a FrontendRequest or BackendRequest"
    )


def expects_reply(request: FrontendRequest | BackendRequest, protocol_features: int = 0) -> bool:
    """Whether ``request`` is always answered, independent of NEED_REPLY.

    ``protocol_features`` (the negotiated mask) matters only for
    SET_LOG_BASE, answered iff LOG_SHMFD.  Any request sent with NEED_REPLY
    (REPLY_ACK) is answered as well; check :attr:`Message.need_reply`.
    SET_MEM_TABLE / ADD_MEM_REG are also answered in post-copy mode, a
    session state this layer does not know.
    """
    policy = spec_for(request).reply
    if policy is ReplyPolicy.ALWAYS:
        return True
    if policy is ReplyPolicy.IF_LOG_SHMFD:
        return bool(protocol_features & ProtocolFeature.LOG_SHMFD.mask)
    return False


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


# ---------------------------------------------------------------------------
# Log lines


def _name(request: int) -> str:
    if isinstance(request, BackendRequest):
        return f"BACKEND_{request.name}"
    if isinstance(request, FrontendRequest):
        return request.name
    return f"request#{request}"


def _describe_payload(p: Payload | None) -> str:
    if p is None:
        return ""
    if isinstance(p, U64):
        return f"u64={p.value:#x}"
    if isinstance(p, VringState):
        return f"index={p.index} num={p.num}"
    if isinstance(p, VringAddr):
        return (
            f"index={p.index} flags={p.flags:#x} desc={p.desc_user_addr:#x} "
            f"used={p.used_user_addr:#x} avail={p.avail_user_addr:#x} log={p.log_guest_addr:#x}"
        )
    if isinstance(p, MemoryTable):
        regions = " ".join(
            f"[gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
            f"uva={r.userspace_addr:#x} off={r.mmap_offset:#x}]"
            for r in p.regions
        )
        return f"nregions={len(p.regions)}" + (f" {regions}" if regions else "")
    if isinstance(p, SingleMemoryRegion):
        r = p.region
        return (
            f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
            f"uva={r.userspace_addr:#x} off={r.mmap_offset:#x}"
        )
    if isinstance(p, ConfigSpace):
        return f"offset={p.offset} size={p.size} flags={p.flags:#x}"
    if isinstance(p, Log):
        return f"mmap_size={p.mmap_size:#x} mmap_offset={p.mmap_offset:#x}"
    if isinstance(p, InflightDesc):
        return (
            f"mmap_size={p.mmap_size:#x} mmap_offset={p.mmap_offset:#x} "
            f"num_queues={p.num_queues} queue_size={p.queue_size}"
        )
    if isinstance(p, DeviceStateTransfer):
        return f"direction={p.direction} phase={p.phase}"
    if isinstance(p, IotlbMsg):
        return (
            f"iova={p.iova:#x} size={p.size:#x} uaddr={p.uaddr:#x} "
            f"perm={p.perm} type={p.msg_type}"
        )
    if isinstance(p, VringArea):
        return f"u64={p.u64:#x} size={p.size:#x} offset={p.offset:#x}"
    if isinstance(p, SharedObject):
        return f"uuid={p.as_uuid()}"
    if isinstance(p, ShmemConfig):
        return f"nregions={p.nregions} sizes={list(p.memory_sizes)}"
    if isinstance(p, ShmemMap):
        return (
            f"shmid={p.shmid} fd_offset={p.fd_offset:#x} shm_offset={p.shm_offset:#x} "
            f"len={p.length:#x} flags={p.flags:#x}"
        )
    return f"len={len(p.data)}"


def describe(msg: Message) -> str:
    """One log-line summary: name, flags, key fields, fd count (no config bytes)."""
    parts = [_name(msg.request)]
    if msg.is_reply:
        parts.append("reply")
    if msg.need_reply:
        parts.append("need_reply")
    fields = _describe_payload(msg.payload)
    if fields:
        parts.append(fields)
    if msg.fds:
        parts.append(f"fds={len(msg.fds)}")
    return " ".join(parts)


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
