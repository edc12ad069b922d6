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
  ``PROTOCOL_F_SHMEM`` come from the 2025 "VIRTIO Shared Memory" series
  (Albert Esteve).  The feature was bit 20 in the series and is bit 22 in
  QEMU 11.1.3 (established by running it: docs/qemu-facts.md section e).
  The shared-memory config struct grew from 8 to 256 size slots during
  review, so we accept any whole number of slots up to 256 and send 256
  (QEMU 11.1.3 takes 72 and 2056 bytes alike).

The package is split along the wire format's seams, each module importing
only those before it: ``constants`` (flags, limits, enums), ``payloads``
(one validating dataclass per payload), ``specs`` (the per-request tables),
``codec`` (headers, messages, decode and encode), ``describe`` (log lines)
and ``reader`` (the incremental reader).  Import the names from here.
"""

from __future__ import annotations

# The errors its decoders raise, reachable as vu.MessageError as before the split.
from ..errors import LocalProtocolError, MessageError  # noqa: F401
from .codec import (
    Header,
    Message,
    decode_backend,
    decode_frontend,
    decode_header,
    decode_reply,
    encode_message,
    encode_reply,
    error_fds,
)
from .constants import (
    CONFIG_HEADER_SIZE,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    MEMORY_BASELINE_NREGIONS,
    REPLY_FLAGS,
    SHMEM_MAP_FLAG_RW,
    VERSION_MASK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    IotlbPerm,
    IotlbType,
    MigrationPhase,
    ProtocolFeature,
    TransferDirection,
)
from .describe import (
    describe,
)
from .payloads import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    InflightDesc,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    Payload,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
)
from .reader import (
    NEED_DATA,
    MessageReader,
    NeedData,
)
from .specs import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    FdRule,
    PayloadSpec,
    ReplyPolicy,
    RequestSpec,
    expects_reply,
    spec_for,
    vring_index,
    vring_nofd,
)

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
