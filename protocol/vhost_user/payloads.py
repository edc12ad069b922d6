"""Payload types: each a frozen dataclass that validates in its constructor and packs itself."""

from __future__ import annotations

import re
import struct
import uuid as _uuid
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Self, TypeAlias, Union

from ..errors import LocalProtocolError, MessageError
from .constants import (
    _CONFIG_HDR,
    _INFLIGHT,
    _IOTLB,
    _LOG,
    _REGION,
    _SHMEM_CFG_HDR,
    _SHMEM_MAP,
    _SHMEM_SIZES,
    _SINGLE_REGION,
    _U64,
    _VRING_ADDR,
    _VRING_AREA,
    CONFIG_HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    MEMORY_BASELINE_NREGIONS,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    IotlbPerm,
    IotlbType,
    _U32x2,
)

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
    # Declared, not set: every subclass is a dataclass, and saying so lets fields(self) type-check.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
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
        for f, bits in zip(fields(self), self._BITS):
            _check_uint(owner, f.name, getattr(self, f.name), bits)

    def encode(self) -> bytes:
        return self._STRUCT.pack(*(getattr(self, f.name) for f in fields(self)))

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
