"""The shared frequency page over real sockets and memfds, with the Python front-end in QEMU's role
(guest-driver-model/frontend.py), including front-ends that refuse, garble or never set up the maps."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu

from .helpers import make_service, open_fds, start_guest, until

VMAP = (0, 0, 1, 2)
NEW = [1098000, 2253000, 1426000]


async def test_the_page_carries_host_changes_without_notification_or_config_read(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("vm", VMAP), shared_page=True)
    slot = slots["vm"]
    g = await start_guest(str(tmp_path / "vm.sock"))
    assert g.fe.protocol_features & vu.ProtocolFeature.SHMEM.mask
    assert not g.fe.protocol_features & vu.ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    assert g.driver.freq_page
    await until(lambda: slot.device.freq_path == "page", what="the page in use")
    reads, notes = g.transport.config_reads, g.fe.config_change_msgs
    source.set_frequencies(NEW)
    page = await g.driver.page_frequencies()
    assert page is not None and [p.cur_khz for p in page] == NEW
    assert [p.perf for p in page] == [abi.PageDomain.of(d).perf for d in slot.device.config.domains]
    assert await g.driver.current_khz(3) == 1426000
    assert g.transport.config_reads == reads and g.fe.config_change_msgs == notes
    assert slot.counters.get("freq_page_updates") == 3 and slot.counters.get("config_notify_skipped", "freq-page") == 1
    # An unchanged sample writes nothing; a one-domain change writes one entry (its count: 2 updates, 4).
    source.set_frequencies(NEW)
    source.set_frequencies([NEW[0], NEW[1], 2802000])
    assert slot.counters.get("freq_page_updates") == 4
    assert struct.unpack_from("<I", g.fe.shm[0], abi.page_domain_offset(2))[0] == 4
    # Topology still uses config space and its notification.
    slot.device.remap((0, 1, 1, 2))
    await until(lambda: g.fe.config_change_msgs == notes + 1, what="the topology notification")
    await g.close()
    await svc.close()


async def test_disconnect_leaves_the_page_readable_but_not_live(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("vm", VMAP), shared_page=True)
    slot = slots["vm"]
    before = open_fds()
    g = await start_guest(str(tmp_path / "vm.sock"))
    await until(lambda: slot.device.freq_path == "page", what="the page in use")
    assert slot.connection is not None
    slot.connection.close("test")
    await until(lambda: slot.connection is None, what="the session closed")
    # The front-end still maps the page (QEMU does after a disconnect): it says it is stale.
    h = abi.decode_page_header(bytes(g.fe.shm[0][:16]))
    assert not h.live and h.num_domains == 3
    assert await g.driver.page_frequencies() is None and g.driver.stats.page_fallbacks == 1
    assert slot.device.freq_path == "config"
    await g.close()
    # the back-end kept no fd of the session (the memfd included)
    await until(lambda: open_fds() <= before, what=lambda: {
        fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")})
    await svc.close()


async def test_front_ends_that_cannot_take_the_page_get_config_space(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("refuse", VMAP), ("garbage", VMAP), ("nochan", VMAP),
                                               ("old", VMAP), ("good", VMAP), shared_page=True)
    guests = {name: await start_guest(str(tmp_path / f"{name}.sock"), shmem=mode)
              for name, mode in (("refuse", "refuse"), ("garbage", "garbage"), ("nochan", "no-channel"),
                                 ("old", "off"), ("good", "map"))}
    await until(lambda: slots["good"].device.freq_path == "page", what="the good VM's page")
    await until(lambda: slots["refuse"].counters.get("shmem_fallback", "map-refused") == 1, what="the refusal")
    await until(lambda: slots["garbage"].counters.get("shmem_fallback", "bad-ack") == 1, what="the garbage")
    assert slots["garbage"].counters.get("rejected", "bad-ack") == 1
    # A front-end without SHMEM, or without a channel for the maps, is not even offered the page.
    assert not guests["old"].driver.freq_page and not guests["nochan"].driver.freq_page
    assert slots["old"].counters.get("shmem_maps_sent") == slots["nochan"].counters.get("shmem_maps_sent") == 0
    before = {name: g.fe.config_change_msgs for name, g in guests.items()}
    source.set_frequencies(NEW)
    for name in ("refuse", "garbage", "old"):  # config space and its notification, as before the page
        g = guests[name]
        await until(lambda g=g: g.driver.cur_khz(3) == 1426000, what=f"{name}: the config refresh")
        assert await g.driver.current_khz(3) == 1426000 and slots[name].device.freq_path == "config"
    # (no channel: no notification can reach it, as before; the driver reads config when it likes)
    assert slots["nochan"].counters.get("config_notify_skipped", "no-backend-channel") >= 1
    # The VM whose front-end behaves is not affected by its neighbours.
    assert guests["good"].fe.config_change_msgs == before["good"]
    assert [p.cur_khz for p in await guests["good"].driver.page_frequencies() or ()] == NEW
    assert all(s.connection is not None for s in slots.values())  # nobody lost its session
    for g in guests.values():
        await g.close()
    await svc.close()


async def test_shmem_out_of_order_is_a_counted_rejection_of_that_session_only(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("bad", VMAP), ("ok", VMAP), shared_page=True)
    ok = await start_guest(str(tmp_path / "ok.sock"))
    from vhost_user_cpufreq.guest.frontend import VhostUserFrontend
    fe = VhostUserFrontend(shmem="map")
    await fe.connect(str(tmp_path / "bad.sock"))
    await fe.request(vu.FrontendRequest.SET_OWNER)
    try:  # GET_SHMEM_CONFIG without SHMEM negotiated
        await fe.request(vu.FrontendRequest.GET_SHMEM_CONFIG)
    except ConnectionError:
        pass
    await until(lambda: slots["bad"].connection is None, what="the bad session closed")
    assert slots["bad"].counters.get("rejected", "feature-not-negotiated") == 1
    assert slots["bad"].history == ["feature-not-negotiated"]
    source.set_frequencies(NEW)
    assert [p.cur_khz for p in await ok.driver.page_frequencies() or ()] == NEW
    await fe.close()
    fe.ram.close()
    await ok.close()
    await svc.close()
