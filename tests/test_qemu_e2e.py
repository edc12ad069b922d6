"""End to end: the back-end serving a real QEMU, the guest driver model driving
virtio-pci through qtest (guest-driver-model/qtest.py, tests/qemu/fixture.py).

Each test starts its own QEMU(s) (about 0.1-0.3 s each) against a Service in
the test's event loop.  What QEMU 11.1.3 does here is recorded in
docs/qemu-facts.md.
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from vhost_user_cpufreq.backend.service.vms import VmSlot
from vhost_user_cpufreq.guest.driver import VIRTIO_F_VERSION_1, CpufreqDriver
from vhost_user_cpufreq.guest.qtest import ISR_CONFIG
from vhost_user_cpufreq.guest.qtest_client import QtestError
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

from .helpers import open_fds, until
from .qemu.fixture import QemuLab

pytestmark = pytest.mark.qemu

F = vu.FrontendRequest
VMAP = (0, 0, 1, 2)
PROTOCOL_FEATURES = 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES


def record_sessions(lab: QemuLab) -> list[list[vu.Message]]:
    """Every message each new back-end session handles, one list per session."""
    sessions: list[list[vu.Message]] = []

    def hook(slot: VmSlot, conn: object) -> None:
        got: list[vu.Message] = []
        sessions.append(got)
        session = conn.session  # type: ignore[attr-defined]
        handle = session.handle

        def recording(msg: vu.Message):  # type: ignore[no-untyped-def]
            got.append(msg)
            return handle(msg)

        session.handle = recording

    lab.service.session_hooks.append(hook)
    return sessions


def names(msgs: list[vu.Message]) -> list[str]:
    return [F(m.request).name for m in msgs]


def squeeze(seq: list[str]) -> list[str]:
    """Runs of one name folded into ``NAME*count``."""
    out: list[str] = []
    for s in seq:
        if out and re.sub(r"\*\d+$", "", out[-1]) == s:
            base, _, n = out[-1].partition("*")
            out[-1] = f"{base}*{int(n or 1) + 1}"
        else:
            out.append(s)
    return out


def eventfds() -> int:
    n = 0
    for fd in open_fds():
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                n += 1
        except OSError:
            pass
    return n


def mappings_of(path_part: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if path_part in line)


async def test_handshake_and_start_follow_qemus_sequence(qemu_lab: QemuLab) -> None:
    lab = qemu_lab
    sessions = record_sessions(lab)
    slot = await lab.add_vm("vm", VMAP)
    vm = await lab.start_qemu("vm")
    conn = await lab.service.wait_connected("vm")
    # Realize: the whole handshake is over before QEMU answers QMP.
    assert names(sessions[0]) == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS",
        "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES", "SET_VRING_CALL", "SET_VRING_ERR",
    ]
    assert sessions[0][2].payload == vu.U64(conn.session.protocol_features)  # type: ignore[union-attr]
    handshake = len(sessions[0])

    g = await lab.probe(vm)
    t = g.transport
    assert t.pci is not None and (t.pci.vendor, t.pci.device) == (0x1AF4, 0x1040 + abi.DEFAULT_DEVICE_ID)
    # The guest sees what the device offers, minus vhost-user's PROTOCOL_FEATURES.
    offered = slot.device.features()
    assert t.offered_features == offered
    want = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC \
        | 1 << abi.F_PERF_REQUEST
    assert g.driver.features == want
    await until(lambda: conn.session.rings[0].queue is not None, what="ring 0 running")
    start = sessions[0][handshake:]
    # The probe reads the config (generation, body, generation: 1 + 63 + 1 32-bit
    # accesses, each a full GET_CONFIG), then DRIVER_OK starts the device.
    assert squeeze(names(start)) == [
        "GET_CONFIG*65", "SET_FEATURES", "GET_STATUS", "SET_STATUS", "ADD_MEM_REG*3",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL",
        "SET_VRING_ENABLE", "SET_VRING_CALL",
    ]
    assert t.config_reads == 65 and slot.counters.get("config_reads") == 65
    assert all(m.payload.offset == 0 and m.payload.size == abi.CONFIG_SIZE  # type: ignore[union-attr]
               for m in start if m.request == F.GET_CONFIG)
    by_name = {F(m.request).name: m for m in start}
    assert by_name["SET_FEATURES"].payload == vu.U64(want | PROTOCOL_FEATURES)
    assert conn.session.acked_features == want | PROTOCOL_FEATURES
    assert conn.session.acked_features & 1 << VIRTIO_RING_F_EVENT_IDX
    assert by_name["SET_STATUS"].payload == vu.U64(0x8)  # FEATURES_OK; DRIVER_OK is never forwarded
    assert by_name["SET_VRING_NUM"].payload == vu.VringState(0, g.driver.queue_size)
    regions = [(m.payload.region.guest_phys_addr, m.payload.region.memory_size)  # type: ignore[union-attr]
               for m in start if m.request == F.ADD_MEM_REG]
    assert regions == [(0, 0xC0000), (0xE0000, 0x10000), (0x100000, (256 << 20) - 0x100000)]
    ring = conn.session.rings[0]
    assert ring.started and ring.enabled and ring.num == g.driver.queue_size
    # The guest RAM mapped here is QEMU's: what qtest writes at a guest-physical
    # address appears at that offset, and the other way round.
    gpa = vm.ram.alloc(64)  # type: ignore[union-attr]
    await vm.qtest.memwrite(gpa, b"written through qtest")  # type: ignore[union-attr]
    assert bytes(vm.ram.memory.view(gpa, 21)) == b"written through qtest"  # type: ignore[union-attr]
    vm.ram.memory.view(gpa + 32, 8)[:] = b"and back"  # type: ignore[union-attr]
    assert await vm.qtest.memread(gpa + 32, 8) == b"and back"  # type: ignore[union-attr]
    assert g.driver.config is not None and g.driver.config.vcpu_domain == VMAP
    assert g.driver.config.domains[2].max_khz == 2802000


@pytest.mark.parametrize("ram", ["file", "memfd"])
async def test_records_arrive_at_the_policy_exactly_and_in_order(qemu_lab: QemuLab, ram: str) -> None:
    lab = qemu_lab
    slot = await lab.add_vm("vm", VMAP)
    g = await lab.start_guest("vm", qemu={"ram": ram}, util_threshold=1)
    d = g.driver

    def util(step: int, v: int) -> int:
        return (step * 37 + v * 101) % 1025

    for step in range(120):
        for v in range(4):
            d.set_util(v, util(step, v), perf_khz=1000 * step if v == 3 else 0)
        d.flush()
        if step % 8 == 7:  # let the device catch up now and then, so the ring never fills
            await until(lambda: slot.counters.get("records") == d.stats.records, what="device to catch up")
    await until(lambda: slot.counters.get("records") == d.stats.records, what="all records")
    got = lab.policy.records["vm"]
    assert len(got) == d.stats.records and d.stats.queue_full == 0
    for v in range(4):
        expect: list[int] = []
        for step in range(120):
            if not expect or expect[-1] != util(step, v):
                expect.append(util(step, v))
        assert [r.util for r in got if r.vcpu == v] == expect
    assert [r.perf_khz for r in got if r.vcpu == 3] == [1000 * s for s in range(120)]
    assert slot.counters.total("rejected") == 0
    assert slot.device.seq.lost == 0 and slot.device.seq.stale == 0
    # EVENT_IDX: the device asked for far fewer kicks than there were batches,
    # and every kick the driver sent reached the back-end's kick eventfd.
    assert 1 <= d.stats.kicks < d.stats.batches
    assert g.transport.notifications == d.stats.kicks
    await until(lambda: slot.counters.get("kicks") >= d.stats.kicks, what="kicks to arrive")
    g.vm.qtest.check()  # type: ignore[union-attr]


@pytest.mark.parametrize("interrupts", ["intx", "poll"])
async def test_host_frequency_change_reaches_the_guest_through_the_config_bar(
        qemu_lab: QemuLab, interrupts: str) -> None:
    lab = qemu_lab
    slot = await lab.add_vm("vm", VMAP)
    g = await lab.start_guest("vm", qemu={"interrupts": interrupts})
    t, d = g.transport, g.driver
    await lab.service.wait_connected("vm")
    gen_before = await t.config_generation()
    reads_before = t.config_reads
    changes = t.config_changes
    d.config_changed.clear()
    lab.source.set_frequencies([1098000, 2253000, 1426000])
    await t.wait_config_change(5.0, since=changes)
    await asyncio.wait_for(d.config_changed.wait(), 5.0)
    assert slot.counters.get("config_notifications") == 1  # this VM has had one session
    assert t.config_changes == changes + 1
    assert t.isr_log[-1] & ISR_CONFIG
    assert await t.config_generation() == (gen_before + 1) & 0xFF
    assert [d.cur_khz(v) for v in range(4)] == [1098000, 1098000, 2253000, 1426000]
    assert d.config is not None and d.config.generation == 2
    # One refresh: generation, body, generation again, in 32-bit accesses.
    assert t.config_reads - reads_before == 65
    # No change, no notification: the guest reads nothing more.
    lab.source.set_frequencies([1098000, 2253000, 1426000])
    await asyncio.sleep(0.1)
    assert t.config_changes == changes + 1 and t.config_reads - reads_before == 65
    assert slot.counters.get("config_reads") == t.config_reads


async def test_driver_reset_and_reinitialisation(qemu_lab: QemuLab) -> None:
    lab = qemu_lab
    sessions = record_sessions(lab)
    slot = await lab.add_vm("vm", VMAP)
    g = await lab.start_guest("vm", util_threshold=1)
    conn = await lab.service.wait_connected("vm")
    g.driver.set_util(0, 100)
    g.driver.flush()
    await until(lambda: slot.counters.get("records") == 1)
    before = len(sessions[0])

    await g.driver.remove()
    await g.transport.reset()
    await until(lambda: not conn.session.rings[0].started, what="QEMU to stop the ring")
    assert names(sessions[0][before:]) == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert sessions[0][before].payload == vu.VringState(0, 0)
    assert conn.session.rings[0].queue is None

    # A new driver instance probes the same device: same connection, rings restarted.
    d2 = CpufreqDriver(g.transport, util_threshold=1, first_seq=1000, lazy_records=0)
    await d2.probe()
    await until(lambda: conn.session.rings[0].queue is not None, what="ring restarted")
    assert lab.service.vms["vm"].connection is conn and slot.sessions_served == 1
    restart = squeeze(names(sessions[0][before + 2:]))
    assert restart[0] == "GET_CONFIG*65" and "SET_VRING_KICK" in restart
    for u in (200, 300):
        d2.set_util(1, u)
        d2.flush()
    await until(lambda: slot.counters.get("records") == 3, what="records after re-initialisation")
    assert [(r.vcpu, r.util) for r in lab.policy.records["vm"]] == [(0, 100), (1, 200), (1, 300)]
    # The new driver's first batch carried RESYNC, so its new sequence was accepted.
    assert slot.device.seq.last == 1001 and slot.device.seq.stale == 0
    await d2.remove()


@pytest.mark.parametrize("end", ["quit", "sigkill"])
async def test_qemu_going_away_leaves_the_backend_clean_and_ready(qemu_lab: QemuLab, end: str) -> None:
    lab = qemu_lab
    slot = await lab.add_vm("vm", VMAP)
    fds_before, eventfds_before = open_fds(), eventfds()
    g = await lab.start_guest("vm", util_threshold=1)
    ram_file = str(g.vm.workdir / "guest-ram")
    g.driver.set_util(2, 700)
    g.driver.flush()
    await until(lambda: slot.counters.get("records") == 1)
    # Ours plus the back-end's three regions.
    assert mappings_of(ram_file) == 4
    assert eventfds() > eventfds_before  # kick, call, err

    await g.driver.remove()
    rc = await (g.vm.quit() if end == "quit" else g.vm.kill())
    assert rc == (0 if end == "quit" else -9)
    await until(lambda: slot.connection is None, what="session to end")
    assert mappings_of(ram_file) == 1  # only ours: the back-end unmapped guest RAM
    assert eventfds() == eventfds_before
    assert lab.policy.resets["vm"] == 1  # the VM's requests died with it
    await g.vm.close()
    assert mappings_of(ram_file) == 0
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds_before}
    assert leaked == {}

    # The back-end serves the next QEMU on the same socket.
    g2 = await lab.start_guest("vm", util_threshold=1)
    g2.driver.set_util(2, 800)
    g2.driver.flush()
    await until(lambda: slot.counters.get("records") == 2, what="records from the second QEMU")
    assert lab.policy.records["vm"][-1].util == 800
    assert slot.sessions_served == 2


async def test_two_qemus_served_by_one_backend_at_once(qemu_lab: QemuLab) -> None:
    lab = qemu_lab
    a = await lab.add_vm("a", VMAP)
    b = await lab.add_vm("b", (2, 2))
    ga, gb = await asyncio.gather(lab.start_guest("a", util_threshold=1), lab.start_guest("b", util_threshold=1))
    for i in range(40):
        ga.driver.set_util(i % 4, i)
        gb.driver.set_util(i % 2, 1000 - i)
        ga.driver.flush()
        gb.driver.flush()
    await until(lambda: a.counters.get("records") == ga.driver.stats.records
                and b.counters.get("records") == gb.driver.stats.records, what="both VMs' records")
    assert [r.util for r in lab.policy.records["a"]] == list(range(40))
    assert [r.util for r in lab.policy.records["b"]] == [1000 - i for i in range(40)]
    assert gb.driver.config is not None and gb.driver.config.vcpu_domain == (0, 0)
    assert gb.driver.cur_khz(0) == 500000
    # A big-cluster change concerns both VMs; each guest hears of it.
    ca, cb = ga.transport.config_changes, gb.transport.config_changes
    lab.source.set_frequencies([300000, 400000, 2802000])
    await asyncio.gather(ga.transport.wait_config_change(5, since=ca), gb.transport.wait_config_change(5, since=cb))
    await until(lambda: ga.driver.cur_khz(3) == 2802000 and gb.driver.cur_khz(1) == 2802000,
                what="both guests to refresh")


@pytest.mark.parametrize("rings", ["started", "not-started"])
async def test_backend_going_away_aborts_qemu(qemu_lab: QemuLab, rings: str) -> None:
    """QEMU 11.1.3 cannot lose its vhost-user-test-device back-end (docs/qemu-facts.md).

    This pins down what happens, so a QEMU that behaves better shows up here.
    """
    lab = qemu_lab
    await lab.add_vm("vm", VMAP)
    vm = await lab.start_qemu("vm")
    t = await vm.open_transport()
    if rings == "started":
        d = CpufreqDriver(t)
        await d.probe()
        await d.remove()
    await lab.service.wait_connected("vm")
    await lab.service.remove_vm("vm")  # closes the connection: QEMU sees EOF
    if rings == "not-started":
        rc = await vm.wait(10)
        assert rc == -6, vm.output()  # SIGABRT at EOF
        assert "memory_region_del_eventfd" in vm.output()
        return
    # Rings running: QEMU survives the EOF ...
    await asyncio.sleep(0.2)
    assert vm.returncode is None
    assert (await vm.qmp.execute("query-status"))["status"] == "running"  # type: ignore[index, union-attr]
    assert "ring restore failed" in vm.output()
    # ... until the guest touches the device config.
    with pytest.raises(QtestError):
        await t.read_config(0, 4)
    assert await vm.wait(10) == -6
    assert "vhost_dev_get_config" in vm.output()
