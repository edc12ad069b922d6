"""Every C file of the data plane and the Python it must agree with, each pair run side by side.

The C in ``backend/dataplane/`` is a second implementation of Python that
stays the reference (and the fallback where C cannot load).  ``TWINS`` lists
each C file with its reference and a differential run: the same generated
input through both, the answers and the state left behind compared.  The
longer runs of the same properties live beside their subject
(test_ring_drain.py, test_kick_lane.py, test_busy_polling.py); here each
runs ``VUC_TWIN_EXAMPLES`` examples (50 by default), so this module alone
shows every pair agreeing.  ``C_ONLY`` names the C that has no Python twin,
with the tests that cover it.  A C file in neither list fails
:func:`test_every_c_file_is_listed`: a new twin cannot go untested.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.dataplane import guard as guard_mod
from vhost_user_cpufreq.backend.dataplane.cdrain import CDrainer, ffi
from vhost_user_cpufreq.backend.dataplane.lane import CClampEngine
from vhost_user_cpufreq.backend.host import sched
from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.policy.engine import VcpuPlacement
from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

from . import test_busy_polling as busy_tests
from . import test_kick_lane as lane_tests
from . import test_ring_drain as drain_tests
from .helpers import named_vcpu_threads
from .test_ring_drain import AVAIL_GPA, DESC_GPA, REGION1, REGION2_SIZE, U16, USED_GPA, TwoRegions, c_lib

DATAPLANE = Path(__file__).resolve().parent.parent / "backend" / "dataplane"
EXAMPLES = int(os.environ.get("VUC_TWIN_EXAMPLES", "50"))


def _examples(test: Any, n: int = EXAMPLES) -> Callable[[], None]:
    """A hypothesis test (of this module or another), run with ``n`` examples and its other settings.

    Hypothesis takes one settings decorator per test and reads it when the test is called, so the
    count is swapped in for the call and put back."""
    def run() -> None:
        own = test._hypothesis_internal_use_settings
        test._hypothesis_internal_use_settings = settings(own, max_examples=n)
        try:
            test()
        finally:
            test._hypothesis_internal_use_settings = own
    return run


# -- virtqueue.c: the ring's event suppression and interrupt decision --------------------------

ring_ops = st.lists(st.one_of(
    # used_event near the used index (where need_event's edges are) or anywhere
    st.tuples(st.just("driver"), st.integers(0, 20), st.integers(0, 3), st.integers(-3, 3) | st.integers(0, 0xFFFF)),
    st.tuples(st.just("consume"), st.integers(0, 20)),
    st.tuples(st.just("enable")),
    st.tuples(st.just("disable")),
    st.tuples(st.just("avail_event"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("publish")),
), max_size=30)


def _ring(size: int, event_idx: bool, base: int) -> tuple[bytearray, DeviceQueue]:
    a = bytearray(REGION1)
    U16.pack_into(a, AVAIL_GPA + 2, base)  # the driver's avail.idx and the used.idx where the ring resumes
    U16.pack_into(a, USED_GPA + 2, base)
    mem = TwoRegions(a, bytearray(REGION2_SIZE))
    q = DeviceQueue(size, mem.view(DESC_GPA, 16 * size), mem.view(AVAIL_GPA, 6 + 2 * size),
                    mem.view(USED_GPA, 6 + 8 * size), mem, event_idx=event_idx)
    q.set_base(base)
    return a, q


@settings(deadline=None)
@given(st.sampled_from([4, 16, 256]), st.booleans(), st.integers(0, 0xFFFF), ring_ops)
def ring_rules_agree(size: int, event_idx: bool, base: int, ops: list[tuple[Any, ...]]) -> None:
    """virtqueue.c's rules (vuc_ring_rule) against DeviceQueue's on two copies of one ring: the same
    answers, the same used-ring header (flags, idx, avail_event) and the same interrupt state."""
    lib = c_lib()
    pa, pq = _ring(size, event_idx, base)
    ca, cq = _ring(size, event_idx, base)
    keep = CDrainer(lib, cq, 1)  # its vuc_queue points into ca's ring
    s = ffi.new("vuc_slot *")
    s.q = keep._q
    s.event_idx = int(event_idx)
    s.cursor = pq.packed_cursor
    s.signalled = -1
    header = (USED_GPA, USED_GPA + 4 + 8 * size)
    for op in ops:
        if op[0] == "driver":  # the driver publishes n more buffers and says what it wants
            _, n, flags, near = op
            used_event = ((pq.packed_cursor >> 32) + near) & 0xFFFF
            for mem in (pa, ca):
                U16.pack_into(mem, AVAIL_GPA + 2, (U16.unpack_from(mem, AVAIL_GPA + 2)[0] + n) & 0xFFFF)
                U16.pack_into(mem, AVAIL_GPA, flags)
                U16.pack_into(mem, AVAIL_GPA + 4 + 2 * size, used_event)
            continue
        if op[0] == "consume":  # the device takes up to n buffers and returns them
            avail = U16.unpack_from(pa, AVAIL_GPA + 2)[0]
            c = pq.packed_cursor
            k = min(op[1], (avail - (c & 0xFFFF)) & 0xFFFF)
            last, used = (c + k) & 0xFFFF, ((c >> 32) + k) & 0xFFFF
            pq.packed_cursor = s.cursor = last | last << 16 | used << 32
            continue
        if op[0] == "enable":
            want, got = pq.enable_notifications(), lib.vuc_ring_rule(s, 0, 0)
        elif op[0] == "disable":
            want, got = pq.disable_notifications(), lib.vuc_ring_rule(s, 1, 0)
            want = 0 if want is None else want
        elif op[0] == "avail_event":
            idx = ((s.cursor & 0xFFFF) + op[1]) & 0xFFFF
            want, got = pq.set_avail_event(idx), lib.vuc_ring_rule(s, 2, idx)
        else:
            pq.publish()
            want, got = pq.should_notify(), lib.vuc_ring_rule(s, 3, 0)
        assert bool(got) == bool(want), op
        assert pa[slice(*header)][:4] == ca[slice(*header)][:4], op  # used.flags, used.idx
        assert pa[header[1] : header[1] + 2] == ca[header[1] : header[1] + 2], op  # avail_event
        assert (s.signalled if s.signalled >= 0 else None) == pq.signalled, op
    del keep


# -- guard.c: eventfds the front-end shares ------------------------------------------------------

_EFD_MAX = 0xFFFFFFFFFFFFFFFE


@settings(deadline=None)
@given(st.sampled_from([0, 1, 5, _EFD_MAX - 1, _EFD_MAX]) | st.integers(0, _EFD_MAX), st.integers(1, 3))
def eventfd_rules_agree(start: int, writes: int) -> None:
    """guard.c's non-blocking signal (vuc_eventfd_signal) against the pure-Python fallback of
    guard.signal_eventfd, and its drain (vuc_eventfd_drain) against guard.drain_eventfd, on eventfds
    holding the same count: the same outcomes, the same counts read."""
    g = guard_mod.guard()
    assert g is not None
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    try:
        for fd in fds:
            if start:
                os.eventfd_write(fd, start)
        for _ in range(writes):
            in_c = g.signal(fds[0])
            real = guard_mod.guard
            guard_mod.guard = lambda: None  # type: ignore[assignment]  # the fallback, as without the library
            try:
                in_py = guard_mod.signal_eventfd(fds[1])
            finally:
                guard_mod.guard = real  # type: ignore[assignment]
            assert in_c == in_py, (start, in_c, in_py)
        # The C returns an int64_t (negative: -errno) and saturates a count above INT64_MAX, as it says.
        assert g._lib.vuc_eventfd_drain(fds[0]) == min(guard_mod.drain_eventfd(fds[1]), 2**63 - 1)
        assert g._lib.vuc_eventfd_drain(fds[0]) == guard_mod.drain_eventfd(fds[1]) == 0
    finally:
        for fd in fds:
            os.close(fd)


# -- actuators.c: a clamp onto a vCPU thread ------------------------------------------------------

def actuation_agrees() -> None:
    """actuators.c (vuc_actuate_rule, the lane's actuation) against ThreadActuator.clamp, each on its
    own thread, with the same values: the same scheduling attributes left on the threads and the same
    counts (applied, or recorded once the kernel refuses util clamps, as on kernels without them)."""
    lib = c_lib()
    values = [512, 0, 1024, 160, 160, 3]
    with named_vcpu_threads(2) as (c_tid, py_tid):
        eng = CClampEngine(lib, [VcpuPlacement(0, 0, 1024, 1024, 2802000)])
        eng.set_threads({0: c_tid})
        eng.set_actuation(True)
        s = ffi.new("vuc_slot *")
        s.engine = eng.handle
        counters = Counters()
        act = ThreadActuator(counters, uclamp_reason=None)  # tries the system call, as the lane does
        for v in values:
            lib.vuc_actuate_rule(s, 0, v)
            act.clamp(py_tid, v)

            def attrs(tid: int) -> tuple[int, ...]:
                a = sched.sched_getattr(tid)
                return a.policy, a.nice, a.priority, a.util_min, a.flags & sched.SCHED_FLAG_RESET_ON_FORK

            assert attrs(c_tid) == attrs(py_tid), v
            assert (s.clamps_applied, s.clamps_recorded, s.clamp_failed) == (
                counters.get("clamps_applied"), counters.get("clamps_recorded"), sum(
                    n for k, n in counters.snapshot().items() if k[0] == "clamp_failed")), v
        act.restore(py_tid)


# -- the list ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Twin:
    c: str  # a file in backend/dataplane/
    reference: str  # "module:qualified name" of the Python it must agree with
    run: Callable[[], None]  # the differential run
    elsewhere: str  # the longer runs of the same comparison


TWINS = [
    Twin("ring_drain.c", "vhost_user_cpufreq.protocol.requests:drain",
         _examples(drain_tests.test_c_drain_matches_the_reference),
         "test_ring_drain.py::test_c_drain_matches_the_reference, test_valid_traffic_through_both_drains_is_identical"),
    Twin("engine.c", "vhost_user_cpufreq.backend.policy.engine:ClampEngine",
         _examples(lane_tests.test_c_engine_matches_the_reference),
         "test_kick_lane.py::test_c_engine_matches_the_reference"),
    Twin("kick_batcher.c", "vhost_user_cpufreq.backend.policy.ratelimit:KickBatcher",
         _examples(busy_tests.test_the_lanes_c_rule_is_kickbatchers),
         "test_busy_polling.py::test_the_lanes_c_rule_is_kickbatchers, test_the_lanes_c_rule_at_the_thresholds"),
    Twin("accounting.c", "vhost_user_cpufreq.backend.cpufreq.device:CpufreqDevice._account",
         _examples(lane_tests.test_lane_leaves_the_state_the_device_would, max(1, EXAMPLES // 2)),
         "test_kick_lane.py::test_lane_leaves_the_state_the_device_would, "
         "test_a_guest_timestamp_far_from_the_hosts_saturates_the_batch_age (SeqTracker.age)"),
    Twin("virtqueue.c", "vhost_user_cpufreq.protocol.virtqueue:DeviceQueue.enable_notifications",
         _examples(ring_rules_agree, EXAMPLES * 4),
         "test_kick_lane.py::test_the_lane_and_the_loop_serve_a_vm_alike, "
         "test_busy_polling.py::test_a_busy_vm_is_polled_without_kicks_and_an_idle_one_kicks"),
    Twin("guard.c", "vhost_user_cpufreq.backend.dataplane.guard:signal_eventfd",
         _examples(eventfd_rules_agree),
         "test_guard.py (the SIGBUS half has no Python twin: Python cannot survive the fault)"),
    Twin("actuators.c", "vhost_user_cpufreq.backend.host.actuators:ThreadActuator.clamp", actuation_agrees,
         "test_kick_lane.py::test_the_lane_clamps_threads_for_real_or_says_why_not; the test host with util clamps"),
]

#: C with no Python twin, and what tests it.
C_ONLY = {
    "kick_lane.c": "the lane thread and its epoll loop: test_kick_lane.py (whole VMs on the lane and on the loop, "
                   "hand-overs, deadlines, torn rings), test_sanitized_dataplane.py",
}


def test_every_c_file_is_listed() -> None:
    on_disk = {p.name for p in DATAPLANE.glob("*.c")}
    listed = [t.c for t in TWINS] + list(C_ONLY)
    assert len(listed) == len(set(listed)), "a C file listed twice"
    assert on_disk == set(listed), (f"not listed here (add it to TWINS with its reference and a differential "
                                    f"run): {sorted(on_disk - set(listed))}; listed but gone: "
                                    f"{sorted(set(listed) - on_disk)}")


@pytest.mark.parametrize("twin", TWINS, ids=[t.c for t in TWINS])
def test_the_reference_exists(twin: Twin) -> None:
    module, _, name = twin.reference.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    assert callable(obj)
    # The C names its reference, so a reader finds one from the other.
    head = (DATAPLANE / twin.c).read_text().split("*/", 1)[0]
    ref_file = module.removeprefix("vhost_user_cpufreq.").replace(".", "/").replace("backend/dataplane/", "")
    assert ref_file.rsplit("/", 1)[-1] + ".py" in head or name.split(".")[0] in head, (twin.c, ref_file)


@pytest.mark.parametrize("twin", TWINS, ids=[t.c for t in TWINS])
def test_twin_agrees_with_its_reference(twin: Twin) -> None:
    twin.run()


def test_a_slot_no_lane_serves_records_its_events() -> None:
    """The *_rule test entries run the lane's code on a slot no lane serves: an event it raises is
    queued on the slot (no lane to notice), not a crash."""
    lib = c_lib()
    eng = CClampEngine(lib, [VcpuPlacement(0, 0, 1024, 1024, 2802000)])
    eng.set_threads({0: 2**31 - 1})  # no such thread: the clamp fails with ESRCH
    eng.set_actuation(True)
    s = ffi.new("vuc_slot *")
    s.engine = eng.handle
    lib.vuc_actuate_rule(s, 0, 100)
    assert s.clamp_failed == 1 and s.ev_tail == 1 and s.ev[0].err == 3  # ESRCH
