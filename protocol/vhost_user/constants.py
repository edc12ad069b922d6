"""Constants and enums: header flags, limits, request and feature numbers."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

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
    # 20 and 21 are taken upstream by features we neither offer nor name; QEMU 11.1.3 acks SHMEM
    # as bit 22 and asks GET_SHMEM_CONFIG only for it (docs/qemu-facts.md section e).
    SHMEM = 22

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

def _name(request: int) -> str:
    if isinstance(request, BackendRequest):
        return f"BACKEND_{request.name}"
    if isinstance(request, FrontendRequest):
        return request.name
    return f"request#{request}"
