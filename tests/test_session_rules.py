"""The session rules and its answers to a misbehaving front-end, over a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from vhost_user_cpufreq.backend.vhost.transport import recv_with_fds, send_with_fds
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.virtqueue import ring_sizes

from .helpers import make_service, memfd_mappings, open_fds, start_guest, until

SPEC = (Path(vu.__file__).parents[1] / "SPEC.md").read_text()

F = vu.FrontendRequest
PF = vu.ProtocolFeature
VMAP = (0, 1)


class RawFrontend:
    """A blocking front-end that sends exactly what a test says (no politeness)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.s.setblocking(False)
        self.reader = vu.MessageReader("backend")

    async def send(self, req: F, payload: object = None, fds: tuple[int, ...] = (), need_reply: bool = False) -> None:
        send_with_fds(self.s, vu.encode_message(req, payload, need_reply=need_reply), fds)  # type: ignore[arg-type]

    async def reply(self, req: F, timeout: float = 2.0) -> vu.Message:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            msg = self.reader.next_message(expect_reply_to=req)
            if isinstance(msg, vu.Message):
                return msg
            if loop.time() > end:
                raise AssertionError("no reply")
            try:
                data, _ = recv_with_fds(self.s)
            except BlockingIOError:
                await asyncio.sleep(0.002)
                continue
            if not data:
                raise ConnectionError("back-end hung up")
            self.reader.receive_data(data)

    async def hung_up(self, timeout: float = 2.0) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                if self.s.recv(4096) == b"":
                    return True
            except BlockingIOError:
                await asyncio.sleep(0.002)
            except ConnectionResetError:
                return True
        return False

    async def owner_with(self, pf: int) -> None:
        await self.send(F.GET_PROTOCOL_FEATURES)
        await self.reply(F.GET_PROTOCOL_FEATURES)
        await self.send(F.SET_PROTOCOL_FEATURES, vu.U64(pf))
        await self.send(F.SET_OWNER)

    def close(self) -> None:
        self.s.close()


@pytest.fixture
async def svc(tmp_path: Path):  # type: ignore[no-untyped-def]
    service, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    yield service, slots["vm"], str(tmp_path / "vm.sock")
    await service.close()


async def test_features_offered_include_protocol_features_and_event_idx(svc) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    fe = RawFrontend(path)
    await fe.send(F.GET_FEATURES)
    feats = (await fe.reply(F.GET_FEATURES)).payload.value  # type: ignore[union-attr]
    assert feats & (1 << 30) and feats & (1 << 29) and feats & (1 << 32)
    await fe.send(F.GET_PROTOCOL_FEATURES)
    pf = (await fe.reply(F.GET_PROTOCOL_FEATURES)).payload.value  # type: ignore[union-attr]
    # Only what is implemented: no LOG_SHMFD, no INFLIGHT_SHMFD, no HOST_NOTIFIER.
    assert not pf & (PF.LOG_SHMFD.mask | PF.INFLIGHT_SHMFD.mask | PF.HOST_NOTIFIER.mask)
    assert pf & PF.CONFIG.mask and pf & PF.BACKEND_REQ.mask and pf & PF.REPLY_ACK.mask
    fe.close()


@pytest.mark.parametrize(
    "steps, reason",
    [
        ([(F.SET_VRING_NUM, vu.VringState(0, 64))], "no-owner"),
        ([(F.SET_OWNER, None), (F.SET_OWNER, None)], "owner-already-set"),
        ([(F.SET_OWNER, None), (F.SET_FEATURES, vu.U64(1 << 40))], "unsupported-features"),
        ([(F.SET_PROTOCOL_FEATURES, vu.U64(PF.LOG_SHMFD.mask))], "unsupported-protocol-features"),
        ([(F.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)))], "feature-not-negotiated"),
        ([(F.SET_OWNER, None), (F.SET_VRING_NUM, vu.VringState(5, 64))], "bad-ring-index"),
        ([(F.SET_OWNER, None), (F.SET_VRING_NUM, vu.VringState(0, 100))], "bad-queue-size"),
        ([(F.SET_OWNER, None), (F.SET_VRING_NUM, vu.VringState(0, 4096))], "bad-queue-size"),
        ([(F.SET_OWNER, None), (F.SET_VRING_BASE, vu.VringState(0, 70000))], "bad-ring-base"),
        ([(F.SET_OWNER, None), (F.SET_VRING_KICK, vu.U64(0 | vu.VRING_NOFD_MASK))], "ring-not-configured"),
        ([(F.SET_OWNER, None), (F.SET_LOG_FD, None)], "unsupported-request"),
    ],
)
async def test_rule_violations_close_the_session_with_a_counted_reason(svc, steps, reason) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    fe = RawFrontend(path)
    for req, payload in steps:
        fds: tuple[int, ...] = ()
        if req == F.SET_LOG_FD:
            fds = (os.eventfd(0),)
        await fe.send(req, payload, fds)
        for fd in fds:
            os.close(fd)
    assert await fe.hung_up()
    assert slot.counters.get("rejected", reason) == 1, slot.counters.snapshot()
    fe.close()


async def test_with_reply_ack_a_refused_request_is_answered_and_the_session_goes_on(svc) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    fe = RawFrontend(path)
    await fe.owner_with(PF.REPLY_ACK.mask | PF.CONFIG.mask)
    await fe.send(F.SET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)), need_reply=True)
    assert (await fe.reply(F.SET_CONFIG)).payload == vu.U64(1)
    await fe.send(F.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)))
    r = await fe.reply(F.GET_CONFIG)
    assert len(r.payload.payload) == 4  # type: ignore[union-attr]
    assert slot.counters.get("rejected", "read-only-config") == 1
    fe.close()


async def test_get_config_reply_is_exactly_12_plus_requested_size(svc) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    fe = RawFrontend(path)
    await fe.owner_with(PF.CONFIG.mask)
    for off, size in ((0, 256), (4, 2), (250, 6)):
        await fe.send(F.GET_CONFIG, vu.ConfigSpace(off, size, 0, bytes(size)))
        r = await fe.reply(F.GET_CONFIG)
        assert (r.payload.offset, r.payload.size, len(r.payload.payload)) == (off, size, size)  # type: ignore[union-attr]
    await fe.send(F.GET_CONFIG, vu.ConfigSpace(250, 7, 0, bytes(7)))
    assert await fe.hung_up()
    assert slot.counters.get("rejected", "bad-config-range") == 1
    fe.close()


def _memfd(size: int) -> int:
    fd = os.memfd_create("vuc-guest-ram")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    "regions, reason",
    [
        # region larger than the file behind it
        ([vu.MemoryRegion(0, 1 << 20, 0x10000, 0)], "unmappable-region"),
        # two regions overlapping in guest-physical space
        ([vu.MemoryRegion(0, 0x8000, 0x10000, 0), vu.MemoryRegion(0x4000, 0x4000, 0x90000, 0)], "overlapping-regions"),
        # overlapping front-end addresses
        ([vu.MemoryRegion(0, 0x8000, 0x10000, 0), vu.MemoryRegion(0x10000, 0x8000, 0x14000, 0)], "overlapping-regions"),
    ],
)
async def test_bad_memory_tables_are_rejected_without_leaking(svc, regions, reason) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    before, maps = open_fds(), memfd_mappings()
    fe = RawFrontend(path)
    await fe.owner_with(0)
    fd = _memfd(0x10000)
    await fe.send(F.SET_MEM_TABLE, vu.MemoryTable(tuple(regions)), (fd,) * len(regions))
    os.close(fd)
    assert await fe.hung_up()
    fe.close()
    await until(lambda: slot.connection is None)
    assert slot.counters.get("rejected", reason) == 1, slot.counters.snapshot()
    assert open_fds() == before and memfd_mappings() == maps


async def test_ring_outside_guest_memory_is_refused_when_the_ring_starts(svc) -> None:  # type: ignore[no-untyped-def]
    _, slot, path = svc
    fe = RawFrontend(path)
    await fe.owner_with(0)
    fd = _memfd(0x10000)
    await fe.send(F.SET_MEM_TABLE, vu.MemoryTable((vu.MemoryRegion(0, 0x10000, 0x10000, 0),)), (fd,))
    os.close(fd)
    await fe.send(F.SET_FEATURES, vu.U64(1 << 32))
    await fe.send(F.SET_VRING_NUM, vu.VringState(0, 64))
    d, a, u = ring_sizes(64)
    # The used ring runs past the end of the only region.
    await fe.send(F.SET_VRING_ADDR, vu.VringAddr(0, 0, 0x10000, 0x20000 - u + 10, 0x10000 + d, 0))  # 4-aligned
    kick = os.eventfd(0)
    await fe.send(F.SET_VRING_KICK, vu.U64(0), (kick,))
    os.close(kick)
    assert await fe.hung_up()
    assert slot.counters.get("rejected", "ring-address-out-of-range") == 1
    fe.close()


async def test_polling_ring_without_kick_fd_is_served(svc) -> None:  # type: ignore[no-untyped-def]
    service, slot, path = svc
    g = await start_guest(path, util_threshold=1)
    # Restart the ring in polling mode: SET_VRING_KICK with the no-fd bit.
    base = await g.fe.stop_ring(0)
    await g.fe.request(F.SET_VRING_BASE, vu.VringState(0, base))
    await g.fe.request(F.SET_VRING_KICK, vu.U64(0 | vu.VRING_NOFD_MASK))
    g.driver.set_util(1, 333)
    g.driver.flush()  # the kick goes to an eventfd nobody reads any more
    await until(lambda: slot.counters.get("records") == 1, what="record picked up by polling")
    await g.close()


async def test_reset_device_forgets_the_driver_and_rings(svc) -> None:  # type: ignore[no-untyped-def]
    service, slot, path = svc
    g = await start_guest(path, util_threshold=1)
    g.driver.set_util(0, 100)
    g.driver.flush()
    await until(lambda: slot.counters.get("records") == 1)
    await g.transport.reset()
    assert slot.device.seq.last is None
    assert all(r.queue is None and not r.started for r in slot.connection.session.rings)  # type: ignore[union-attr]
    # The driver re-initialises on the same connection and is served again.
    await g.driver.remove()
    await g.driver.probe()
    g.driver.set_util(0, 200)
    g.driver.flush()
    await until(lambda: slot.counters.get("records") == 2)
    await g.close()


async def test_what_spec_4_2_and_5_3_promise_a_front_end(tmp_path: Path) -> None:
    """STATUS, CONFIGURE_MEM_SLOTS and config change notifications as SPEC 4.2 and 5.3 describe them."""
    from vhost_user_cpufreq.backend.vhost.memory import MAX_REGIONS

    service, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    slot = slots["vm"]
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        fe = g.fe
        r = await fe.request(F.GET_MAX_MEM_SLOTS)
        assert r is not None and r.payload.value == MAX_REGIONS == 32  # type: ignore[union-attr]
        assert "`GET_MAX_MEM_SLOTS` answers 32" in SPEC
        # STATUS: kept for the front-end; 0 resets the device while the ring runs on.
        r = await fe.request(F.GET_STATUS)
        assert r is not None and r.payload.value == 0  # type: ignore[union-attr]
        await fe.request(F.SET_STATUS, vu.U64(0x8), need_reply=True)
        r = await fe.request(F.GET_STATUS)
        assert r is not None and r.payload.value == 0x8  # type: ignore[union-attr]
        g.driver.set_util(0, 100)
        g.driver.flush()
        await until(lambda: slot.counters.get("records") == 1)
        assert slot.device.seq.last is not None
        await fe.request(F.SET_STATUS, vu.U64(0), need_reply=True)
        assert slot.device.seq.last is None and policy.resets["vm"] >= 1
        r = await fe.request(F.GET_STATUS)
        assert r is not None and r.payload.value == 0  # type: ignore[union-attr]
        g.driver.set_util(1, 200)
        g.driver.flush()
        await until(lambda: slot.counters.get("records") == 2, what="the ring served after SET_STATUS 0")
        # SET_CONFIG is refused with an ack of 1 (REPLY_ACK), and the session goes on.
        r = await fe.request(F.SET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)), need_reply=True)
        assert r is not None and r.payload.value == 1  # type: ignore[union-attr]
        assert slot.counters.get("rejected", "read-only-config") == 1 and slot.connection is not None
        # A notification: request 2, flags 0x1 (version 1, no NEED_REPLY), no payload, no fd.
        fe.backend_messages.clear()
        source.set_frequencies([1098000, 2253000, 1426000])
        await until(lambda: fe.backend_messages, what="CONFIG_CHANGE_MSG")
        (msg,) = fe.backend_messages
        assert msg.request == vu.BackendRequest.CONFIG_CHANGE_MSG == 2
        assert (msg.flags, msg.payload, tuple(msg.fds)) == (0x1, None, ())
        assert "`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (2), flags 0x1" in SPEC
    finally:
        await g.close()
        await service.close()
