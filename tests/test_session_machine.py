"""The vhost-user session rules without sockets: typed messages in, effects out (protocol/session.py)."""

from __future__ import annotations

import pytest

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import RingError, SessionStateError
from vhost_user_cpufreq.protocol.session import (
    EVENTFD,
    OFFERED_PROTOCOL_FEATURES,
    RULES,
    DeviceFacts,
    SessionMachine,
)
from vhost_user_cpufreq.protocol.session_effects import (
    CloseFd,
    MapRegion,
    MapRegions,
    RefreshRing,
    Reply,
    ReplyConfig,
    ReplyRingBase,
    ResetDevice,
    SetBackendChannel,
    SetCallFd,
    SetDeviceFeatures,
    SetErrFd,
    SetKickFd,
    SetRingBase,
    StartRing,
    StopRing,
    UnmapRegion,
    WriteConfig,
)
from vhost_user_cpufreq.protocol.virtqueue import VIRTIO_RING_F_EVENT_IDX

F = vu.FrontendRequest
PF = vu.ProtocolFeature
PROTOCOL_FEATURES = 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
DEVICE_FEATURES = 1 << 32 | 1 << VIRTIO_RING_F_EVENT_IDX
ADDR = vu.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)
REGION = vu.MemoryRegion(0, 0x10000, 0x7F0000000000, 0)


class Fds:
    """What the kernel would say about each fd: eventfds by default; sockets and files by name."""

    def __init__(self, *, sockets: tuple[int, ...] = (), files: dict[int, str] | None = None) -> None:
        self.sockets = set(sockets)
        self.files = files or {}

    def fd_target(self, fd: int) -> str:
        return self.files.get(fd, "socket:[1]" if fd in self.sockets else EVENTFD)

    def is_socket(self, fd: int) -> bool:
        return fd in self.sockets


def machine(num_queues: int = 2) -> SessionMachine:
    return SessionMachine(DeviceFacts(features=DEVICE_FEATURES, num_queues=num_queues, max_queue_size=256,
                                      config_size=64, max_mem_slots=32))


def msg(req: F, payload: vu.Payload | None = None, fds: tuple[int, ...] = (), *, need_reply: bool = False) -> vu.Message:
    return vu.Message(req, 1 | (vu.FLAG_NEED_REPLY if need_reply else 0), payload, fds)


def send(m: SessionMachine, req: F, payload: vu.Payload | None = None, fds: tuple[int, ...] = (), *,
         need_reply: bool = False, inspector: Fds | None = None) -> list[object]:
    return list(m.handle(msg(req, payload, fds, need_reply=need_reply), inspector or Fds()))


def negotiated(*, protocol: int = OFFERED_PROTOCOL_FEATURES, features: int = DEVICE_FEATURES | PROTOCOL_FEATURES
               ) -> SessionMachine:
    m = machine()
    send(m, F.SET_PROTOCOL_FEATURES, vu.U64(protocol))
    send(m, F.SET_OWNER)
    send(m, F.SET_FEATURES, vu.U64(features))
    return m


def configured(m: SessionMachine, index: int = 0) -> None:
    send(m, F.SET_VRING_NUM, vu.VringState(index, 64))
    send(m, F.SET_VRING_ADDR, vu.VringAddr(index, 0, 0x1000, 0x3000, 0x2000, 0))
    send(m, F.SET_VRING_BASE, vu.VringState(index, 0))


def refused(reason: str, m: SessionMachine, req: F, payload: vu.Payload | None = None, fds: tuple[int, ...] = (),
            **kw: object) -> None:
    with pytest.raises((SessionStateError, RingError)) as err:
        send(m, req, payload, fds, **kw)  # type: ignore[arg-type]
    assert err.value.reason == reason


# -- the table ---------------------------------------------------------------------------
def test_every_rule_names_its_spec_section_and_a_handler_of_the_machine() -> None:
    for req, rule in RULES.items():
        assert rule.spec.startswith("Front-end message types: " + F(req).name), (req, rule.spec)
        assert getattr(SessionMachine, rule.handler.__name__) is rule.handler


def test_a_request_without_a_rule_is_refused_as_unsupported() -> None:
    refused("unsupported-request", machine(), F.SET_LOG_BASE, vu.U64(0))


# -- ownership and features --------------------------------------------------------------
def test_the_owner_is_claimed_once() -> None:
    m = machine()
    assert send(m, F.SET_OWNER) == []
    assert m.owner
    refused("owner-already-set", m, F.SET_OWNER)


def test_requests_that_need_an_owner_are_refused_before_set_owner() -> None:
    refused("no-owner", machine(), F.SET_FEATURES, vu.U64(0))
    refused("no-owner", machine(), F.SET_VRING_NUM, vu.VringState(0, 64))


def test_features_offered_include_protocol_features_and_are_replied() -> None:
    m = machine()
    (reply,) = send(m, F.GET_FEATURES)
    assert reply == Reply(vu.encode_reply(F.GET_FEATURES, vu.U64(DEVICE_FEATURES | PROTOCOL_FEATURES)))


def test_acked_features_must_be_a_subset_of_the_offer() -> None:
    m = machine()
    send(m, F.SET_OWNER)
    refused("unsupported-features", m, F.SET_FEATURES, vu.U64(1 << 40))
    assert m.acked_features == 0 and not m.features_set


def test_acked_features_reach_the_device_without_the_vhost_user_bit() -> None:
    m = machine()
    send(m, F.SET_OWNER)
    out = send(m, F.SET_FEATURES, vu.U64(DEVICE_FEATURES | PROTOCOL_FEATURES))
    assert out == [SetDeviceFeatures(DEVICE_FEATURES)]
    assert m.acked_features == DEVICE_FEATURES | PROTOCOL_FEATURES


def test_protocol_features_must_be_a_subset_of_the_offer() -> None:
    m = machine()
    refused("unsupported-protocol-features", m, F.SET_PROTOCOL_FEATURES, vu.U64(1 << PF.INFLIGHT_SHMFD))
    send(m, F.SET_PROTOCOL_FEATURES, vu.U64(1 << PF.MQ))
    assert m.protocol_features == 1 << PF.MQ


def test_requests_gated_on_a_protocol_feature_are_refused_without_it() -> None:
    m = negotiated(protocol=0)
    refused("feature-not-negotiated", m, F.GET_QUEUE_NUM)
    refused("feature-not-negotiated", m, F.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)))


def test_reply_ack_answers_a_need_reply_request_and_nacks_a_refused_one() -> None:
    m = negotiated()
    assert send(m, F.SET_VRING_NUM, vu.VringState(0, 64), need_reply=True) == [
        Reply(vu.encode_reply(F.SET_VRING_NUM, vu.U64(0)))]
    bad = msg(F.SET_VRING_NUM, vu.VringState(0, 512), need_reply=True)  # over the maximum
    with pytest.raises(SessionStateError) as err:
        m.handle(bad, Fds())
    assert m.refusal(bad, err.value) == Reply(vu.encode_reply(F.SET_VRING_NUM, vu.U64(1)))
    assert m.error is None


def test_a_refusal_that_cannot_be_acked_puts_the_machine_in_its_error_state() -> None:
    m = negotiated()
    bad = msg(F.GET_CONFIG, vu.ConfigSpace(60, 8, 0, bytes(8)), need_reply=True)
    with pytest.raises(SessionStateError) as err:
        m.handle(bad, Fds())
    assert err.value.reason == "bad-config-range"
    assert m.refusal(bad, err.value) is None  # GET_CONFIG has a reply of its own
    assert m.error == "bad-config-range"
    refused("session-failed", m, F.GET_FEATURES)


# -- rings --------------------------------------------------------------------------------
def test_a_ring_starts_on_its_kick_fd_once_enabled_and_stops_on_get_vring_base() -> None:
    m = negotiated()
    configured(m)
    out = send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    assert out == [SetKickFd(0, 10, polling=False)]  # started, not enabled yet: no queue
    assert m.rings[0].started and not m.rings[0].running
    out = send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    assert out == [StartRing(0, 64, ADDR, event_idx=True, indirect=False)]
    out = send(m, F.GET_VRING_BASE, vu.VringState(0, 0))
    assert out == [SetKickFd(0, None, polling=False), StopRing(0), ReplyRingBase(0)]
    assert not m.rings[0].started and not m.rings[0].running


def test_without_protocol_features_set_features_enables_every_ring() -> None:
    m = machine()
    send(m, F.SET_OWNER)
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    out = send(m, F.SET_FEATURES, vu.U64(DEVICE_FEATURES))
    assert out == [SetDeviceFeatures(DEVICE_FEATURES), StartRing(0, 64, ADDR, event_idx=True, indirect=False)]
    assert all(r.enabled for r in m.rings)
    refused("feature-not-negotiated", m, F.SET_VRING_ENABLE, vu.VringState(0, 1))


def test_disabling_a_running_ring_stops_it_and_enabling_it_again_starts_it() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    assert send(m, F.SET_VRING_ENABLE, vu.VringState(0, 0)) == [StopRing(0)]
    assert send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))[0] == StartRing(0, 64, ADDR, event_idx=True,
                                                                          indirect=False)
    refused("bad-enable-value", m, F.SET_VRING_ENABLE, vu.VringState(0, 2))


def test_a_new_kick_fd_on_a_running_ring_refreshes_it() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    assert send(m, F.SET_VRING_KICK, vu.U64(0), (11,)) == [SetKickFd(0, 11, polling=False), RefreshRing(0)]


def test_a_kick_without_an_fd_means_the_ring_is_polled() -> None:
    m = negotiated()
    configured(m)
    out = send(m, F.SET_VRING_KICK, vu.U64(vu.VRING_NOFD_MASK))
    assert out == [SetKickFd(0, None, polling=True)]


def test_a_ring_is_kicked_only_after_its_size_and_addresses() -> None:
    m = negotiated()
    refused("ring-not-configured", m, F.SET_VRING_KICK, vu.U64(0), (10,))


def test_size_addresses_and_base_are_refused_on_a_started_ring() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    refused("ring-started", m, F.SET_VRING_NUM, vu.VringState(0, 64))
    refused("ring-started", m, F.SET_VRING_ADDR, ADDR)
    refused("ring-started", m, F.SET_VRING_BASE, vu.VringState(0, 1))


@pytest.mark.parametrize("req, payload, reason", [
    (F.SET_VRING_NUM, vu.VringState(0, 100), "bad-queue-size"),  # not a power of 2
    (F.SET_VRING_NUM, vu.VringState(0, 512), "bad-queue-size"),  # over the device's maximum
    (F.SET_VRING_NUM, vu.VringState(5, 64), "bad-ring-index"),
    (F.SET_VRING_ADDR, vu.VringAddr(0, 1, 0x1000, 0x3000, 0x2000, 0), "unsupported-ring-flags"),
    (F.SET_VRING_ADDR, vu.VringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0), "misaligned-ring"),
    (F.SET_VRING_BASE, vu.VringState(0, 0x10000), "bad-ring-base"),
    (F.SET_STATUS, vu.U64(0x100), "bad-status"),
    (F.SET_CONFIG, vu.ConfigSpace(62, 4, 0, bytes(4)), "bad-config-range"),
])
def test_bad_input_is_refused_with_its_reason(req: F, payload: vu.Payload, reason: str) -> None:
    refused(reason, negotiated(), req, payload)


def test_kick_call_and_err_fds_must_be_eventfds() -> None:
    m = negotiated()
    configured(m)
    pipe = Fds(files={10: "pipe:[42]"})
    for req in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
        refused("not-an-eventfd", m, req, vu.U64(0), (10,), inspector=pipe)
    assert not m.rings[0].started


def test_call_and_err_fds_are_handed_over() -> None:
    m = negotiated()
    assert send(m, F.SET_VRING_CALL, vu.U64(1), (12,)) == [SetCallFd(1, 12)]
    assert send(m, F.SET_VRING_ERR, vu.U64(1 | vu.VRING_NOFD_MASK)) == [SetErrFd(1, None)]


def test_set_vring_base_is_recorded_for_the_shell() -> None:
    assert send(negotiated(), F.SET_VRING_BASE, vu.VringState(1, 7)) == [SetRingBase(1, 7)]


# -- memory -------------------------------------------------------------------------------
def test_a_new_memory_table_replaces_every_region_and_restarts_running_rings() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    out = send(m, F.SET_MEM_TABLE, vu.MemoryTable((REGION,)), (20,))
    assert out == [MapRegions((REGION,), (20,)), StartRing(0, 64, ADDR, event_idx=True, indirect=False),
                   CloseFd(20)]  # the mapping keeps the memory; the fd is closed after it


def test_adding_a_region_refreshes_running_rings_and_removing_one_stops_them_first() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    assert send(m, F.ADD_MEM_REG, vu.SingleMemoryRegion(REGION), (21,)) == [
        MapRegion(REGION, 21), RefreshRing(0), CloseFd(21)]
    assert send(m, F.REM_MEM_REG, vu.SingleMemoryRegion(REGION)) == [
        StopRing(0), UnmapRegion(REGION.guest_phys_addr, REGION.memory_size, REGION.userspace_addr),
        StartRing(0, 64, ADDR, event_idx=True, indirect=False)]


def test_the_backend_channel_must_be_a_socket() -> None:
    m = negotiated()
    refused("bad-backend-channel", m, F.SET_BACKEND_REQ_FD, None, (30,))
    assert send(m, F.SET_BACKEND_REQ_FD, None, (30,), inspector=Fds(sockets=(30,))) == [SetBackendChannel(30)]


# -- config, status, reset ----------------------------------------------------------------
def test_config_reads_and_writes_go_to_the_device_within_its_config_space() -> None:
    m = negotiated()
    assert send(m, F.GET_CONFIG, vu.ConfigSpace(0, 8, 0, bytes(8))) == [ReplyConfig(0, 8, 0)]
    assert send(m, F.SET_CONFIG, vu.ConfigSpace(4, 2, 0, b"ab")) == [WriteConfig(4, b"ab")]


def test_status_zero_resets_the_device() -> None:
    m = negotiated()
    assert send(m, F.SET_STATUS, vu.U64(0x0F)) == []
    assert m.status == 0x0F
    assert send(m, F.SET_STATUS, vu.U64(0)) == [ResetDevice()]


def test_reset_device_stops_rings_releases_their_fds_and_forgets_the_features() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    out = send(m, F.RESET_DEVICE)
    assert out[0] == StopRing(0) and out[-1] == ResetDevice()
    for i in (0, 1):
        assert SetKickFd(i, None, False) in out and SetCallFd(i, None) in out and SetErrFd(i, None) in out
        assert SetRingBase(i, 0) in out
    assert m.acked_features == 0 and not m.features_set and m.status == 0
    assert not any(r.started or r.enabled or r.running or r.num for r in m.rings)
    assert m.owner  # the connection keeps its owner


def test_every_fd_a_message_carried_is_handed_over_or_closed() -> None:
    m = negotiated()
    configured(m)
    out = send(m, F.SET_VRING_KICK, vu.U64(vu.VRING_NOFD_MASK), (40,))  # an fd the NOFD bit disowns
    assert out == [SetKickFd(0, None, polling=True), CloseFd(40)]
