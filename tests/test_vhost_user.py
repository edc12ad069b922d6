"""Tests for the sans-IO vhost-user wire format (protocol/vhost_user/)."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.protocol.errors import LocalProtocolError, MessageError
from vhost_user_cpufreq.protocol.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    NEED_DATA,
    REPLY_FLAGS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigSpace,
    DeviceStateTransfer,
    FrontendRequest,
    Header,
    InflightDesc,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageReader,
    ProtocolFeature,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringArea,
    VringState,
    decode_backend,
    decode_frontend,
    decode_header,
    decode_reply,
    describe,
    encode_message,
    encode_reply,
    error_fds,
    expects_reply,
    spec_for,
    vring_index,
    vring_nofd,
)

F = FrontendRequest
B = BackendRequest

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)


def raw(request: int, flags: int, payload: bytes = b"", size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def split(data: bytes) -> tuple[Header, bytes]:
    return decode_header(data[:HEADER_SIZE]), data[HEADER_SIZE:]


def dec_front(data: bytes, fds: Sequence[int] = ()) -> Message:
    h, p = split(data)
    return decode_frontend(h, p, fds)


def dec_back(data: bytes, fds: Sequence[int] = ()) -> Message:
    h, p = split(data)
    return decode_backend(h, p, fds)


def reason(exc_info: pytest.ExceptionInfo[MessageError]) -> str:
    return str(exc_info.value.reason)


# ---------------------------------------------------------------------------
# Spec facts


def test_constants_and_enums() -> None:
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert VRING_NOFD_MASK == 0x100 and VRING_IDX_MASK == 0xFF
    assert HEADER_SIZE == 12 and VHOST_USER_VERSION == 1 and REPLY_FLAGS == 0x5
    assert FLAG_REPLY == 0x4 and FLAG_NEED_REPLY == 0x8
    assert [r.value for r in FrontendRequest] == list(range(1, 45))
    assert [r.value for r in BackendRequest] == list(range(1, 11))
    assert F.GET_PROTOCOL_FEATURES == 15 and F.SET_BACKEND_REQ_FD == 21
    assert F.GET_SHARED_OBJECT == 41 and F.SET_DEVICE_STATE_FD == 42
    assert F.CHECK_DEVICE_STATE == 43 and F.GET_SHMEM_CONFIG == 44
    assert B.SHARED_OBJECT_LOOKUP == 8 and B.SHMEM_MAP == 9 and B.SHMEM_UNMAP == 10
    expected = [
        "MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CROSS_ENDIAN",
        "CRYPTO_SESSION", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER",
        "INFLIGHT_SHMFD", "RESET_DEVICE", "INBAND_NOTIFICATIONS", "CONFIGURE_MEM_SLOTS",
        "STATUS", "XEN_MMAP", "SHARED_OBJECT", "DEVICE_STATE", "SHMEM",
    ]  # fmt: skip
    assert [f.name for f in ProtocolFeature] == expected
    assert [f.value for f in ProtocolFeature] == [*range(20), 22]  # SHMEM: bit 22 in QEMU 11.1
    assert ProtocolFeature.LOG_SHMFD.mask == 2


def test_exact_sizes() -> None:
    region = MemoryRegion(1, 2, 3, 4)
    assert len(U64(1).encode()) == 8
    assert len(VringState(1, 2).encode()) == 8
    assert len(VringAddr(1, 2, 3, 4, 5, 6).encode()) == 40
    assert len(region.encode()) == 32
    for n in range(9):
        assert len(MemoryTable((region,) * n).encode()) == 8 + 32 * n
    assert len(SingleMemoryRegion(region).encode()) == 40
    for size in (0, 1, 4, 255, 256):
        assert len(ConfigSpace(0, size, 0, b"x" * size).encode()) == 12 + size
    assert len(Log(1, 2).encode()) == 16
    assert len(InflightDesc(1, 2, 3, 4).encode()) == 24
    assert len(DeviceStateTransfer(0, 0).encode()) == 8
    assert len(IotlbMsg(1, 2, 3, 1, 2).encode()) == 32
    assert len(VringArea(1, 2, 3).encode()) == 24
    assert len(SharedObject(b"u" * 16).encode()) == 16
    assert len(ShmemConfig(1, (4096,)).encode()) == 8 + 8 * 256
    assert len(ShmemMap(1, 2, 3, 4, 5).encode()) == 40


def test_wire_layouts() -> None:
    assert VringAddr(1, 2, 3, 4, 5, 6).encode() == struct.pack("<IIQQQQ", 1, 2, 3, 4, 5, 6)
    table = MemoryTable((MemoryRegion(1, 2, 3, 4),)).encode()
    assert table == struct.pack("<IIQQQQ", 1, 0, 1, 2, 3, 4)
    assert SingleMemoryRegion(MemoryRegion(1, 2, 3, 4)).encode() == struct.pack(
        "<QQQQQ", 0, 1, 2, 3, 4
    )
    assert ConfigSpace(8, 2, 1, b"ab").encode() == struct.pack("<III", 8, 2, 1) + b"ab"
    assert InflightDesc(1, 2, 3, 4).encode() == struct.pack("<QQHH", 1, 2, 3, 4) + bytes(4)
    assert IotlbMsg(1, 2, 3, 3, 4).encode() == struct.pack("<QQQBB", 1, 2, 3, 3, 4) + bytes(6)
    assert ShmemMap(7, 1, 2, 3, 1).encode() == bytes([7]) + bytes(7) + struct.pack(
        "<QQQQ", 1, 2, 3, 1
    )
    cfg = ShmemConfig(2, (0, 4096, 8192))
    assert cfg.encode()[:16] == struct.pack("<IIQ", 2, 0, 0)
    assert SharedObject(bytes(range(16))).as_uuid().bytes == bytes(range(16))


# ---------------------------------------------------------------------------
# Payload round trips


config_spaces = st.binary(max_size=256).flatmap(
    lambda p: st.builds(ConfigSpace, u32, st.just(len(p)), u32, st.just(p))
)
PAYLOADS = st.one_of(
    st.builds(U64, u64),
    st.builds(VringState, u32, u32),
    st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    st.builds(SingleMemoryRegion, regions),
    config_spaces,
    st.builds(Log, u64, u64),
    st.builds(InflightDesc, u64, u64, u16, u16),
    st.builds(DeviceStateTransfer, u32, u32),
    st.builds(IotlbMsg, u64, u64, u64, st.integers(0, 3), st.integers(1, 4)),
    st.builds(VringArea, u64, u64, u64),
    st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    st.builds(ShmemConfig, st.integers(0, 256), st.lists(u64, max_size=256).map(tuple)),
    st.builds(ShmemMap, u8, u64, u64, u64, u64),
    st.builds(RawPayload, st.binary(max_size=512)),
)


@settings(max_examples=300, deadline=None)
@given(PAYLOADS)
def test_payload_round_trip(p: object) -> None:
    encoded = p.encode()  # type: ignore[attr-defined]
    assert type(p).decode(encoded) == p  # type: ignore[attr-defined]


@given(regions)
def test_memory_region_round_trip(r: MemoryRegion) -> None:
    assert MemoryRegion.decode(r.encode()) == r


@pytest.mark.parametrize(
    "make",
    [
        lambda: U64(-1),
        lambda: U64(2**64),
        lambda: VringState(2**32, 0),
        lambda: VringAddr(0, 0, 0, 0, 0, 2**64),
        lambda: MemoryRegion(0, -1, 0, 0),
        lambda: MemoryTable((MemoryRegion(0, 0, 0, 0),) * 9),
        lambda: ConfigSpace(0, 3, 0, b"ab"),
        lambda: ConfigSpace(0, 257, 0, b"a" * 257),
        lambda: InflightDesc(0, 0, 2**16, 0),
        lambda: IotlbMsg(0, 0, 0, 4, 1),
        lambda: IotlbMsg(0, 0, 0, 0, 0),
        lambda: IotlbMsg(0, 0, 0, 0, 5),
        lambda: SharedObject(b"short"),
        lambda: ShmemConfig(257, ()),
        lambda: ShmemConfig(1, (0,) * 257),
        lambda: ShmemMap(256, 0, 0, 0, 0),
        lambda: Header(0, 0, 2**32),
    ],
)
def test_constructor_validation(make: object) -> None:
    with pytest.raises(LocalProtocolError) as ei:
        make()  # type: ignore[operator]
    assert ei.value.reason == "bad-field"


def test_payload_decode_wrong_size() -> None:
    for cls, good in [
        (U64, 8), (VringState, 8), (VringAddr, 40), (MemoryRegion, 32),
        (SingleMemoryRegion, 40), (Log, 16), (InflightDesc, 24), (DeviceStateTransfer, 8),
        (IotlbMsg, 32), (VringArea, 24), (SharedObject, 16), (ShmemMap, 40),
    ]:  # fmt: skip
        with pytest.raises(MessageError) as ei:
            cls.decode(bytes(good - 1))
        assert reason(ei) == "short-payload"
        with pytest.raises(MessageError) as ei:
            cls.decode(bytes(good + 1))
        assert reason(ei) == "oversized-payload"


def test_shmem_config_accepts_short_arrays() -> None:
    # The first revision of the series used 8 slots (72 bytes).
    old = struct.pack("<II8Q", 2, 0, 4096, 8192, 0, 0, 0, 0, 0, 0)
    assert ShmemConfig.decode(old) == ShmemConfig(2, (4096, 8192))
    with pytest.raises(MessageError) as ei:
        ShmemConfig.decode(old + b"x")
    assert reason(ei) == "bad-payload-size"
    with pytest.raises(MessageError) as ei:
        ShmemConfig.decode(struct.pack("<II", 300, 0))
    assert reason(ei) == "bad-field"


# ---------------------------------------------------------------------------
# Header rules


def test_header_ok_and_unknown_id_passes() -> None:
    h = decode_header(raw(999, 0x1, size=8)[:12])
    assert h == Header(999, 1, 8) and not h.is_reply and not h.need_reply
    h = decode_header(raw(1, 0xD, size=0))
    assert h.is_reply and h.need_reply
    assert h.encode() == raw(1, 0xD)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4, 0x6, 0x7, 0x8])
def test_header_bad_version(flags: int) -> None:
    with pytest.raises(MessageError) as ei:
        decode_header(raw(1, flags))
    assert reason(ei) == "bad-version"


@pytest.mark.parametrize("bit", range(4, 32))
def test_header_reserved_bits(bit: int) -> None:
    with pytest.raises(MessageError) as ei:
        decode_header(raw(1, 0x1 | (1 << bit)))
    assert reason(ei) == "reserved-flags"


def test_header_size_cap() -> None:
    assert decode_header(raw(1, 1, size=MAX_PAYLOAD_SIZE)).size == MAX_PAYLOAD_SIZE
    for size in (MAX_PAYLOAD_SIZE + 1, 2**32 - 1):
        with pytest.raises(MessageError) as ei:
            decode_header(raw(1, 1, size=size))
        assert reason(ei) == "oversized-payload"


def test_header_length_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        decode_header(b"\x01\x00")


def test_reply_flag_on_request() -> None:
    for flags in (0x5, 0xD):
        with pytest.raises(MessageError) as ei:
            dec_front(raw(F.GET_FEATURES, flags))
        assert reason(ei) == "unexpected-reply-flag"
        with pytest.raises(MessageError) as ei:
            dec_back(raw(B.CONFIG_CHANGE_MSG, flags))
        assert reason(ei) == "unexpected-reply-flag"


def test_reply_flags_must_be_exactly_0x5() -> None:
    ok = raw(F.GET_FEATURES, 0x5, struct.pack("<Q", 1 << 30))
    h, p = split(ok)
    assert decode_reply(h, p, (), F.GET_FEATURES).payload == U64(1 << 30)
    for flags in (0x1, 0x9, 0xD):
        h, p = split(raw(F.GET_FEATURES, flags, struct.pack("<Q", 0)))
        with pytest.raises(MessageError) as ei:
            decode_reply(h, p, (), F.GET_FEATURES)
        assert reason(ei) == "bad-reply-flags"


def test_reply_mismatch() -> None:
    h, p = split(raw(F.GET_PROTOCOL_FEATURES, 0x5, bytes(8)))
    with pytest.raises(MessageError) as ei:
        decode_reply(h, p, (), F.GET_FEATURES)
    assert reason(ei) == "reply-mismatch"


# ---------------------------------------------------------------------------
# Every request id decodes (table-driven, written independently of the module)

REGION_A = MemoryRegion(0, 0x10000, 0x7F0000000000, 0)
REGION_B = MemoryRegion(0x100000, 0x20000, 0x7F0000100000, 0x1000)
SHARED = SharedObject(bytes(range(16)))
FRONTEND_CASES: dict[FrontendRequest, tuple[object, int]] = {
    F.GET_FEATURES: (None, 0),
    F.SET_FEATURES: (U64(1 << 32 | 1 << 30), 0),
    F.SET_OWNER: (None, 0),
    F.RESET_OWNER: (None, 0),
    F.SET_MEM_TABLE: (MemoryTable((REGION_A, REGION_B)), 2),
    F.SET_LOG_BASE: (Log(0x1000, 0), 1),
    F.SET_LOG_FD: (None, 1),
    F.SET_VRING_NUM: (VringState(0, 256), 0),
    F.SET_VRING_ADDR: (VringAddr(1, 0, 0x1000, 0x2000, 0x3000, 0), 0),
    F.SET_VRING_BASE: (VringState(0, 0), 0),
    F.GET_VRING_BASE: (VringState(1, 0), 0),
    F.SET_VRING_KICK: (U64(0), 1),
    F.SET_VRING_CALL: (U64(1), 1),
    F.SET_VRING_ERR: (U64(2 | VRING_NOFD_MASK), 0),
    F.GET_PROTOCOL_FEATURES: (None, 0),
    F.SET_PROTOCOL_FEATURES: (U64(0b1000001001), 0),
    F.GET_QUEUE_NUM: (None, 0),
    F.SET_VRING_ENABLE: (VringState(0, 1), 0),
    F.SEND_RARP: (U64(0x525400123456), 0),
    F.NET_SET_MTU: (U64(1500), 0),
    F.SET_BACKEND_REQ_FD: (None, 1),
    F.IOTLB_MSG: (IotlbMsg(0x1000, 0x1000, 0x7F00, 3, 2), 0),
    F.SET_VRING_ENDIAN: (VringState(0, 0), 0),
    F.GET_CONFIG: (ConfigSpace(0, 4, 0, bytes(4)), 0),
    F.SET_CONFIG: (ConfigSpace(0, 4, 1, b"\x01\x02\x03\x04"), 0),
    F.CREATE_CRYPTO_SESSION: (RawPayload(bytes(100)), 0),
    F.CLOSE_CRYPTO_SESSION: (U64(7), 0),
    F.POSTCOPY_ADVISE: (None, 0),
    F.POSTCOPY_LISTEN: (None, 0),
    F.POSTCOPY_END: (None, 0),
    F.GET_INFLIGHT_FD: (InflightDesc(0, 0, 2, 256), 0),
    F.SET_INFLIGHT_FD: (InflightDesc(8192, 0, 2, 256), 1),
    F.GPU_SET_SOCKET: (None, 1),
    F.RESET_DEVICE: (None, 0),
    F.VRING_KICK: (VringState(0, 0), 0),
    F.GET_MAX_MEM_SLOTS: (None, 0),
    F.ADD_MEM_REG: (SingleMemoryRegion(REGION_A), 1),
    F.REM_MEM_REG: (SingleMemoryRegion(REGION_A), 0),
    F.SET_STATUS: (U64(0xF), 0),
    F.GET_STATUS: (None, 0),
    F.GET_SHARED_OBJECT: (SHARED, 0),
    F.SET_DEVICE_STATE_FD: (DeviceStateTransfer(1, 0), 1),
    F.CHECK_DEVICE_STATE: (None, 0),
    F.GET_SHMEM_CONFIG: (None, 0),
}
BACKEND_CASES: dict[BackendRequest, tuple[object, int]] = {
    B.IOTLB_MSG: (IotlbMsg(0x1000, 0, 0, 1, 1), 0),
    B.CONFIG_CHANGE_MSG: (None, 0),
    B.VRING_HOST_NOTIFIER_MSG: (VringArea(0, 4096, 0), 1),
    B.VRING_CALL: (VringState(0, 0), 0),
    B.VRING_ERR: (VringState(1, 0), 0),
    B.SHARED_OBJECT_ADD: (SHARED, 0),
    B.SHARED_OBJECT_REMOVE: (SHARED, 0),
    B.SHARED_OBJECT_LOOKUP: (SHARED, 0),
    B.SHMEM_MAP: (ShmemMap(1, 0, 0x2000, 0x1000, 1), 1),
    B.SHMEM_UNMAP: (ShmemMap(1, 0, 0x2000, 0x1000, 0), 0),
}


def test_case_tables_cover_every_id() -> None:
    assert set(FRONTEND_CASES) == set(FrontendRequest)
    assert set(BACKEND_CASES) == set(BackendRequest)


@pytest.mark.parametrize("request_", list(FrontendRequest), ids=lambda r: r.name)
@pytest.mark.parametrize("need_reply", [False, True])
def test_every_frontend_request_decodes(request_: FrontendRequest, need_reply: bool) -> None:
    payload, nfds = FRONTEND_CASES[request_]
    fds = tuple(range(100, 100 + nfds))
    data = encode_message(request_, payload, need_reply=need_reply)
    assert data[4:8] == struct.pack("<I", 0x9 if need_reply else 0x1)
    msg = dec_front(data, fds)
    assert msg == Message(request_, 0x9 if need_reply else 0x1, payload, fds)
    assert msg.need_reply is need_reply and not msg.is_reply
    line = describe(msg)
    assert line.startswith(request_.name)
    assert "01020304" not in line and "\\x01" not in line  # never the config bytes
    # The same bytes with one fd too many (REM_MEM_REG tolerates one) are rejected.
    extra = (998, 999) if request_ is F.REM_MEM_REG else (999,)
    with pytest.raises(MessageError) as ei:
        dec_front(data, fds + extra)
    assert reason(ei) == "fd-count-mismatch"
    assert error_fds(ei.value) == fds + extra


@pytest.mark.parametrize("request_", list(BackendRequest), ids=lambda r: r.name)
def test_every_backend_request_decodes(request_: BackendRequest) -> None:
    payload, nfds = BACKEND_CASES[request_]
    fds = tuple(range(100, 100 + nfds))
    data = encode_message(request_, payload)
    msg = dec_back(data, fds)
    assert msg == Message(request_, 0x1, payload, fds)
    assert describe(msg).startswith("BACKEND_" + request_.name)


def test_unknown_ids_rejected() -> None:
    for rid in (0, 45, 1000, 2**32 - 1):
        with pytest.raises(MessageError) as ei:
            dec_front(raw(rid, 1), (5,))
        assert reason(ei) == "unknown-request"
        assert error_fds(ei.value) == (5,)
    for rid in (0, 11, 44):
        with pytest.raises(MessageError) as ei:
            dec_back(raw(rid, 1))
        assert reason(ei) == "unknown-request"


# ---------------------------------------------------------------------------
# Malformed payloads, each with its reason slug


def mt_raw(nregions: int, nbodies: int, extra: bytes = b"") -> bytes:
    return struct.pack("<II", nregions, 0) + REGION_A.encode() * nbodies + extra


MALFORMED: list[tuple[str, int, bytes, int, str]] = [
    ("u64 short", F.SET_FEATURES, bytes(4), 0, "short-payload"),
    ("u64 long", F.SET_FEATURES, bytes(12), 0, "oversized-payload"),
    ("empty expected", F.GET_FEATURES, bytes(8), 0, "oversized-payload"),
    ("empty expected 1", F.RESET_DEVICE, b"\0", 0, "oversized-payload"),
    ("vring state short", F.SET_VRING_NUM, bytes(7), 0, "short-payload"),
    ("vring addr short", F.SET_VRING_ADDR, bytes(32), 0, "short-payload"),
    ("vring addr long", F.SET_VRING_ADDR, bytes(48), 0, "oversized-payload"),
    ("mem table short", F.SET_MEM_TABLE, bytes(4), 0, "short-payload"),
    ("mem table too long", F.SET_MEM_TABLE, mt_raw(9, 9), 9, "oversized-payload"),
    ("mem table n>8", F.SET_MEM_TABLE, mt_raw(9, 8), 8, "bad-field"),
    ("mem table count/size", F.SET_MEM_TABLE, mt_raw(2, 1), 2, "bad-payload-size"),
    ("mem table full array", F.SET_MEM_TABLE, mt_raw(1, 8), 1, "bad-payload-size"),
    ("mem table ragged", F.SET_MEM_TABLE, mt_raw(1, 1, b"xxxxx"), 1, "bad-payload-size"),
    ("single region short", F.ADD_MEM_REG, bytes(32), 1, "short-payload"),
    ("log as u64", F.SET_LOG_BASE, bytes(8), 1, "short-payload"),
    ("config short", F.SET_CONFIG, bytes(11), 0, "short-payload"),
    ("config long", F.SET_CONFIG, bytes(12 + 257), 0, "oversized-payload"),
    ("config size>256", F.SET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(4), 0, "bad-field"),
    ("config size/len", F.SET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(5), 0, "bad-payload-size"),
    ("get config size/len", F.GET_CONFIG, struct.pack("<III", 0, 8, 0), 0, "bad-payload-size"),
    ("iotlb perm", F.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 0, 0, 4, 2), 0, "bad-field"),
    ("iotlb type", F.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 0, 0, 1, 9), 0, "bad-field"),
    ("iotlb packed", F.IOTLB_MSG, struct.pack("<QQQBB", 0, 0, 0, 1, 2), 0, "short-payload"),
    ("inflight packed", F.SET_INFLIGHT_FD, struct.pack("<QQHH", 0, 0, 1, 1), 1, "short-payload"),
    ("shared short", F.GET_SHARED_OBJECT, bytes(15), 0, "short-payload"),
    ("crypto empty", F.CREATE_CRYPTO_SESSION, b"", 0, "short-payload"),
    ("device state long", F.SET_DEVICE_STATE_FD, bytes(16), 1, "oversized-payload"),
]  # fmt: skip


@pytest.mark.parametrize(
    "rid,payload,nfds,slug", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_frontend(rid: int, payload: bytes, nfds: int, slug: str) -> None:
    fds = tuple(range(10, 10 + nfds))
    with pytest.raises(MessageError) as ei:
        dec_front(raw(rid, 1, payload), fds)
    assert reason(ei) == slug
    assert error_fds(ei.value) == fds


def test_malformed_backend() -> None:
    with pytest.raises(MessageError) as ei:
        dec_back(raw(B.SHMEM_MAP, 1, bytes(39)), (3,))
    assert reason(ei) == "short-payload"
    with pytest.raises(MessageError) as ei:
        dec_back(raw(B.CONFIG_CHANGE_MSG, 1, bytes(8)))
    assert reason(ei) == "oversized-payload"
    with pytest.raises(MessageError) as ei:
        dec_back(raw(B.IOTLB_MSG, 1, struct.pack("<QQQBB6x", 0, 0, 0, 0, 0)))
    assert reason(ei) == "bad-field"


def test_decode_with_wrong_payload_length_is_local_error() -> None:
    h = decode_header(raw(F.SET_FEATURES, 1, size=8))
    with pytest.raises(LocalProtocolError):
        decode_frontend(h, bytes(4), ())


# ---------------------------------------------------------------------------
# File-descriptor rules


@pytest.mark.parametrize("rid", [F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR])
def test_vring_fd_nofd_rule(rid: FrontendRequest) -> None:
    with_fd = encode_message(rid, U64(3))
    no_fd = encode_message(rid, U64(3 | VRING_NOFD_MASK))
    assert dec_front(with_fd, (7,)).fds == (7,)
    assert dec_front(no_fd, ()).fds == ()
    for data, fds in [(with_fd, ()), (with_fd, (7, 8)), (no_fd, (7,))]:
        with pytest.raises(MessageError) as ei:
            dec_front(data, fds)
        assert reason(ei) == "fd-count-mismatch"
        assert error_fds(ei.value) == fds
    assert vring_index(3 | VRING_NOFD_MASK) == 3 and vring_nofd(3 | VRING_NOFD_MASK)
    assert not vring_nofd(3)


@pytest.mark.parametrize("n", range(0, 9))
def test_mem_table_one_fd_per_region(n: int) -> None:
    data = encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_A,) * n))
    assert len(data) == 12 + 8 + 32 * n
    fds = tuple(range(20, 20 + n))
    assert dec_front(data, fds).fds == fds
    for wrong in (n - 1, n + 1):
        if wrong < 0:
            continue
        with pytest.raises(MessageError) as ei:
            dec_front(data, tuple(range(20, 20 + wrong)))
        assert reason(ei) == "fd-count-mismatch"


def test_optional_and_required_fds() -> None:
    rem = encode_message(F.REM_MEM_REG, SingleMemoryRegion(REGION_A))
    assert dec_front(rem, ()).fds == () and dec_front(rem, (4,)).fds == (4,)
    add = encode_message(F.ADD_MEM_REG, SingleMemoryRegion(REGION_A))
    log = encode_message(F.SET_LOG_BASE, Log(1, 0))
    assert dec_front(log, ()).fds == () and dec_front(log, (4,)).fds == (4,)
    cases = [
        (rem, (4, 5)),
        (add, ()),
        (add, (4, 5)),
        (encode_message(F.SET_LOG_FD), ()),
        (encode_message(F.SET_BACKEND_REQ_FD), ()),
        (encode_message(F.GET_FEATURES), (4,)),
        (encode_message(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0)), ()),
    ]
    for data, fds in cases:
        with pytest.raises(MessageError) as ei:
            dec_front(data, fds)
        assert reason(ei) == "fd-count-mismatch"


def test_backend_fd_rules() -> None:
    notifier = encode_message(B.VRING_HOST_NOTIFIER_MSG, VringArea(2, 4096, 0))
    remove = encode_message(B.VRING_HOST_NOTIFIER_MSG, VringArea(2 | VRING_NOFD_MASK, 0, 0))
    assert dec_back(notifier, (9,)).payload == VringArea(2, 4096, 0)
    assert dec_back(remove, ()).fds == ()
    for data, fds in [
        (notifier, ()),
        (remove, (9,)),
        (encode_message(B.SHMEM_MAP, ShmemMap(0, 0, 0, 1, 0)), ()),
        (encode_message(B.SHMEM_UNMAP, ShmemMap(0, 0, 0, 1, 0)), (9,)),
    ]:
        with pytest.raises(MessageError) as ei:
            dec_back(data, fds)
        assert reason(ei) == "fd-count-mismatch"


# ---------------------------------------------------------------------------
# Replies


def reply(request: FrontendRequest | BackendRequest, payload: object, fds: Sequence[int] = ()) -> Message:
    data = encode_reply(request, payload)
    assert data[4:8] == struct.pack("<I", 0x5)
    h, p = split(data)
    return decode_reply(h, p, fds, request)


def test_typed_replies() -> None:
    assert reply(F.GET_FEATURES, U64(1 << 30)).payload == U64(1 << 30)
    assert reply(F.GET_VRING_BASE, VringState(0, 42)).payload == VringState(0, 42)
    cfg = ConfigSpace(0, 4, 0, b"\x10\x20\x30\x40")
    msg = reply(F.GET_CONFIG, cfg)
    assert msg.payload == cfg and msg.is_reply
    assert reply(F.GET_CONFIG, None).payload is None  # back-end error indication
    assert reply(F.GET_INFLIGHT_FD, InflightDesc(4096, 0, 2, 8), (3,)).fds == (3,)
    assert reply(F.GET_SHMEM_CONFIG, ShmemConfig(1, (0, 1 << 30))).payload == ShmemConfig(
        1, (0, 1 << 30)
    )
    # REPLY_ACK u64 for a request without its own reply body
    assert reply(F.SET_VRING_ADDR, U64(0)).payload == U64(0)
    # postcopy replies and plain acks share the id
    assert reply(F.SET_MEM_TABLE, U64(0)).payload == U64(0)
    table = MemoryTable((REGION_A,))
    assert reply(F.SET_MEM_TABLE, table).payload == table
    assert reply(F.ADD_MEM_REG, SingleMemoryRegion(REGION_B)).payload == SingleMemoryRegion(REGION_B)
    assert reply(F.POSTCOPY_ADVISE, None, (11,)).fds == (11,)
    assert reply(F.SET_LOG_BASE, None).payload is None
    assert reply(F.GET_SHARED_OBJECT, U64(0), (5,)).fds == (5,)
    assert reply(F.GET_SHARED_OBJECT, U64(1)).fds == ()
    assert reply(F.SET_DEVICE_STATE_FD, U64(0), (6,)).fds == (6,)
    assert reply(F.SET_DEVICE_STATE_FD, U64(VRING_NOFD_MASK)).fds == ()
    assert reply(B.SHARED_OBJECT_LOOKUP, U64(0), (8,)).fds == (8,)
    assert reply(B.IOTLB_MSG, U64(0)).payload == U64(0)


def test_reply_errors() -> None:
    def bad(request: FrontendRequest | BackendRequest, body: bytes, fds: Sequence[int] = ()) -> str:
        h, p = split(raw(request, 0x5, body))
        with pytest.raises(MessageError) as ei:
            decode_reply(h, p, fds, request)
        assert error_fds(ei.value) == tuple(fds)
        return reason(ei)

    assert bad(F.GET_FEATURES, bytes(4)) == "short-payload"
    assert bad(F.GET_FEATURES, bytes(16)) == "oversized-payload"
    assert bad(F.GET_FEATURES, bytes(8), (1,)) == "fd-count-mismatch"
    assert bad(F.SET_VRING_NUM, b"") == "short-payload"
    assert bad(F.ADD_MEM_REG, bytes(20)) == "bad-payload-size"
    assert bad(F.GET_CONFIG, bytes(5)) == "bad-payload-size"  # neither empty nor >= 12
    assert bad(F.SET_DEVICE_STATE_FD, bytes(8)) == "fd-count-mismatch"
    assert bad(F.GET_SHMEM_CONFIG, bytes(13)) == "bad-payload-size"
    assert bad(B.SHMEM_MAP, bytes(40)) == "oversized-payload"


def test_expects_reply() -> None:
    always = {
        F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_VRING_BASE, F.GET_QUEUE_NUM,
        F.IOTLB_MSG, F.GET_CONFIG, F.CREATE_CRYPTO_SESSION, F.POSTCOPY_ADVISE,
        F.POSTCOPY_END, F.GET_INFLIGHT_FD, F.GET_MAX_MEM_SLOTS, F.GET_STATUS,
        F.GET_SHARED_OBJECT, F.SET_DEVICE_STATE_FD, F.CHECK_DEVICE_STATE, F.GET_SHMEM_CONFIG,
    }  # fmt: skip
    assert {r for r in FrontendRequest if expects_reply(r)} == always
    assert not expects_reply(F.SET_LOG_BASE)
    assert expects_reply(F.SET_LOG_BASE, ProtocolFeature.LOG_SHMFD.mask)
    assert {r for r in BackendRequest if expects_reply(r)} == {B.SHARED_OBJECT_LOOKUP}
    with pytest.raises(LocalProtocolError):
        expects_reply(1)
    assert spec_for(F.SET_MEM_TABLE).request.min_size == 8


# ---------------------------------------------------------------------------
# Encoding


def test_encode_message_checks() -> None:
    assert encode_message(F.GET_FEATURES) == raw(1, 1)
    assert encode_message(F.SET_FEATURES, U64(5), need_reply=True) == raw(
        2, 0x9, struct.pack("<Q", 5)
    )
    assert encode_message(F.SET_FEATURES, U64(5), flags=0x9) == raw(2, 0x9, struct.pack("<Q", 5))
    assert encode_message(77, RawPayload(b"abc")) == raw(77, 1, b"abc")  # unknown ids: no check
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_FEATURES, VringState(0, 0))
    with pytest.raises(LocalProtocolError):
        encode_message(F.SET_FEATURES)
    with pytest.raises(LocalProtocolError):
        encode_message(F.GET_FEATURES, U64(0))
    for flags in (0x0, 0x5, 0x11, 0x2):
        with pytest.raises(LocalProtocolError):
            encode_message(F.GET_FEATURES, flags=flags)
    with pytest.raises(LocalProtocolError):
        encode_message(2**32, RawPayload(b""))
    with pytest.raises(LocalProtocolError):
        RawPayload(bytes(MAX_PAYLOAD_SIZE + 1))


def test_encode_reply_checks() -> None:
    assert encode_reply(F.GET_FEATURES, U64(3)) == raw(1, 0x5, struct.pack("<Q", 3))
    assert encode_reply(F.SET_CONFIG, U64(0)) == raw(25, 0x5, bytes(8))
    with pytest.raises(LocalProtocolError):
        encode_reply(F.GET_VRING_BASE, U64(0))
    with pytest.raises(LocalProtocolError):
        encode_reply(F.GET_FEATURES, None)


def test_describe_hides_config_bytes() -> None:
    secret = b"SECRETSECRET"
    msg = dec_front(encode_message(F.SET_CONFIG, ConfigSpace(4, len(secret), 0, secret)))
    line = describe(msg)
    assert "SECRET" not in line and "size=12" in line and "offset=4" in line
    assert "SECRET" not in repr(msg)


# ---------------------------------------------------------------------------
# Reader


def stream_of(msgs: list[tuple[bytes, tuple[int, ...]]]) -> tuple[bytes, list[tuple[int, tuple[int, ...]]]]:
    data = b""
    marks = []
    for body, fds in msgs:
        if fds:
            marks.append((len(data), fds))
        data += body
    return data, marks


SAMPLE_STREAM = [
    (encode_message(F.SET_OWNER), ()),
    (encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_A, REGION_B))), (30, 31)),
    (encode_message(F.SET_VRING_KICK, U64(0)), (32,)),
    (encode_message(F.SET_VRING_KICK, U64(1 | VRING_NOFD_MASK)), ()),
    (encode_message(F.SET_CONFIG, ConfigSpace(0, 3, 0, b"abc"), need_reply=True), ()),
    (encode_message(F.ADD_MEM_REG, SingleMemoryRegion(REGION_B)), (33,)),
    (encode_message(F.GET_FEATURES), ()),
]


def drain(reader: MessageReader, **kw: object) -> list[Message]:
    out: list[Message] = []
    while True:
        m = reader.next_message(**kw)
        if m is NEED_DATA:
            return out
        assert isinstance(m, Message)
        out.append(m)


def expected_messages() -> list[Message]:
    return [dec_front(body, fds) for body, fds in SAMPLE_STREAM]


def feed_cut(cuts: Sequence[int]) -> list[Message]:
    """Feed SAMPLE_STREAM cut at ``cuts`` and at every message start (as the kernel does)."""
    data, marks = stream_of(SAMPLE_STREAM)
    fd_at = dict(marks)
    starts = {0}
    pos = 0
    for body, _ in SAMPLE_STREAM:
        starts.add(pos)
        pos += len(body)
    bounds = sorted(starts | set(cuts) | {len(data)})
    reader = MessageReader("frontend")
    got: list[Message] = []
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        reader.receive_data(data[a:b], fd_at.get(a, ()))
        got += drain(reader)
    reader.receive_data(b"")
    got += drain(reader)
    assert reader.closed
    return got


def test_reader_whole_stream_in_one_chunk_per_message() -> None:
    assert feed_cut([]) == expected_messages()


def test_reader_split_at_every_byte_boundary() -> None:
    data, _ = stream_of(SAMPLE_STREAM)
    want = expected_messages()
    for i in range(len(data) + 1):
        assert feed_cut([i]) == want, i


def test_reader_byte_by_byte() -> None:
    data, _ = stream_of(SAMPLE_STREAM)
    assert feed_cut(range(len(data))) == expected_messages()


def test_reader_several_messages_in_one_chunk() -> None:
    # Queued fd-less messages glued in front of the one that carries fds
    # (what unix_stream_read_generic returns): the fds belong to the last.
    data = (
        encode_message(F.SET_VRING_NUM, VringState(0, 256))
        + encode_message(F.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 0))
        + encode_message(F.SET_VRING_KICK, U64(0))
    )
    reader = MessageReader("frontend")
    reader.receive_data(data, [7])
    msgs = drain(reader)
    assert [m.request for m in msgs] == [F.SET_VRING_NUM, F.SET_VRING_ADDR, F.SET_VRING_KICK]
    assert [m.fds for m in msgs] == [(), (), (7,)]


def test_reader_fds_go_to_message_of_chunk_last_byte() -> None:
    m1 = encode_message(F.SET_VRING_KICK, U64(0))
    m2 = encode_message(F.SET_VRING_CALL, U64(0))
    reader = MessageReader("frontend")
    reader.receive_data(m1[:5], [40])  # m1 starts here: its fd
    assert reader.next_message() is NEED_DATA
    # Tail of m1 glued to the start of m2, with m2's fd (the recvmsg stops
    # inside m2 because the caller's buffer was full).
    reader.receive_data(m1[5:] + m2[:3], [41])
    assert reader.next_message() == Message(F.SET_VRING_KICK, 1, U64(0), (40,))
    assert reader.next_message() is NEED_DATA
    reader.receive_data(m2[3:])
    assert reader.next_message() == Message(F.SET_VRING_CALL, 1, U64(0), (41,))
    assert reader.buffered == 0


def kernel_chunks(
    skbs: Sequence[tuple[bytes, tuple[int, ...]]], bufsize: int
) -> list[tuple[bytes, tuple[int, ...]]]:
    """What successive recvmsg(bufsize) calls return on an AF_UNIX stream socket.

    Models unix_stream_read_generic(): data of queued skbs is glued together
    until the buffer is full; the fds of an skb are handed out with the
    first call that copies from it, and that call ends right after it.
    """
    queue = [[bytearray(data), fds] for data, fds in skbs]
    out: list[tuple[bytes, tuple[int, ...]]] = []
    while queue:
        chunk = bytearray()
        got: tuple[int, ...] = ()
        while queue and len(chunk) < bufsize:
            skb = queue[0]
            n = min(len(skb[0]), bufsize - len(chunk))
            chunk += skb[0][:n]
            del skb[0][:n]
            if skb[1]:
                got, skb[1] = skb[1], ()  # type: ignore[assignment]
            if skb[0]:
                break
            queue.pop(0)
            if got:
                break
        out.append((bytes(chunk), got))
    return out


@pytest.mark.parametrize("style", ["one-sendmsg", "header-then-payload"])
def test_reader_against_kernel_delivery_for_every_buffer_size(style: str) -> None:
    # QEMU sends header+payload+fds with one sendmsg (one skb); libvhost-user
    # sends header+fds with sendmsg, then the payload with write().
    skbs: list[tuple[bytes, tuple[int, ...]]] = []
    for body, fds in SAMPLE_STREAM:
        if style == "one-sendmsg" or len(body) == HEADER_SIZE:
            skbs.append((body, fds))
        else:
            skbs += [(body[:HEADER_SIZE], fds), (body[HEADER_SIZE:], ())]
    want = expected_messages()
    total = sum(len(b) for b, _ in skbs)
    for bufsize in range(1, total + 2):
        reader = MessageReader("frontend")
        got: list[Message] = []
        for data, fds in kernel_chunks(skbs, bufsize):
            reader.receive_data(data, fds)
            got += drain(reader)
        reader.receive_data(b"")
        got += drain(reader)
        assert got == want, bufsize
        assert reader.closed


@pytest.mark.skipif(sys.platform != "linux", reason="AF_UNIX SCM_RIGHTS semantics of Linux")
@pytest.mark.parametrize("bufsize", [5, 12, 64, 4096])
def test_reader_with_a_real_unix_socket(bufsize: int) -> None:
    """The fd rule against the real kernel: fds land on the message they were sent with."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opened: list[int] = []
    try:
        sent_inodes: list[tuple[int, ...]] = []
        for body, fds in SAMPLE_STREAM:
            pipes = [os.pipe() for _ in fds]
            opened += [fd for pair in pipes for fd in pair]
            sent_inodes.append(tuple(os.fstat(r).st_ino for r, _ in pipes))
            if pipes:
                socket.send_fds(left, [body], [r for r, _ in pipes])
            else:
                left.sendall(body)
        left.shutdown(socket.SHUT_WR)
        reader = MessageReader("frontend")
        got: list[Message] = []
        while True:
            data, fds, _, _ = socket.recv_fds(right, bufsize, 8)
            opened += fds
            reader.receive_data(data, fds)
            got += drain(reader)
            if not data:
                break
        assert reader.closed
        assert [m.request for m in got] == [m.request for m in expected_messages()]
        assert [tuple(os.fstat(fd).st_ino for fd in m.fds) for m in got] == sent_inodes
    finally:
        for fd in opened:
            os.close(fd)
        left.close()
        right.close()


def test_reader_truncated_message_at_eof() -> None:
    full = encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_A,)))
    for cut in (1, 11, 12, 13, len(full) - 1):
        reader = MessageReader("frontend")
        reader.receive_data(full[:cut], [50])
        assert reader.next_message() is NEED_DATA
        reader.receive_data(b"")
        with pytest.raises(MessageError) as ei:
            reader.next_message()
        assert reason(ei) == "truncated-message"
        assert error_fds(ei.value) == (50,)
        assert not reader.closed


def test_reader_clean_eof() -> None:
    reader = MessageReader("frontend")
    reader.receive_data(encode_message(F.GET_FEATURES))
    reader.receive_data(b"")
    assert isinstance(reader.next_message(), Message)
    assert reader.next_message() is NEED_DATA and reader.closed
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")


def test_reader_stray_fds_at_eof() -> None:
    reader = MessageReader("frontend")
    reader.receive_data(b"", [60])
    with pytest.raises(MessageError) as ei:
        reader.next_message()
    assert reason(ei) == "stray-fds" and error_fds(ei.value) == (60,)


def test_reader_error_carries_all_held_fds_and_is_final() -> None:
    bad = encode_message(F.SET_MEM_TABLE, MemoryTable((REGION_A, REGION_B)))
    later = encode_message(F.SET_VRING_KICK, U64(0))
    reader = MessageReader("frontend")
    reader.receive_data(bad, [70])  # one fd short
    reader.receive_data(later, [71])
    with pytest.raises(MessageError) as ei:
        reader.next_message()
    assert reason(ei) == "fd-count-mismatch"
    assert error_fds(ei.value) == (70, 71)
    with pytest.raises(LocalProtocolError):
        reader.next_message()
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x", [72])


def test_reader_rejects_bad_header_before_payload_arrives() -> None:
    reader = MessageReader("frontend")
    reader.receive_data(raw(F.SET_CONFIG, 1, size=MAX_PAYLOAD_SIZE + 1), [80])
    with pytest.raises(MessageError) as ei:
        reader.next_message()
    assert reason(ei) == "oversized-payload" and error_fds(ei.value) == (80,)
    reader = MessageReader("frontend")
    reader.receive_data(raw(F.GET_FEATURES, 0x21, size=0))
    with pytest.raises(MessageError) as ei:
        reader.next_message()
    assert reason(ei) == "reserved-flags"


def test_reader_replies_and_backend_requests() -> None:
    # Front-end side: reads back-end replies on the main socket...
    reader = MessageReader("backend")
    reader.receive_data(encode_reply(F.GET_FEATURES, U64(1 << 30)))
    reader.receive_data(encode_reply(F.GET_INFLIGHT_FD, InflightDesc(4096, 0, 1, 8)), [90])
    assert reader.next_message(F.GET_FEATURES) == Message(F.GET_FEATURES, 5, U64(1 << 30))
    m = reader.next_message(expect_reply_to=F.GET_INFLIGHT_FD)
    assert isinstance(m, Message) and m.fds == (90,) and m.is_reply
    with pytest.raises(LocalProtocolError):
        reader.next_message(expect_reply_to=B.SHARED_OBJECT_LOOKUP)
    # ... and back-end requests on the back-end channel.
    chan = MessageReader("backend")
    chan.receive_data(encode_message(B.SHMEM_MAP, ShmemMap(1, 0, 0, 4096, 1)), [91])
    m = chan.next_message()
    assert isinstance(m, Message) and m.request is B.SHMEM_MAP and m.fds == (91,)
    # Back-end side: front-end replies to our BACKEND_* requests.
    mine = MessageReader("frontend")
    mine.receive_data(encode_reply(B.SHARED_OBJECT_LOOKUP, U64(0)), [92])
    m = mine.next_message(B.SHARED_OBJECT_LOOKUP)
    assert isinstance(m, Message) and m.request is B.SHARED_OBJECT_LOOKUP and m.fds == (92,)
    with pytest.raises(LocalProtocolError):
        mine.next_message(F.GET_FEATURES)


def test_reader_unexpected_reply_and_wrong_reply() -> None:
    reader = MessageReader("frontend")
    reader.receive_data(encode_reply(F.GET_FEATURES, U64(0)))
    with pytest.raises(MessageError) as ei:
        reader.next_message()
    assert reason(ei) == "unexpected-reply-flag"
    reader = MessageReader("backend")
    reader.receive_data(encode_reply(F.GET_PROTOCOL_FEATURES, U64(0)))
    with pytest.raises(MessageError) as ei:
        reader.next_message(F.GET_FEATURES)
    assert reason(ei) == "reply-mismatch"
    with pytest.raises(LocalProtocolError):
        MessageReader("other")


# ---------------------------------------------------------------------------
# Fuzzing: only MessageError escapes, and no fd is ever lost


def check_reader(side: str, chunks: list[tuple[bytes, tuple[int, ...]]]) -> None:
    reader = MessageReader(side)
    given_fds: list[int] = []
    returned: list[int] = []
    try:
        for data, fds in chunks + [(b"", ())]:
            reader.receive_data(data, fds)
            given_fds += fds
            while True:
                m = reader.next_message()
                if m is NEED_DATA:
                    break
                assert isinstance(m, Message)
                returned += m.fds
        assert reader.closed
    except MessageError as err:
        assert isinstance(err.reason, str) and err.reason
        returned += error_fds(err)
    assert Counter(returned) == Counter(given_fds)


fd_tuples = st.lists(st.integers(3, 1000), max_size=3).map(tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["frontend", "backend"]),
    st.lists(st.tuples(st.binary(min_size=1, max_size=64), fd_tuples), max_size=8),
)
def test_fuzz_random_bytes(side: str, chunks: list[tuple[bytes, tuple[int, ...]]]) -> None:
    check_reader(side, chunks)


@st.composite
def plausible_streams(draw: st.DrawFn) -> list[tuple[bytes, tuple[int, ...]]]:
    """Well-framed messages with random ids, flags and payloads, randomly re-chunked."""
    data = b""
    starts: dict[int, tuple[int, ...]] = {}
    for _ in range(draw(st.integers(1, 5))):
        rid = draw(st.integers(0, 48))
        flags = draw(st.sampled_from([0x1, 0x1, 0x9, 0x5, 0x0, 0x11]))
        size = draw(st.sampled_from([0, 8, 16, 24, 32, 40, 72, 12 + 4, 8 + 32 * 2, 5]))
        body = draw(st.binary(min_size=size, max_size=size))
        if rid in (F.SET_VRING_KICK, F.SET_VRING_CALL) and size == 8 and draw(st.booleans()):
            body = struct.pack("<Q", draw(st.sampled_from([0, VRING_NOFD_MASK | 1])))
        starts[len(data)] = draw(fd_tuples)
        data += raw(rid, flags, body)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=6))
    bounds = sorted(set(cuts) | set(starts) | {len(data)})
    return [(data[a:b], starts.get(a, ())) for a, b in zip(bounds, bounds[1:]) if a < b]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["frontend", "backend"]), plausible_streams())
def test_fuzz_plausible_messages(side: str, chunks: list[tuple[bytes, tuple[int, ...]]]) -> None:
    check_reader(side, chunks)


@settings(max_examples=200, deadline=None)
@given(PAYLOADS)
def test_fuzz_truncated_payloads(p: object) -> None:
    encoded = p.encode()  # type: ignore[attr-defined]
    for cut in {0, len(encoded) // 2, max(len(encoded) - 1, 0)}:
        if cut == len(encoded):
            continue
        try:
            type(p).decode(encoded[:cut])  # type: ignore[attr-defined]
        except MessageError:
            pass
