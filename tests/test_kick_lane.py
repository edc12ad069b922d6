"""The kick lane (backend/dataplane/kick_lane.c, backend/dataplane/lane.py) against the Python it replaces.

Three layers, each compared with its reference:

* the clamp engine in C against engine.py's ClampEngine, on generated
  placements, limits and sequences of records, ticks and releases;
* the lane's drain bookkeeping (sequence tracking, counters, per-vCPU
  state, the decision) against CpufreqDevice's own, on the hostile rings of
  tests/test_ring_drain.py: the same ring served once by the lane thread and
  once by the device on this thread must leave the same state behind;
* whole VMs over real sockets with the daemon's policy, on the lane and on
  the event loop: the same records, rejections, log lines and clamps, and
  the hand-overs (ring restart, new call fd, clamp mechanism change, a
  kernel that refuses util clamps) that only the lane has.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import struct
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.host import sched
from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.dataplane.cdrain import ffi
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.cpufreq.device import CpufreqDevice
from vhost_user_cpufreq.backend.policy.engine import ClampEngine, EngineConfig, VcpuPlacement, VmLimits, util_to_clamp
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.dataplane.lane import STAMP_BYTES, CClampEngine, KickLane, LaneSlot, running_lanes
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig
from vhost_user_cpufreq.protocol.cpufreq import F_PERF_REQUEST, Batch, Record, encode_batch
from vhost_user_cpufreq.protocol.requests import EXPLAIN, REASONS
from vhost_user_cpufreq.protocol.vhost_user import FrontendRequest

from .helpers import engine_vm, kernel_has_fair_slices, named_vcpu_threads, require_c_dataplane, start_guest, until
from .test_ring_drain import AVAIL_GPA, U16, USED_GPA, _offer_raw, c_lib, make_queue, scenario


# -- 1. the engine ----------------------------------------------------------------------------

@st.composite
def engine_case(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.lists(st.integers(0, 12), min_size=1, max_size=6, unique=True))
    places = []
    for v in ids:
        pcap = draw(st.sampled_from([160, 498, 1024, 1]))
        places.append(VcpuPlacement(v, draw(st.integers(0, 7)), pcap, draw(st.sampled_from([160, 498, 1024])),
                                    draw(st.sampled_from([0, 1803000, 2802000, 1])), draw(st.integers(0, 2)),
                                    draw(st.sampled_from([1024, 1024, 0, 130, 700]) | st.integers(0, 1024))))
    a, b = sorted((draw(st.integers(0, 1024)), draw(st.integers(0, 1024))))
    cap = draw(st.sampled_from([1024, a]) | st.integers(a, 1024))  # the VM's uclamp_max (never below the floor)
    cfg = EngineConfig(hysteresis=draw(st.sampled_from([0, 1, 16, 32, 1024])),
                       min_interval=draw(st.sampled_from([0.0, 0.004, 0.008, 0.05])),
                       stale_after=draw(st.sampled_from([0.01, 0.1, 0.5])),
                       headroom=draw(st.sampled_from([0.8, 1.0, 0.33])))
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("record"), st.integers(-1, 14), st.integers(0, 1024),
                  st.sampled_from([0, 0, 1, 300000, 1803000, 2802000, 9_999_999]), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.integers(0, 200)),
        st.tuples(st.just("release")),
    ), max_size=40))
    return dict(places=places, limits=VmLimits(a, b, cap), cfg=cfg, ops=ops)


@settings(max_examples=int(os.environ.get("VUC_ENGINE_EXAMPLES", "600")), deadline=None)
@given(engine_case())
def test_c_engine_matches_the_reference(case: dict[str, Any]) -> None:
    lib = c_lib()
    ref = ClampEngine(case["places"], case["limits"], case["cfg"])
    eng = CClampEngine(lib, case["places"], case["limits"], case["cfg"])
    now = 100.0
    for op in case["ops"]:
        if op[0] == "record":
            _, v, util, perf, dt_ms = op
            now += dt_ms / 1000
            assert eng.on_record(v, util, perf, now) == ref.on_record(v, util, perf, now)
        elif op[0] == "tick":
            now += op[1] / 1000
            assert eng.tick(now) == ref.tick(now)
        else:
            assert eng.release_all() == ref.release_all()
        assert eng.vcpus == ref.vcpus
        assert eng.next_deadline() == ref.next_deadline()
        assert eng.state() == ref.state()


@settings(max_examples=int(os.environ.get("VUC_ENGINE_EXAMPLES", "600")) // 3, deadline=None)
@given(engine_case(), st.data())
def test_an_engine_resumed_from_a_carried_state_decides_as_the_original_would(case: dict[str, Any],
                                                                              data: st.DataObject) -> None:
    """What a successor process does with the carried state (handover): C and Python, either way."""
    lib = c_lib()
    args = (case["places"], case["limits"], case["cfg"])
    ref, c_ref = ClampEngine(*args), CClampEngine(lib, *args)
    ops = case["ops"]
    cut = data.draw(st.integers(0, len(ops)))
    now = 100.0

    def run(engines: list[Any], op: tuple[Any, ...], now: float) -> float:
        outs = []
        if op[0] == "record":
            now += op[4] / 1000
            outs = [e.on_record(op[1], op[2], op[3], now) for e in engines]
        elif op[0] == "tick":
            now += op[1] / 1000
            outs = [e.tick(now) for e in engines]
        else:
            outs = [e.release_all() for e in engines]
        assert all(o == outs[0] for o in outs)
        assert all(e.state() == engines[0].state() and e.next_deadline() == engines[0].next_deadline()
                   for e in engines)
        return now

    for op in ops[:cut]:
        now = run([ref, c_ref], op, now)
    carried = ref.state()
    py, c = ClampEngine(*args), CClampEngine(lib, *args)
    py.restore_state(carried)
    c.restore_state(c_ref.state())
    assert py.state() == c.state() == carried
    for op in ops[cut:]:
        now = run([ref, py, c], op, now)


def test_a_carried_state_for_another_vcpu_is_refused_and_changes_nothing() -> None:
    from vhost_user_cpufreq.backend.policy.engine import ClampState

    places = [VcpuPlacement(0, 7, 1024, 1024, 2802000)]
    for eng in (ClampEngine(places), CClampEngine(c_lib(), places)):
        eng.on_record(0, 600, 0, 1.0)
        before = eng.state()
        with pytest.raises(ValueError):
            eng.restore_state([ClampState(0, 100, 100, 2.0, 2.0, False), ClampState(5, 1, 1, None, None, False)])
        assert eng.state() == before


def test_reconfiguring_starts_afresh_and_keeps_threads() -> None:
    lib = c_lib()
    big = VcpuPlacement(0, 7, 1024, 1024, 2802000)
    eng = CClampEngine(lib, [big])
    eng.set_threads({0: 4242})
    assert [c.uclamp_min for c in eng.on_record(0, 600, 0, 1.0)] == [600]
    eng.configure([big, VcpuPlacement(1, 0, 160, 160, 1803000)], VmLimits(100, 900), EngineConfig())
    assert eng.vcpus == {0: None, 1: None}  # as a new ClampEngine
    assert [c.uclamp_min for c in eng.on_record(0, 1000, 0, 2.0)] == [900]  # the new ceiling


# -- 2. the lane's bookkeeping on hostile rings -----------------------------------------------

def _device(policy: HostPolicy, n: int) -> CpufreqDevice:
    return CpufreqDevice("vm", (0,) * n, StaticSource(PIXEL6), policy, counters=Counters())


def _policy(n: int, c_engine: bool) -> HostPolicy:
    pol = HostPolicy(ThreadActuator(Counters(), dry_run=True), config=EngineConfig(min_interval=0.0, stale_after=60),
                     c_engine=c_engine)
    pol.bind("vm", [VcpuPlacement(v, v, 1024, 1024 if v % 2 else 498, 2802000) for v in range(n)], VmLimits(0, 1024))
    return pol


def _wait_idle(lane: KickLane, slot: LaneSlot, kicks: int) -> None:
    """Until the lane took ``kicks`` kicks and has no turn left to run (read under its lock)."""
    snap = ffi.new("vuc_slot *")
    deadline = time.monotonic() + 10
    while True:
        lane._lib.vuc_lane_snapshot(lane.handle, slot._s, snap)
        if snap.kicks >= kicks and not snap.again and snap.deadline == 0:
            return
        assert time.monotonic() < deadline, "the lane did not finish the ring"
        time.sleep(0.0005)


def _state(dev: CpufreqDevice, pol: HostPolicy, q: Any, a: bytearray, b: bytearray) -> tuple[Any, ...]:
    counts = {k: v for k, v in dev.counters.snapshot().items() if k[0] not in ("kicks", "interrupts_dropped") and v}
    seq = dev.seq
    vcpus = [(s.util, s.perf_khz, s.updated is None) for s in dev.vcpus]
    mem = bytearray(a)
    size = q.size
    U16.pack_into(mem, USED_GPA, 0)  # used.flags and avail_event: the lane asks for kicks, the bare device does not
    U16.pack_into(mem, USED_GPA + 4 + 8 * size, 0)
    return (counts, (seq.last, seq.lost, seq.stale, seq.undecoded), vcpus, dict(pol.vms["vm"].engine.vcpus),
            q.packed_cursor,
            bytes(mem), bytes(b))


@settings(max_examples=int(os.environ.get("VUC_LANE_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_lane_leaves_the_state_the_device_would(s: dict) -> None:
    lib = c_lib()
    n = s["num_vcpus"]
    geometry = dict(indirect=s["indirect"], max_chain=s["max_chain"], max_indirect=s["max_indirect"], base=s["base"])
    budget = s["budget"]

    loop = asyncio.new_event_loop()
    try:
        ref, got = loop.run_until_complete(_both(lib, s, n, geometry, budget, loop))
    finally:
        loop.close()
    assert got == ref


def _copy(s: dict, n: int, geometry: dict, budget: int, *, c_engine: bool) -> tuple[Any, ...]:
    """A fresh copy of the scenario's memory and ring, and a device with its own policy over them."""
    a, b = bytearray(s["a"]), bytearray(s["b"])
    q = make_queue(a, b, s["size"], **geometry)
    pol = _policy(n, c_engine=c_engine)
    dev = _device(pol, n)
    dev.work_budget = budget
    dev.set_features(1 << F_PERF_REQUEST if s["perf_request"] else 0)
    return a, b, q, pol, dev


async def _both(lib: Any, s: dict, n: int, geometry: dict, budget: int,
                loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
    # The reference: the device on this thread, turn after turn as the session would run it.
    ra, rb, rq, rpol, rdev = _copy(s, n, geometry, budget, c_engine=False)
    for _ in range(0x10000):
        more = rdev.handle_queue(0, rq)
        rq.publish()
        avail = U16.unpack_from(ra, AVAIL_GPA + 2)[0]
        if rq.broken or (not more and avail == rq.last_avail_idx):
            break
    ref = _state(rdev, rpol, rq, ra, rb)
    rpol.close()

    # The lane, kicked once.
    la, lb, lq, lpol, ldev = _copy(s, n, geometry, budget, c_engine=True)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    lane = KickLane(lib, loop)
    try:
        binding = lpol.lane_binding("vm", lambda: None)
        assert binding is not None
        slot = LaneSlot(lane, lq, kick_fd=kick, call_fd=None, budget=budget, num_vcpus=n,
                        perf_request=ldev.perf_request, batch_delay=0.0, binding=binding, seq=ldev.seq,
                        vcpus=ldev.vcpus, counters=ldev.counters, on_event=lambda *e: None)
        ldev._lane_slot = slot
        try:
            os.eventfd_write(kick, 1)
            _wait_idle(lane, slot, 1)
        finally:
            slot.detach()
            ldev._lane_detached(slot)
    finally:
        lane.close()
        os.close(kick)
    got = _state(ldev, lpol, lq, la, lb)
    lpol.close()
    return ref, got



# -- 3. whole VMs -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_the_lane_and_the_loop_serve_a_vm_alike(tmp_path, caplog, path: str) -> None:  # type: ignore[no-untyped-def]
    if path == "kick-lane":
        require_c_dataplane()
    caplog.set_level(logging.INFO, logger="vhost_user_cpufreq")
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=path == "kick-lane")
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        await until(lambda: slot.device.features() and slot.connection is not None)
        for i in range(30):
            g.driver.set_util(i % 4, 30 * i)
            g.driver.flush()
        await until(lambda: slot.counters.get("records") == 30, what="records")
        assert (slot.device._lane_slot is not None) == (path == "kick-lane")
        # Hostile buffers straight onto the ring: a bad util, a bad vCPU, a short batch, a replayed seq.
        _offer_raw(g, encode_batch(Batch(10**6, 0, (Record(1, 2000), Record(2, 5)))),
                   encode_batch(Batch(10**6 + 1, 0, (Record(9, 5),))), b"\x01\x02",
                   encode_batch(Batch(10**6, 0, (Record(3, 7),))))
        await until(lambda: slot.counters.get("rejected", "stale-batch") == 1, what="rejections")
        c = slot.counters
        got = (c.get("records"), c.get("batches"), c.get("rejected", "bad-util"), c.get("rejected", "bad-vcpu"),
               c.get("rejected", "short-batch"), c.get("rejected", "stale-batch"))
        assert got == (31, 32, 1, 1, 1, 1)
        utils = [840, 870, 5, 810]  # each vCPU's last valid record
        assert [(v.util, v.perf_khz) for v in slot.device.vcpus] == [(u, 0) for u in utils]
        caps = [160, 498, 1024, 1024]
        assert dict(pol.vms["vm"].engine.vcpus) == {v: util_to_clamp(u, caps[v], caps[v]) for v, u in enumerate(utils)}
        await until(lambda: sum("stale or duplicate" in r.message for r in caplog.records) == 1, what="log lines")
        lines = sorted(r.message.removeprefix("[vm] ") for r in caplog.records
                       if "rejected" in r.message or "dropped" in r.message)
        assert len(lines) == 4, lines
        assert lines[0] == f"dropped 1 of 1 record(s) of batch seq=1000001: bad-vcpu ({EXPLAIN['bad-vcpu']})"
        assert lines[1] == f"dropped 1 of 2 record(s) of batch seq=1000000: bad-util ({EXPLAIN['bad-util']})"
        assert lines[2] == "dropped stale or duplicate batch seq=1000000 (last 1000001)"
        assert lines[3].startswith("rejected buffer ") and lines[3].endswith(f": short-batch ({EXPLAIN['short-batch']})")
        # Served afterwards (the driver model does not know the raw buffers: more of them), and the
        # histogram saw every kick.
        _offer_raw(g, encode_batch(Batch(10**6 + 2, 0, (Record(0, 1),))))
        await until(lambda: slot.device.vcpus[0].util == 1)
        h = slot.counters.histogram("kick_to_decision_seconds")
        assert h is not None and h.count == slot.counters.get("kicks") > 0
    finally:
        await g.close()
        await svc.close()


@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_a_rejected_batch_is_counted_once_not_again_as_lost(tmp_path, path: str) -> None:  # type: ignore[no-untyped-def]
    """SPEC 6.2: a buffer rejected whole used its sequence number; only numbers nobody sent are lost."""
    if path == "kick-lane":
        require_c_dataplane()
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=path == "kick-lane")
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        g.driver.set_util(0, 100)
        g.driver.flush()
        await until(lambda: slot.counters.get("batches") == 1, what="the driver's first batch")
        assert (slot.device._lane_slot is not None) == (path == "kick-lane")
        s0 = 5000
        ok = lambda seq, util: encode_batch(Batch(seq, 0, (Record(1, util),)))  # noqa: E731
        bad_flags = bytearray(ok(s0 + 2, 1))
        bad_flags[6] = 0x80  # an unknown flag bit: the header cannot be trusted, seq included
        bad_count = bytearray(ok(s0 + 3, 1))
        bad_count[4:6] = (0).to_bytes(2, "little")
        # s0 (RESYNC), then three buffers rejected whole, then s0 + 4: no gap is left.
        _offer_raw(g, encode_batch(Batch(s0, 0, (Record(1, 10),), flags=1)), b"\x01\x02", bytes(bad_flags), bytes(bad_count),
                   ok(s0 + 4, 20))
        await until(lambda: slot.device.vcpus[1].util == 20, what="the batch after the rejected ones")
        c = slot.counters
        assert (c.get("rejected", "short-batch"), c.get("rejected", "bad-batch-flags"),
                c.get("rejected", "bad-record-count"), c.get("lost_batches")) == (1, 1, 1, 0)
        # A chain the device cannot walk (a segment outside guest RAM) uses a number too.
        ram, q = g.transport.ram, g.driver.queue
        q.add([(1 << 40, 24)])
        q.publish()
        _offer_raw(g, ok(s0 + 6, 30))
        await until(lambda: slot.device.vcpus[1].util == 30)
        assert (c.get("rejected", "address-out-of-range"), c.get("lost_batches")) == (1, 0)
        # A gap nobody filled: s0 + 7 and s0 + 8 are lost, two numbers, not the difference of three.
        _offer_raw(g, ok(s0 + 9, 40))
        await until(lambda: slot.device.vcpus[1].util == 40)
        assert c.get("lost_batches") == 2
        # A rejected buffer fills only a gap that follows it: s0 + 10 rejected, s0 + 13 leaves two lost.
        _offer_raw(g, b"\x00" * 8, ok(s0 + 13, 50))
        await until(lambda: slot.device.vcpus[1].util == 50)
        assert (c.get("rejected", "short-batch"), c.get("lost_batches")) == (2, 4)
        # Stale and duplicate batches are counted as such and leave the count of rejected buffers alone.
        _offer_raw(g, ok(s0 + 13, 60), b"\x01", ok(s0 + 15, 70))
        await until(lambda: slot.device.vcpus[1].util == 70)
        assert (c.get("rejected", "stale-batch"), c.get("lost_batches")) == (1, 4)
        # A device-writable segment after the batch is ignored, and the batch applied (SPEC 6).
        gpa, wgpa = ram.alloc(24, 8), ram.alloc(64, 8)
        ram.memory.view(gpa, 24)[:] = ok(s0 + 16, 80)
        q.add([(gpa, 24)], [(wgpa, 64)])
        q.publish()
        g.transport.notify(0)
        await until(lambda: slot.device.vcpus[1].util == 80)
        assert bytes(ram.memory.view(wgpa, 64)) == bytes(64) and c.get("lost_batches") == 4
        assert c.get("batches") == 8
        await g.fe.stop_ring(0)  # the lane hands its sequence tracking back
        assert (slot.device.seq.last, slot.device.seq.lost, slot.device.seq.undecoded) == (s0 + 16, 4, 0)
    finally:
        await g.close()
        await svc.close()


@pytest.mark.parametrize("blocking", [False, True], ids=["nonblocking-fd", "front-end-clears-O_NONBLOCK"])
@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_a_ring_restarted_on_the_same_kick_fd_counts_no_phantom_kick(tmp_path, path: str,
                                                                         blocking: bool) -> None:  # type: ignore[no-untyped-def]
    """SPEC 6.5: the signals a kick eventfd holds when its ring stops or starts are no kick.

    QEMU keeps one eventfd per queue for the VM's life and passes it again after RESET_DEVICE;
    the lane never reads it (edge-triggered), so it arrives holding the old session's count.
    With ``blocking`` the front-end clears O_NONBLOCK on the file description it shares with
    the back-end just before the ring starts: the back-end's reads must not hang on it.
    """
    if path == "kick-lane":
        require_c_dataplane()
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=path == "kick-lane")
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        for i in range(6):
            g.driver.set_util(i % 4, 100 + 10 * i)
            g.driver.flush()
            await until(lambda: slot.counters.get("records") == i + 1)
        c = slot.counters
        assert (slot.device._lane_slot is not None) == (path == "kick-lane")
        kick_fd = g.fe.rings[0].kick
        kicks = c.get("kicks")
        assert kicks >= 1
        await g.fe.stop_ring(0)  # GET_VRING_BASE
        await asyncio.sleep(0.02)  # room for the loop to read what the lane left in the counter
        assert c.get("kicks") == kicks, "the counter the lane never read was counted again at the stop"
        g.fe.kick(0)  # a kick on the stopped ring (a guest that notifies while its driver resets)
        await asyncio.sleep(0.02)
        await g.transport.reset()  # RESET_DEVICE: the back-end closes its copy of the kick fd
        await g.driver.remove()
        if blocking:
            send = g.fe.request

            async def clear_nonblock_after_kick(req, payload=None, fds=(), **kw):  # type: ignore[no-untyped-def]
                r = await send(req, payload, fds, **kw)
                if req == FrontendRequest.SET_VRING_KICK:
                    os.set_blocking(kick_fd, True)  # shared with the back-end's copy: O_NONBLOCK is gone for both
                return r

            g.fe.request = clear_nonblock_after_kick  # type: ignore[method-assign]
        await g.driver.probe()  # the same eventfd again, as QEMU passes it
        if blocking:
            assert os.get_blocking(kick_fd)
        session = slot.connection.session  # type: ignore[union-attr]
        await until(lambda: session.rings[0].queue is not None, what="the restarted ring")
        assert (slot.device._lane_slot is not None) == (path == "kick-lane")
        await asyncio.sleep(0.05)  # room for a phantom kick to be counted (the lane's epoll or the loop's reader)
        assert c.get("kicks") == kicks, "a kick counted that the guest did not send to a started ring"
        g.driver.set_util(1, 300)
        g.driver.flush()
        await until(lambda: slot.device.vcpus[1].util == 300, what="a record after the restart")
        assert c.get("kicks") == kicks + 1
        assert c.get("lost_batches") == 0 and c.total("rejected") == 0
    finally:
        await g.close()
        await svc.close()


async def test_ring_restart_and_a_new_call_fd_hand_the_ring_over(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_c_dataplane()
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=True)
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        for i in range(10):
            g.driver.set_util(i % 4, 10 + i)
            g.driver.flush()
        await until(lambda: slot.counters.get("records") == 10)
        lane_slot = slot.device._lane_slot
        assert lane_slot is not None
        # A new call fd while the lane serves the ring: interrupts go to the new one.
        from vhost_user_cpufreq.protocol import vhost_user as vu

        new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await g.fe.request(vu.FrontendRequest.SET_VRING_CALL, vu.U64(0), (new_call,), need_reply=True)
        g.driver.queue.set_interrupt_suppression(False)
        g.driver.set_util(1, 900)
        g.driver.flush()
        await until(lambda: slot.device.vcpus[1].util == 900)
        await until(lambda: _readable(new_call), what="an interrupt on the new call fd")
        os.close(new_call)
        assert slot.device._lane_slot is lane_slot  # the same slot: no hand-over was needed
        # Stop the ring: the lane's cursor comes back with GET_VRING_BASE; sequence tracking survives.
        last = await g.fe.stop_ring(0)
        assert slot.device._lane_slot is None
        assert last == g.driver.queue.avail_idx
        assert slot.device.seq.last == g.driver.seq - 1 and slot.counters.get("rejected", "stale-batch") == 0
        assert slot.counters.get("records") == 11 and slot.counters.get("batches") == 11
    finally:
        await g.close()
        await svc.close()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


async def test_changing_the_clamp_mechanism_moves_the_vm_between_lane_and_loop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_c_dataplane()
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=True)
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    try:
        g.driver.set_util(3, 500)
        g.driver.flush()
        await until(lambda: slot.device.vcpus[3].util == 500)
        assert slot.device._lane_slot is not None
        places = [pol.vms["vm"].engine.placement(v) for v in range(4)]
        cg = tmp_path / "cg{vcpu}"
        for v in range(4):
            (tmp_path / f"cg{v}").mkdir()
            (tmp_path / f"cg{v}" / "cpu.uclamp.min").write_text("0.00\n")
        pol.bind("vm", places, VmLimits(), cgroup=str(cg))
        assert slot.device._lane_slot is None  # cgroup clamps are written from the event loop
        g.driver.set_util(3, 700)
        g.driver.flush()
        await until(lambda: pol.cgroups.values.get(tmp_path / "cg3") == 700, what="cgroup clamp")
        pol.bind("vm", places, VmLimits())
        assert slot.device._lane_slot is not None  # back to per-thread clamps: back on the lane
        g.driver.set_util(3, 100)
        g.driver.flush()
        await until(lambda: pol.vms["vm"].engine.vcpus[3] == 100)
        assert slot.counters.get("records") == 3 and slot.counters.total("rejected") == 0
    finally:
        await g.close()
        await svc.close()


async def test_the_lane_clamps_threads_for_real_or_says_why_not(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """sched_setattr from the lane thread on this kernel: applied, or refused and degraded clearly."""
    require_c_dataplane()
    caplog.set_level(logging.WARNING, logger="vhost_user_cpufreq")
    with named_vcpu_threads(4) as tids:
        svc, pol, slot, counters = await engine_vm(tmp_path, lane=True, dry_run=False)
        probe = pol.actuator.degraded
        pol.attach_threads("vm", dict(enumerate(tids)))
        pol.actuator.degraded = None  # make the lane try, whatever the probe found
        pol.vms["vm"].engine.set_actuation(True)
        g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
        try:
            g.driver.set_util(2, 512)
            g.driver.flush()
            await until(lambda: counters.get("clamps_applied") + counters.get("clamps_recorded") >= 1)
            if probe is None:  # this kernel clamps: the thread has the engine's value
                assert sched.sched_getattr(tids[2]).util_min == pol.vms["vm"].engine.vcpus[2] == 512
                assert counters.get("clamps_applied") == 1
            else:
                await until(lambda: pol.actuator.degraded is not None, what="degraded")
                assert "kernel refused util clamps" in pol.actuator.degraded
                assert counters.get("clamps_recorded") == 1 and counters.get("clamp_failed") == 0
                assert any("util clamps unavailable" in r.message for r in caplog.records)
                # From now on recorded without a system call, still decided.
                g.driver.set_util(2, 100)
                g.driver.flush()
                await until(lambda: counters.get("clamps_recorded") == 2)
        finally:
            await g.close()
            await svc.close()
        pol.close()  # what the daemon does when it stops (the host side detaches a VM's threads the same way)
        assert pol.actuator.originals == {} and pol.actuator.clamps == {}  # every thread got back what it had


async def test_the_lane_clamps_threads_the_service_neither_pins_nor_caps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pinning = "none"/"keep" and no cap: the threads still get their clamps from the lane, and back what
    they had when the VM goes (the lane clamped only threads a pin or a cap had made the actuator remember)."""
    require_c_dataplane()
    with named_vcpu_threads(4) as tids:
        svc, pol, slot, counters = await engine_vm(tmp_path, lane=True, dry_run=False)
        unpinned = [dataclasses.replace(pol.vms["vm"].engine.placement(v), pcpu=None) for v in range(4)]
        pol.bind("vm", unpinned, VmLimits())
        pol.attach_threads("vm", dict(enumerate(tids)))
        assert not pol.actuator.pinned and not pol.actuator.caps
        assert set(pol.actuator.originals) == set(tids)  # remembered before the lane may touch them
        g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
        try:
            g.driver.set_util(1, 512)
            g.driver.flush()
            await until(lambda: counters.get("clamps_applied") + counters.get("clamps_recorded") >= 1,
                        what="a clamp by the lane on an unpinned thread")
            assert counters.get("clamp_failed") == 0
        finally:
            await g.close()
            await svc.close()
        pol.close()
        assert pol.actuator.originals == {} and [os.sched_getaffinity(t) for t in tids] == [
            os.sched_getaffinity(0)] * 4


async def test_the_lane_thread_lives_only_while_it_serves_a_ring(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """This loop's lane starts with its first ring and its thread is gone when the last ring leaves.

    It follows its own lane's thread by id: counting the process's threads would also count
    threads that other tests' loops and executors start or end meanwhile.
    """
    require_c_dataplane()
    loop = asyncio.get_running_loop()

    def own_lanes() -> list[KickLane]:
        return [lane for lane in running_lanes() if lane._loop is loop]

    def thread_ids() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    svc, pol, slot, _ = await engine_vm(tmp_path, lane=True)
    assert own_lanes() == []  # no ring yet, so no lane thread
    g = await start_guest(str(tmp_path / "vm.sock"))
    await until(lambda: slot.device._lane_slot is not None)
    (lane,) = own_lanes()
    tid = lane.sched.tid
    assert tid in thread_ids() and tid != threading.get_native_id()
    await g.close()
    await until(lambda: slot.connection is None)
    assert own_lanes() == [] and lane.handle is None
    assert tid not in thread_ids()  # the thread was joined, not left to linger
    await svc.close()


def _lane_in_thread(lib: Any, slice_us: int, setup: Any) -> tuple[KickLane, sched.SchedAttr, sched.SchedAttr]:
    """Start a lane from a fresh thread prepared by ``setup()`` (the lane inherits its scheduling)."""
    out: dict[str, Any] = {}

    def run() -> None:
        setup()
        loop = asyncio.new_event_loop()
        try:
            lane = KickLane(lib, loop, slice_us)
            out["attr"] = sched.sched_getattr(lane.sched.tid)  # while the lane thread lives
            out["creator"] = sched.sched_getattr(0)
            lane.close()
            out["lane"] = lane
        finally:
            loop.close()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["lane"], out["attr"], out["creator"]


def test_the_lane_thread_asks_for_a_short_slice_and_keeps_the_rest(caplog) -> None:  # type: ignore[no-untyped-def]
    """The lane's own thread requests its slice, keeping the policy and nice value it inherited."""
    require_c_dataplane()
    lib = c_lib()

    def nice5() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # this thread only

    with caplog.at_level(logging.DEBUG, logger="vhost_user_cpufreq.lane"):
        lane, attr, creator = _lane_in_thread(lib, 250, nice5)
    assert lane.sched.tid != threading.get_native_id() and lane.sched.requested_ns == 250_000
    assert lane.sched.error == 0 and attr.policy == os.SCHED_OTHER and attr.nice == 5
    if kernel_has_fair_slices():
        # The kernel itself, asked from outside the lane, says the lane thread's slice is 250 us;
        # the thread that started it kept the default.
        assert lane.sched.applied and attr.runtime == lane.sched.slice_ns == 250_000
        assert creator.runtime != 250_000
        assert "EEVDF slice 250 us" in caplog.text
    else:  # older kernels ignore the request for fair threads: said, not hidden
        assert not lane.sched.applied and "needs Linux 6.12+" in caplog.text

    lane, attr, creator = _lane_in_thread(lib, 0, lambda: None)  # lane_slice_us = 0: left alone
    assert not lane.sched.applied and lane.sched.slice_ns == 0 and attr.runtime == creator.runtime
    assert "the kernel's default slice" in lane.sched.describe()


def test_a_lane_started_by_an_idle_class_thread_refuses_the_slice_and_says_why(caplog) -> None:  # type: ignore[no-untyped-def]
    require_c_dataplane()

    def idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only

    with caplog.at_level(logging.DEBUG, logger="vhost_user_cpufreq.lane"):
        lane, attr, _ = _lane_in_thread(c_lib(), 100, idle)
    assert lane.sched.error == errno.EINVAL and not lane.sched.applied
    assert attr.policy == os.SCHED_IDLE  # not ours to change
    assert "slice of 100 us refused" in caplog.text and "busy thread's slice" in caplog.text


def test_a_restarted_lane_reports_an_unchanged_slice_only_at_debug_level(caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The lane stops with its last ring and starts with the next: one VM reconnecting must not log each time."""
    require_c_dataplane()
    from vhost_user_cpufreq.backend.dataplane import lane as lane_mod

    monkeypatch.setattr(lane_mod, "_last_outcome", None)
    with caplog.at_level(logging.DEBUG, logger="vhost_user_cpufreq.lane"):
        for _ in range(3):
            _lane_in_thread(c_lib(), 100, lambda: None)
        _lane_in_thread(c_lib(), 0, lambda: None)  # a different outcome is reported again
    reports = [(r.levelno, r.getMessage()) for r in caplog.records if "kick lane thread" in r.getMessage()]
    assert [lvl for lvl, _ in reports] == [logging.INFO if kernel_has_fair_slices() else logging.WARNING,
                                          logging.DEBUG, logging.DEBUG, logging.INFO], reports
    assert "the kernel's default slice" in reports[-1][1]


async def test_the_lane_runs_the_engines_deadlines_without_kicks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A deferred value lands at min_interval and a silent guest's boost decays at stale_after, both
    from the lane's own timer: no kick, no Python timer (HostPolicy arms none for a VM on the lane)."""
    require_c_dataplane()
    counters = Counters()
    pol = HostPolicy(ThreadActuator(counters, dry_run=True),
                     config=EngineConfig(min_interval=0.05, stale_after=0.3, hysteresis=1))
    big = PIXEL6.domains[2]
    pol.bind("vm", [VcpuPlacement(0, 7, big.capacity, big.capacity, big.max_khz, 2)], VmLimits())
    pol.attach_threads("vm", {0: threading.get_native_id()})  # dry run: remembered, not changed
    svc = Service(StaticSource(PIXEL6), pol)
    slot = await svc.add_vm(VmConfig("vm", str(tmp_path / "vm.sock"), (2,), notify_interval=0.01))
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    engine = pol.vms["vm"].engine
    try:
        await until(lambda: slot.device._lane_slot is not None)
        g.driver.set_util(0, 500)
        g.driver.flush()
        await until(lambda: engine.vcpus[0] == 500)
        t0 = time.monotonic()
        g.driver.set_util(0, 900)
        g.driver.flush()
        await until(lambda: slot.device.vcpus[0].util == 900)
        assert engine.vcpus[0] == 500  # within min_interval of the last change: deferred
        kicks = slot.counters.get("kicks")
        await until(lambda: engine.vcpus[0] == 900, what="the deferred value")
        assert time.monotonic() - t0 >= 0.04
        await until(lambda: engine.vcpus[0] == 0, timeout=3, what="the stale boost dropped")
        assert time.monotonic() - t0 >= 0.25
        assert slot.counters.get("kicks") == kicks  # the lane's timer did both
        assert pol.vms["vm"].timer is None
        assert counters.get("clamps_recorded") == 3  # 500, 900, then 0
    finally:
        await g.close()
        await svc.close()
        pol.close()


def test_a_guest_scribbling_over_its_ring_cannot_hurt_the_lane_or_its_neighbour() -> None:
    """Torn rings: a thread writes random bytes over a ring's descriptors, avail ring and batches while
    the lane drains it, round after round.  Every buffer the lane consumed is accounted for (a batch or a
    rejection), every one with a head is returned, and a well-behaved VM on the same lane gets every record."""
    import random

    from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

    from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

    from .test_ring_drain import DATA_GPA, DESC_GPA, REGION1, REGION2_SIZE, TwoRegions

    lib = c_lib()
    loop = asyncio.new_event_loop()
    lane = KickLane(lib, loop)
    rng = random.Random(7)
    # The neighbour: a driver queue of its own, valid batches only.
    wmem = bytearray(REGION1)
    wflat = TwoRegions(wmem, bytearray(REGION2_SIZE))
    wdrv = DriverQueue(64, wflat.view(DESC_GPA, 1024), wflat.view(AVAIL_GPA, 6 + 128), wflat.view(USED_GPA, 6 + 512),
                       wflat)
    wq = DeviceQueue(64, wflat.view(DESC_GPA, 1024), wflat.view(AVAIL_GPA, 6 + 128), wflat.view(USED_GPA, 6 + 512), wflat,
                  max_chain_bytes=65536)
    wpol = _policy(4, c_engine=True)
    wdev = _device(wpol, 4)
    wkick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    wbind = wpol.lane_binding("vm", lambda: None)
    assert wbind is not None
    wslot = LaneSlot(lane, wq, kick_fd=wkick, call_fd=None, budget=64, num_vcpus=4, perf_request=False,
                     batch_delay=0.0, binding=wbind, seq=wdev.seq, vcpus=wdev.vcpus, counters=wdev.counters,
                     on_event=lambda *e: None)
    wdev._lane_slot = wslot
    sent = 0
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pol = _policy(8, c_engine=True)
    dev = _device(pol, 8)
    try:
        for rnd in range(25):
            a, b = bytearray(REGION1), bytearray(REGION2_SIZE)
            size = 16
            base = rng.randrange(0x10000)
            for i in range(size):  # valid batches to start from, then noise on top
                data = encode_batch(Batch(rnd * 100 + i, 0, (Record(i % 8, rng.randrange(1025)),)))
                gpa = DATA_GPA + 64 * i
                a[gpa : gpa + len(data)] = data
                a[DESC_GPA + 16 * i : DESC_GPA + 16 * i + 16] = struct.pack("<QIHH", gpa, len(data), 0, 0)
                U16.pack_into(a, AVAIL_GPA + 4 + 2 * i, i)
            U16.pack_into(a, AVAIL_GPA + 2, (base + size) & 0xFFFF)  # all sixteen published
            q = make_queue(a, b, size, indirect=True, max_chain=2064, max_indirect=64, base=base)
            binding = pol.lane_binding("vm", lambda: None)
            assert binding is not None
            before = dev.counters.snapshot()
            slot = LaneSlot(lane, q, kick_fd=kick, call_fd=None, budget=512, num_vcpus=8, perf_request=False,
                            batch_delay=0.0, binding=binding, seq=dev.seq, vcpus=dev.vcpus, counters=dev.counters,
                            on_event=lambda *e: None)
            stop = threading.Event()

            def scribble(seed: int = rnd, base: int = base, first_seq: int = rnd * 100 + size) -> None:
                r = random.Random(seed)
                published, seq = base + size, first_seq
                while not stop.is_set():
                    time.sleep(0.00005)
                    if r.random() < 0.5:  # noise anywhere in the descriptors, avail entries and batches
                        off, span = r.choice([(DESC_GPA, 16 * size), (AVAIL_GPA + 4, 2 * size),
                                              (DATA_GPA, 64 * size)])
                        n = r.randrange(1, 9)
                        at = off + r.randrange(span)
                        a[at : at + n] = r.randbytes(n)
                    else:  # a fresh valid batch in a random slot, named by its descriptor and avail entry
                        i = r.randrange(size)
                        data = encode_batch(Batch(seq, 0, (Record(r.randrange(8), r.randrange(1025)),)))
                        seq += 1
                        gpa = DATA_GPA + 64 * i
                        a[gpa : gpa + len(data)] = data
                        a[DESC_GPA + 16 * i : DESC_GPA + 16 * i + 16] = struct.pack("<QIHH", gpa, len(data), 0, 0)
                        U16.pack_into(a, AVAIL_GPA + 4 + 2 * (published % size), i)
                    # Publish as a driver would (at most a ring ahead of what came back), or, rarely, a jump.
                    used = U16.unpack_from(a, USED_GPA + 2)[0]
                    if r.random() < 0.002:
                        published += r.randrange(size + 1, 0x10000)
                    elif ((published - used) & 0xFFFF) < size:
                        published += 1
                    U16.pack_into(a, AVAIL_GPA + 2, published & 0xFFFF)

            t = threading.Thread(target=scribble)
            t.start()
            end = time.monotonic() + 0.06
            while time.monotonic() < end:
                os.eventfd_write(kick, 1)
                # The neighbour sends one batch per pass and must be served throughout.
                data = encode_batch(Batch(sent, 0, (Record(sent % 4, sent % 1025),)))
                gpa = DATA_GPA + 64 * (sent % 64)
                wmem[gpa : gpa + len(data)] = data
                wdrv.add([(gpa, len(data))])
                wdrv.publish()
                os.eventfd_write(wkick, 1)
                sent += 1
                time.sleep(0.0005)
                wdrv.reclaim()
            stop.set()
            t.join()
            _wait_idle(lane, slot, 1)
            slot.detach()
            delta = {k: v - before.get(k, 0) for k, v in dev.counters.snapshot().items() if v != before.get(k, 0)}
            consumed = (q.last_avail_idx - base) & 0xFFFF
            rej = {r: k for (e, r), k in delta.items() if e == "rejected"}
            explained = delta.get(("batches", ""), 0) + sum(
                k for r, k in rej.items() if r not in ("bad-vcpu", "bad-util", "perf-not-negotiated",
                                                       "avail-index-jump"))
            assert explained == consumed, (rnd, consumed, delta)
            assert ((q.used_idx - base) & 0xFFFF) == consumed - rej.get("bad-head", 0), (rnd, delta)
            assert set(rej) <= set(REASONS) | {"stale-batch"}
        _wait_idle(lane, wslot, 1)
        deadline = time.monotonic() + 5
        while wdev.counters.get("records") < sent and time.monotonic() < deadline:
            os.eventfd_write(wkick, 1)
            time.sleep(0.01)
        assert wdev.counters.get("records") == sent and wdev.counters.total("rejected") == 0
        assert [v.util for v in wdev.vcpus] == [max(i for i in range(sent) if i % 4 == v) % 1025 for v in range(4)]
    finally:
        wslot.detach()
        lane.close()
        loop.close()
        os.close(kick)
        os.close(wkick)


def test_the_lane_stamps_each_decision_with_its_wake_up() -> None:
    """Where a policy asks for stamps, the lane writes per vCPU: when it decided, how many records
    that covers, and when its thread woke for that drain (the bench splits kick -> decision there)."""
    require_c_dataplane()
    from .test_ring_drain import DATA_GPA, DESC_GPA, REGION1, REGION2_SIZE

    lib = c_lib()
    loop = asyncio.new_event_loop()
    lane = KickLane(lib, loop)
    pol = _policy(8, c_engine=True)
    dev = _device(pol, 8)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    a, b = bytearray(REGION1), bytearray(REGION2_SIZE)
    q = make_queue(a, b, 16, indirect=False, max_chain=2064, max_indirect=0, base=0)
    binding = pol.lane_binding("vm", lambda: None)
    assert binding is not None

    def slot_with(stamps: bytearray) -> LaneSlot:
        binding.stamps = stamps
        return LaneSlot(lane, q, kick_fd=kick, call_fd=None, budget=64, num_vcpus=8, perf_request=False,
                        batch_delay=0.0, binding=binding, seq=dev.seq, vcpus=dev.vcpus, counters=dev.counters,
                        on_event=lambda *e: None)

    try:
        with pytest.raises(ValueError, match="24 bytes per vCPU"):
            slot_with(bytearray(STAMP_BYTES * 8 - 1))  # the lane would write past its end
        stamps = bytearray(STAMP_BYTES * 8)
        slot = slot_with(stamps)
        try:
            _wait_idle(lane, slot, 0)  # the drain on attach is done: the next wake-up is our kick's
            data = encode_batch(Batch(1, 0, (Record(2, 700), Record(5, 300), Record(2, 900))))
            a[DATA_GPA : DATA_GPA + len(data)] = data
            a[DESC_GPA : DESC_GPA + 16] = struct.pack("<QIHH", DATA_GPA, len(data), 0, 0)
            U16.pack_into(a, AVAIL_GPA + 4, 0)
            U16.pack_into(a, AVAIL_GPA + 2, 1)
            t_kick = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            os.eventfd_write(kick, 1)
            _wait_idle(lane, slot, 1)
            t_after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            got = [struct.unpack_from("=QQQ", stamps, STAMP_BYTES * v) for v in range(8)]
        finally:
            slot.detach()
        decided, count, woke = got[2]
        assert count == 2  # both of vCPU 2's records, decided once on the newest
        assert t_kick <= woke <= decided <= t_after
        assert got[5][1] == 1 and got[5][2] == woke  # the same drain, the same wake-up
        assert all(got[v] == (0, 0, 0) for v in (0, 1, 3, 4, 6, 7))
    finally:
        lane.close()
        loop.close()
        os.close(kick)
        pol.close()


@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_a_guest_timestamp_far_from_the_hosts_saturates_the_batch_age(path: str) -> None:
    """A batch stamped 2**64 - 1, then one stamped 0: host minus guest falls below the int64
    range and the age then rises above it.  Both saturate, alike on both paths (the lane's
    subtraction overflowed, which UBSan reported from the fuzz campaign, and the device's
    unbounded figure could not be handed to the lane)."""
    from .test_ring_drain import DATA_GPA, DESC_GPA, REGION1, REGION2_SIZE

    a, b = bytearray(REGION1), bytearray(REGION2_SIZE)
    q = make_queue(a, b, 16, indirect=False, max_chain=2064, max_indirect=0, base=0)
    for i, ts in enumerate((2**64 - 1, 0)):
        data = encode_batch(Batch(1 + i, ts, (Record(i, 100 + i),)))
        at = DATA_GPA + 256 * i
        a[at : at + len(data)] = data
        a[DESC_GPA + 16 * i : DESC_GPA + 16 * i + 16] = struct.pack("<QIHH", at, len(data), 0, 0)
        U16.pack_into(a, AVAIL_GPA + 4 + 2 * i, i)
    U16.pack_into(a, AVAIL_GPA + 2, 2)
    pol = _policy(2, c_engine=path == "kick-lane")
    dev = _device(pol, 2)
    if path == "event-loop":
        dev.handle_queue(0, q)
    else:
        require_c_dataplane()
        lane = KickLane(c_lib(), asyncio.get_running_loop())
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        binding = pol.lane_binding("vm", lambda: None)
        assert binding is not None
        try:
            slot = LaneSlot(lane, q, kick_fd=kick, call_fd=None, budget=64, num_vcpus=2, perf_request=False,
                            batch_delay=0.0, binding=binding, seq=dev.seq, vcpus=dev.vcpus, counters=dev.counters,
                            on_event=lambda *e: None)
            _wait_idle(lane, slot, 0)  # the drain on attach takes both batches
            slot.detach()
        finally:
            lane.close()
            os.close(kick)
    pol.close()
    assert dev.counters.get("batches") == 2 and dev.seq.last == 2
    assert dev.seq.min_offset_ns == -(2**63)
    assert dev.seq.last_age_ns == 2**63 - 1
