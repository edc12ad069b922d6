"""The vhost-user shared memory rules without sockets (protocol/shmem.py through protocol/session.py).

What they encode is what QEMU 11.1.3 does (docs/qemu-facts.md section e): SHMEM is offered without
CONFIGURE_MEM_SLOTS, the dependent feature bits only where a region can be placed, the map only once
the device runs, and a stop drops the mapping without an UNMAP.
"""

from __future__ import annotations

import struct

import pytest

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import MessageError
from vhost_user_cpufreq.protocol.session import OFFERED_PROTOCOL_FEATURES, DeviceFacts, SessionMachine
from vhost_user_cpufreq.protocol.session_effects import MapShmem, Reply, SetBackendChannel, ShmemDropped, StartRing
from vhost_user_cpufreq.protocol.shmem import AckReader, ShmemRules, with_shmem

from .test_session_machine import DEVICE_FEATURES, PROTOCOL_FEATURES, Fds, configured, refused, send

F = vu.FrontendRequest
B = vu.BackendRequest
PF = vu.ProtocolFeature
PAGE_BIT = 1 << 1
SHMEM_PF = with_shmem(OFFERED_PROTOCOL_FEATURES)
CHANNEL = 50


def machine(sizes: tuple[int, ...] = (4096,)) -> SessionMachine:
    return SessionMachine(DeviceFacts(features=DEVICE_FEATURES, num_queues=1, max_queue_size=256, config_size=64,
                                      max_mem_slots=32, shmem_sizes=sizes, shmem_features=PAGE_BIT if sizes else 0))


def realized(pf: int = SHMEM_PF, *, channel: bool = True) -> SessionMachine:
    """QEMU 11.1's realize: protocol features, the channel, the owner, the shmem config."""
    m = machine()
    send(m, F.SET_PROTOCOL_FEATURES, vu.U64(pf))
    if channel:
        assert send(m, F.SET_BACKEND_REQ_FD, fds=(CHANNEL,), inspector=Fds(sockets=(CHANNEL,))) == [
            SetBackendChannel(CHANNEL)]
    send(m, F.SET_OWNER)
    return m


def offered(m: SessionMachine) -> int:
    (reply,) = send(m, F.GET_FEATURES)
    assert isinstance(reply, Reply)
    return struct.unpack_from("<Q", reply.data, vu.HEADER_SIZE)[0]


def start(m: SessionMachine, acked: int) -> list[object]:
    send(m, F.SET_FEATURES, vu.U64(acked))
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (60,))
    return send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))


def test_shmem_is_offered_instead_of_configure_mem_slots_only_by_a_device_with_regions() -> None:
    (plain,) = send(machine(()), F.GET_PROTOCOL_FEATURES)
    (shm,) = send(machine(), F.GET_PROTOCOL_FEATURES)
    assert plain == Reply(vu.encode_reply(F.GET_PROTOCOL_FEATURES, vu.U64(OFFERED_PROTOCOL_FEATURES)))
    assert shm == Reply(vu.encode_reply(F.GET_PROTOCOL_FEATURES, vu.U64(SHMEM_PF)))
    assert SHMEM_PF & 1 << PF.SHMEM and not SHMEM_PF & 1 << PF.CONFIGURE_MEM_SLOTS
    # and the front-end cannot ack what was not offered
    refused("unsupported-protocol-features", machine(), F.SET_PROTOCOL_FEATURES,
            vu.U64(OFFERED_PROTOCOL_FEATURES | 1 << PF.SHMEM))
    refused("unsupported-protocol-features", machine(()), F.SET_PROTOCOL_FEATURES, vu.U64(SHMEM_PF))


def test_get_shmem_config_answers_the_regions_and_needs_the_feature() -> None:
    (reply,) = send(realized(), F.GET_SHMEM_CONFIG)
    assert reply == Reply(vu.encode_reply(F.GET_SHMEM_CONFIG, vu.ShmemConfig(1, (4096,))))
    refused("feature-not-negotiated", realized(OFFERED_PROTOCOL_FEATURES & ~(1 << PF.CONFIGURE_MEM_SLOTS)),
            F.GET_SHMEM_CONFIG)


def test_page_feature_offered_only_where_the_page_can_be_placed() -> None:
    assert offered(realized()) & PAGE_BIT
    for pf, channel in ((SHMEM_PF & ~(1 << PF.SHMEM), True),  # front-end without SHMEM: config space only
                        (SHMEM_PF & ~(1 << PF.REPLY_ACK), True),  # no way to learn whether the map worked
                        (SHMEM_PF, False)):  # BACKEND_REQ acked but the channel never set up
        m = realized(pf, channel=channel)
        assert not offered(m) & PAGE_BIT
        refused("unsupported-features", m, F.SET_FEATURES, vu.U64(DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT))


def test_the_map_comes_once_the_device_runs_and_only_if_the_driver_took_the_page() -> None:
    m = realized()
    send(m, F.SET_FEATURES, vu.U64(DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT))
    configured(m)
    assert not any(isinstance(e, MapShmem) for e in send(m, F.SET_VRING_KICK, vu.U64(0), (60,)))
    out = send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    assert [type(e) for e in out] == [StartRing, MapShmem] and out[1] == MapShmem(0, 4096)
    # a driver that did not take the page: no map
    assert not any(isinstance(e, MapShmem) for e in start(realized(), DEVICE_FEATURES | PROTOCOL_FEATURES))


def test_a_stop_drops_the_mapping_without_unmap_and_the_next_start_maps_again() -> None:
    m = realized()
    start(m, DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT)
    assert ShmemDropped() in send(m, F.SET_VRING_ENABLE, vu.VringState(0, 0))  # QEMU's stop, first message
    assert ShmemDropped() not in send(m, F.GET_VRING_BASE, vu.VringState(0, 0))  # once only
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (61,))
    assert MapShmem(0, 4096) in send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))


def test_a_memory_table_while_mapped_does_not_map_again() -> None:
    # QEMU sends a SET_MEM_TABLE with one more region (the page) right after our map.
    m = realized()
    start(m, DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT)
    out = send(m, F.SET_MEM_TABLE, vu.MemoryTable((vu.MemoryRegion(0, 0x1000, 0x7F0000000000, 0),)), (70,))
    assert not any(isinstance(e, (MapShmem, ShmemDropped)) for e in out)


def test_the_channel_cannot_be_replaced_under_a_mapping() -> None:
    m = realized()
    start(m, DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT)
    refused("backend-channel-replaced", m, F.SET_BACKEND_REQ_FD, fds=(51,), inspector=Fds(sockets=(51,)))


def test_region_sizes_qemu_would_refuse_or_abort_on_are_refused_here() -> None:
    for sizes in ((2048,), (4096, 8192), (4096,) * 9):
        with pytest.raises(ValueError):
            ShmemRules(sizes, PAGE_BIT)
    ShmemRules((4096, 4096), PAGE_BIT)


# -- acks on the back-end channel ------------------------------------------------------------------
def ack(request: int, status: int, flags: int = vu.REPLY_FLAGS) -> bytes:
    return struct.pack("<IIIQ", request, flags, 8, status)


def test_acks_split_and_glued_are_read_in_order() -> None:
    r = AckReader()
    r.expect(B.SHMEM_MAP)
    r.expect(B.SHMEM_MAP)
    data = ack(B.SHMEM_MAP, 0) + ack(B.SHMEM_MAP, 1)
    assert r.feed(data[:5]) == [] and r.feed(data[5:23]) == [(B.SHMEM_MAP, 0)]
    assert r.feed(data[23:]) == [(B.SHMEM_MAP, 1)] and not r.outstanding


@pytest.mark.parametrize("data, reason", [
    (ack(B.SHMEM_MAP, 0), "unexpected-ack"),  # nothing outstanding
    (ack(B.SHMEM_UNMAP, 0), "reply-mismatch"),
    (ack(B.SHMEM_MAP, 0, flags=1), "bad-reply-flags"),  # a request, not a reply
    (struct.pack("<III", B.SHMEM_MAP, vu.REPLY_FLAGS, 4000), "bad-ack"),
])
def test_anything_but_an_awaited_ack_is_refused(data: bytes, reason: str) -> None:
    r = AckReader()
    if reason != "unexpected-ack":
        r.expect(B.SHMEM_MAP)
    with pytest.raises(MessageError) as exc:
        r.feed(data)
    assert exc.value.reason == reason
