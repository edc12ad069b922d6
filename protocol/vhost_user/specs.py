"""Per-request tables: payload shapes, fd rules and reply policy, one row per request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from ..errors import LocalProtocolError
from .constants import MAX_PAYLOAD_SIZE, VRING_IDX_MASK, VRING_NOFD_MASK, BackendRequest, FrontendRequest, ProtocolFeature
from .payloads import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    InflightDesc,
    IotlbMsg,
    Log,
    MemoryTable,
    Payload,
    PayloadType,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
)

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
