"""Session behaviour over real unix sockets, memfd memory and eventfds, with the Python front-end."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path


from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu

from .helpers import memfd_mappings, make_service, open_fds, start_guest, until

F = vu.FrontendRequest
VMAP = (0, 0, 1, 2)


async def test_handshake_start_and_records_arrive_exactly_once_in_order(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    for step in range(200):
        for v in range(4):
            u = (step * 37 + v * 101) % 1025
            g.driver.set_util(v, u)
        g.driver.flush()
        if step % 10 == 0:
            await asyncio.sleep(0)
    await until(lambda: slots["vm"].counters.get("records") == g.driver.stats.records, what="all records")
    got = policy.records["vm"]
    assert len(got) == g.driver.stats.records
    # Per vCPU, the backend saw exactly the guest's sequence of values, in order.
    for v in range(4):
        expect = []
        for step in range(200):
            u = (step * 37 + v * 101) % 1025
            if not expect or expect[-1] != u:
                expect.append(u)
        assert [r.util for r in got if r.vcpu == v] == expect
    assert slots["vm"].counters.total("rejected") == 0
    assert slots["vm"].device.seq.lost == 0 and slots["vm"].device.seq.stale == 0
    await g.close()
    await svc.close()


async def test_config_read_describes_the_vcpu_domains(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"))
    cfg = g.driver.config
    assert cfg is not None
    assert cfg.vcpu_domain == (0, 0, 1, 2)
    assert [d.max_khz for d in cfg.domains] == [1803000, 2253000, 2802000]
    assert [d.capacity for d in cfg.domains] == [160, 498, 1024]
    # The driver read config at probe only: three GET_CONFIGs (generation, body, generation).
    assert g.transport.config_reads == 3
    await g.close()
    await svc.close()


async def test_host_frequency_change_reaches_the_guest_through_config_change_msg(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"))
    before = g.fe.config_change_msgs
    source.set_frequencies([1098000, 2253000, 1426000])
    await until(lambda: g.driver.cur_khz(3) == 1426000, what="guest sees new big-cluster frequency")
    assert g.fe.config_change_msgs == before + 1
    assert [g.driver.cur_khz(v) for v in range(4)] == [1098000, 1098000, 2253000, 1426000]
    assert g.driver.config is not None and g.driver.config.generation == 2
    await g.close()
    await svc.close()


async def test_a_storm_of_changes_yields_a_bounded_number_of_notifications(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"))
    # A change made before the device's ring runs is owed, not sent (session.py, QEMU 11.1.3): the
    # storm starts once the ring runs, or a slow start folds it all into the one owed notification.
    await until(lambda: slots["vm"].connection is not None
                and any(r.queue is not None for r in slots["vm"].connection.session.rings), what="the ring running")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(500):
        source.set_frequencies([300000 + i * 1000, 400000, 500000])
    storm = loop.time() - t0
    await until(lambda: g.driver.cur_khz(0) == 300000 + 499 * 1000, what="the last value")
    await asyncio.sleep(0.05)
    # At most one per 10 ms interval while the storm lasts, plus the trailing one
    # that carries the last value: 2 when the storm fits in one interval.
    assert 2 <= g.fe.config_change_msgs <= 2 + int(storm / 0.01)
    assert slots["vm"].counters.get("config_updates") == 499  # the first "change" repeats the current value
    await g.close()
    await svc.close()


async def test_ring_stop_and_restart_resumes_at_the_returned_base(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    for u in (10, 20, 30):
        g.driver.set_util(0, u)
        g.driver.flush()
    await until(lambda: slots["vm"].counters.get("records") == 3)
    base = await g.fe.stop_ring(0)
    assert base == 3
    # A stopped ring is how QEMU shows a driver reset: the VM's boosts are dropped.
    assert policy.resets["vm"] == 1 and policy.latest.get("vm") is None
    # While stopped, buffers pile up unprocessed.
    g.driver.set_util(0, 40)
    g.driver.flush()
    await asyncio.sleep(0.02)
    assert slots["vm"].counters.get("records") == 3
    await g.fe.start_ring(0, g.driver.queue_size, base=base)
    await until(lambda: slots["vm"].counters.get("records") == 4, what="the held record after restart")
    assert [r.util for r in policy.records["vm"]] == [10, 20, 30, 40]
    await g.close()
    await svc.close()


async def test_disconnect_releases_everything_and_the_vm_can_reconnect(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    fds_before, maps_before = open_fds(), memfd_mappings()
    g = await start_guest(str(tmp_path / "vm.sock"))
    g.driver.set_util(1, 500)
    g.driver.flush()
    await until(lambda: slots["vm"].counters.get("records") == 1)
    assert memfd_mappings() > maps_before
    await g.close()
    await until(lambda: slots["vm"].connection is None, what="session to end")
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds_before}
    assert leaked == {}
    assert memfd_mappings() == maps_before
    assert policy.resets["vm"] == 1  # the VM's requests died with it
    g2 = await start_guest(str(tmp_path / "vm.sock"))
    g2.driver.set_util(1, 600)
    g2.driver.flush()
    await until(lambda: slots["vm"].counters.get("records") == 2, what="records after reconnect")
    assert policy.records["vm"][-1].util == 600
    assert slots["vm"].sessions_served == 2
    await g2.close()
    await svc.close()


async def test_two_vms_are_served_at_once(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("a", VMAP), ("b", (2, 2)))
    ga = await start_guest(str(tmp_path / "a.sock"), util_threshold=1)
    gb = await start_guest(str(tmp_path / "b.sock"), util_threshold=1)
    for i in range(50):
        ga.driver.set_util(i % 4, i)
        gb.driver.set_util(i % 2, 1000 - i)
        ga.driver.flush()
        gb.driver.flush()
    await until(lambda: slots["a"].counters.get("records") == ga.driver.stats.records
                and slots["b"].counters.get("records") == gb.driver.stats.records)
    assert {r.util for r in policy.records["a"]} == set(range(50))
    assert {r.util for r in policy.records["b"]} == {1000 - i for i in range(50)}
    assert gb.driver.config is not None and gb.driver.config.vcpu_domain == (0, 0)
    assert gb.driver.cur_khz(0) == 500000  # b's only domain is the big cluster
    await ga.close()
    await gb.close()
    await svc.close()


async def test_a_malformed_message_closes_only_that_session(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("bad", VMAP), ("good", VMAP))
    good = await start_guest(str(tmp_path / "good.sock"), util_threshold=1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "bad.sock"))
    # SET_VRING_NUM with a 3-byte payload: a malformed message.
    s.sendall(struct.pack("<III", F.SET_VRING_NUM, 1, 3) + b"abc")
    await until(lambda: slots["bad"].counters.get("sessions_closed", "bad-payload-size") == 1
                or slots["bad"].counters.total("sessions_closed") == 1, what="bad session closed")
    assert s.recv(1) == b""  # the back-end hung up
    s.close()
    good.driver.set_util(0, 777)
    good.driver.flush()
    await until(lambda: slots["good"].counters.get("records") == 1)
    assert policy.records["good"][-1].util == 777
    await good.close()
    await svc.close()


async def test_a_second_front_end_for_the_same_vm_is_refused(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "vm.sock"))
    await until(lambda: slots["vm"].counters.get("connections_refused", "already-connected") == 1)
    s.settimeout(2)
    assert s.recv(1) == b""
    s.close()
    await g.close()
    await svc.close()


async def test_bad_records_are_dropped_counted_and_the_buffer_still_completed(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"))
    q, mem = g.driver.queue, g.transport.ram.memory
    raw = abi.encode_batch(abi.Batch(1, 0, (abi.Record(0, 100), abi.Record(42, 5), abi.Record(1, 4000)),
                                     abi.BATCH_F_RESYNC))
    gpa = g.transport.ram.alloc(len(raw))
    mem.view(gpa, len(raw))[:] = raw
    q.add([(gpa, len(raw))])
    q.add([(gpa, 7)])  # a truncated batch in a second buffer
    q.publish()
    g.transport.notify(0)
    c = slots["vm"].counters
    await until(lambda: c.total("rejected") == 3, what="three rejections")
    assert sorted(length for _, length in q.reclaim()) == [0, 0]  # both buffers came back
    assert (c.get("rejected", "bad-vcpu"), c.get("rejected", "bad-util"), c.get("rejected", "short-batch")) == (1, 1, 1)
    assert [r.util for r in policy.records["vm"]] == [100]
    del q, mem  # no view of guest RAM may outlive the guest's close (it unmaps and closes the memfd)
    await g.close()
    await svc.close()


async def test_under_sustained_load_kicks_are_batched_and_nothing_is_left_behind(tmp_path: Path) -> None:
    svc, source, policy, slots = await make_service(tmp_path, ("vm", VMAP))
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    # About 2000 batches/s for half a second: busy after the first window, the ring is polled.
    loop = asyncio.get_running_loop()
    end = loop.time() + 0.5
    i = 0
    while loop.time() < end:
        i += 1
        g.driver.set_util(i % 4, i % 1000)
        g.driver.flush()
        await asyncio.sleep(0.0005)
    await until(lambda: slots["vm"].counters.get("records") == g.driver.stats.records, what="every record")
    s = g.driver.stats
    assert s.kicks < s.batches / 2, (s.kicks, s.batches)
    # Back to idle: after a quiet window or two the device wants the next buffer kicked again.
    q = g.driver.queue
    await until(lambda: q.avail_event == q.avail_idx, timeout=2.0, what="the device to want kicks again")
    kicks = s.kicks
    g.driver.set_util(0, 1024)
    g.driver.flush()
    assert g.driver.stats.kicks == kicks + 1
    await until(lambda: policy.records["vm"][-1].util == 1024)
    del q  # no view of guest RAM may outlive the guest's close (it unmaps and closes the memfd)
    await g.close()
    await svc.close()
