"""End to end through QEMU 11.1: the shared frequency page (SPEC §8) in BAR 4, and config space as
the fallback.  What QEMU does with SHMEM is in docs/qemu-facts.md section e."""

from __future__ import annotations

import pytest

from vhost_user_cpufreq.guest.qtest import CAP_SHARED_MEMORY
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu

from .helpers import until
from .qemu.fixture import QemuLab
from .test_qemu_e2e import names, record_sessions, squeeze

pytestmark = pytest.mark.qemu

F = vu.FrontendRequest
VMAP = (0, 0, 1, 2)  # PIXEL6: two vCPUs on the little cluster, one each on the other two


async def page_khz(driver, dom: int) -> int | None:  # type: ignore[no-untyped-def]
    page = await driver.page_frequencies()
    return None if page is None else page[dom].cur_khz


async def test_a_host_change_reaches_bar4_with_no_config_access_after_probe(qemu_lab: QemuLab) -> None:
    lab = qemu_lab
    sessions = record_sessions(lab)
    slot = await lab.add_vm("vm", VMAP, shared_page=True)
    g = await lab.start_guest("vm")
    t, d = g.transport, g.driver
    # The device has one shared memory region, id 0, 4 KiB, in BAR 4; the driver took the page.
    assert t.pci is not None
    (cap,) = [c for c in t.pci.caps if c.cfg_type == CAP_SHARED_MEMORY]
    assert (cap.bar, cap.id, cap.offset, cap.length) == (4, abi.FREQ_PAGE_SHMID, 0, abi.FREQ_PAGE_SIZE)
    assert t.shm_length(0) == abi.FREQ_PAGE_SIZE and d.freq_page
    # realize asked for the regions; SHMEM was negotiated instead of CONFIGURE_MEM_SLOTS
    realize = names(sessions[0])
    assert "GET_SHMEM_CONFIG" in realize and "GET_MAX_MEM_SLOTS" not in realize
    conn = await lab.service.wait_connected("vm")
    assert conn.session.machine.has(vu.ProtocolFeature.SHMEM)
    # The back-end maps the page once the device runs; the ack puts it in use.
    await until(lambda: slot.device.freq_path == "page", what="the page in use")
    assert slot.counters.get("shmem_mapped") == 1 and slot.counters.get("shmem_fallback") == 0
    page = await d.page_frequencies()
    assert page is not None and [p.cur_khz for p in page] == [x.cur_khz for x in slot.device.config.domains]
    assert page[2].freq_scale == abi.freq_scale(slot.device.config.domains[2].cur_khz,
                                                slot.device.config.domains[2].max_khz)
    # QEMU added the page to vhost's memory table (SET_MEM_TABLE: CONFIGURE_MEM_SLOTS is not offered).
    assert "SET_MEM_TABLE" in names(sessions[0]) and "ADD_MEM_REG" not in names(sessions[0])
    reads, msgs = slot.counters.get("config_reads"), len(sessions[0])
    notes, isr_changes = slot.counters.get("config_notifications"), t.config_changes
    # The host moves: a value changes in BAR 4 with no message, no config read, no notification.
    lab.source.set_frequencies([738000, 1999000, 2802000])
    assert await page_khz(d, 0) == 738000 and await page_khz(d, 1) == 1999000 and await page_khz(d, 2) == 2802000
    assert await d.current_khz(3) == 2802000
    lab.source.set_frequencies([1401000, 553000, 500000])
    assert [p.cur_khz for p in await d.page_frequencies() or ()] == [1401000, 553000, 500000]
    assert slot.counters.get("freq_page_updates") == 6
    assert slot.counters.get("config_reads") == reads and t.config_reads == 65
    assert slot.counters.get("config_notifications") == notes and t.config_changes == isr_changes
    assert len(sessions[0]) == msgs  # not one vhost-user message for either change
    assert slot.counters.get("config_notify_skipped", "freq-page") == 2
    # config space stayed current for a driver that reads it anyway
    assert [x.cur_khz for x in (await d.refresh_config()).domains] == [1401000, 553000, 500000]
    assert d.stats.page_fallbacks == 0


async def test_driver_reset_drops_the_page_and_the_next_start_maps_it_again(qemu_lab: QemuLab) -> None:
    lab = qemu_lab
    slot = await lab.add_vm("vm", VMAP, shared_page=True)
    g = await lab.start_guest("vm")
    await until(lambda: slot.device.freq_path == "page", what="the page in use")
    await g.driver.remove()
    await g.transport.reset()  # status <- 0: QEMU stops the rings and drops the mapping itself
    await until(lambda: slot.device.freq_path == "config", what="the page dropped")
    assert slot.counters.get("shmem_dropped") == 1
    assert await g.driver.page_frequencies() is None  # BAR 4 reads zeros again: the driver falls back
    # A change while the device is stopped is not notified (QEMU 11.1.3 would crash), only owed.
    notes = slot.counters.get("config_notifications")
    lab.source.set_frequencies([738000, 1999000, 2802000])
    assert slot.counters.get("config_notify_skipped", "device-stopped") == 1
    # Re-probe on the same QEMU: this restart is what kills QEMU 11.1.3 with CONFIGURE_MEM_SLOTS.
    g2 = await lab.probe(g.vm)
    await until(lambda: slot.device.freq_path == "page", what="the page mapped again")
    assert slot.counters.get("shmem_mapped") == 2
    assert [p.cur_khz for p in await g2.driver.page_frequencies() or ()] == [738000, 1999000, 2802000]
    assert slot.counters.get("config_notifications") == notes + 1  # the owed one, once the ring ran
    assert g.vm.returncode is None


async def test_a_change_before_the_driver_starts_the_device_is_held_not_sent(qemu_lab: QemuLab) -> None:
    """QEMU 11.1.3 dies (SIGSEGV) on CONFIG_CHANGE_MSG before DRIVER_OK; the back-end holds it back."""
    lab = qemu_lab
    slot = await lab.add_vm("vm", VMAP)
    vm = await lab.start_qemu("vm")
    await lab.service.wait_connected("vm")
    lab.source.set_frequencies([738000, 1999000, 2802000])
    assert slot.counters.get("config_notify_skipped", "device-stopped") == 1
    g = await lab.probe(vm)
    assert g.driver.cur_khz(0) == 738000  # the probe's read has it
    await until(lambda: slot.counters.get("config_notifications") == 1, what="the owed notification")
    assert vm.returncode is None


@pytest.mark.parametrize("how", ["not-offered", "driver-refuses"])
async def test_without_the_page_config_space_carries_the_frequency(qemu_lab: QemuLab, how: str) -> None:
    lab = qemu_lab
    sessions = record_sessions(lab)
    slot = await lab.add_vm("vm", VMAP, shared_page=how != "not-offered")
    g = await lab.start_guest("vm", freq_page=how != "driver-refuses")
    t, d = g.transport, g.driver
    assert not d.freq_page and slot.device.freq_path == "config"
    if how == "not-offered":
        assert t.shm_length(0) is None  # no BAR 4 region at all
        # nothing asked about regions, and memory slots stay negotiated
        assert "GET_SHMEM_CONFIG" not in names(sessions[0]) and "ADD_MEM_REG*3" in squeeze(names(sessions[0]))
    else:
        assert t.shm_length(0) == abi.FREQ_PAGE_SIZE  # the region exists, but nobody asked for it
        assert slot.counters.get("shmem_maps_sent") == 0
    assert await d.page_frequencies() is None
    d.config_changed.clear()
    lab.source.set_frequencies([738000, 1999000, 2802000])
    await until(d.config_changed.is_set, what="the driver's config refresh after the notification")
    assert d.cur_khz(0) == 738000 and await d.current_khz(3) == 2802000
    assert slot.counters.get("config_notifications") >= 1 and slot.counters.get("freq_page_updates") == 0
