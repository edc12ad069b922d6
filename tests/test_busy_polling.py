"""Busy polling (SPEC 6.3): a busy ring is drained on a shared grid without kicks; an idle one is kicked.

The rule is ``KickBatcher`` in ``backend/policy/ratelimit.py``; the kick lane carries
a C port of it. The pure tests pin the rule down, a differential test runs the
C port against it on the same drains, and the whole-VM test runs it on both
paths over real sockets and eventfds.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane, ffi
from vhost_user_cpufreq.backend.policy.ratelimit import KickBatcher

from .helpers import engine_vm, require_c_dataplane, start_guest, until

# -- the rule, with injected time -------------------------------------------------------------


def _feed(b: KickBatcher, start: float, rate: float, seconds: float, step: float = 0.004) -> float:
    """Drains every ``step`` seconds at ``rate`` buffers/s; returns the time after the last one."""
    t, owed = start, 0.0
    while t < start + seconds:
        t += step
        owed += rate * step
        n = int(owed)
        owed -= n
        b.drained(t, n)
    return t


def test_a_ring_starts_kicked_and_a_slow_one_stays_kicked() -> None:
    b = KickBatcher(0.004, max_ahead=32)
    assert b.drained(0.0, 1) == 1 and not b.busy
    _feed(b, 0.0, 10.0, 2.0)  # ten buffers a second: a kick each is cheaper than polling
    assert not b.busy and b.drained(2.1, 1) == 1
    assert b.next_poll(2.1) is None


def test_sustained_arrival_makes_a_ring_busy_and_quiet_makes_it_kicked_again() -> None:
    b = KickBatcher(0.004, max_ahead=32)
    t = _feed(b, 0.0, 100.0, 0.25)  # the scale benchmark's rate: a buffer every 10 ms
    assert b.busy and b.drained(t, 0) == 32  # kicked only by a burst of half the ring
    assert 90 <= b.rate <= 110
    t = _feed(b, t, 30.0, 0.5)  # between the two rates: no flapping, it stays busy
    assert b.busy
    t = _feed(b, t, 0.0, 0.25)
    assert not b.busy and b.drained(t, 0) == 1


def test_busy_rings_share_one_poll_grid() -> None:
    a, b = KickBatcher(0.004), KickBatcher(0.004)
    _feed(a, 0.0, 500.0, 0.2)
    _feed(b, 0.001, 500.0, 0.2)
    assert a.busy and b.busy
    # Drained at different moments, both are next drained at the same grid point.
    due_a, due_b = a.next_poll(5.0011), b.next_poll(5.0027)
    assert due_a == due_b == pytest.approx(5.004)


def test_period_zero_never_polls() -> None:
    b = KickBatcher(0.0)
    _feed(b, 0.0, 5000.0, 1.0)
    assert not b.busy and b.drained(1.1, 5) == 1


@given(st.lists(st.tuples(st.floats(0.0001, 0.05), st.integers(0, 40)), max_size=300),
       st.floats(0.001, 0.02))
def test_the_state_changes_only_as_the_rates_say(steps: list[tuple[float, int]], period: float) -> None:
    b = KickBatcher(period, max_ahead=16)
    t = 0.0
    start, count = None, 0
    for dt, n in steps:
        t += dt
        was = b.busy
        ahead = b.drained(t, n)
        if start is None:
            start = t
        count += n
        if t - start >= b.window:
            rate = count / (t - start)
            want = True if rate >= b.enter_rate else False if rate < b.leave_rate else was
            start, count = t, 0
        else:
            want = was
        assert b.busy == want
        assert ahead == (16 if want else 1)
        due = b.next_poll(t)
        assert (due is None) == (not want)
        if due is not None:
            assert t < due <= t + period + 1e-9
            assert abs(due / period - round(due / period)) < 1e-6  # a point of the shared grid


# From a start time that is a power of two, steps of 0.25 or 0.5 s are exact in binary, so a
# window's rate can be exactly a threshold (20 or 50 buffers/s); arbitrary floats cover the rest.
_DT = st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5]), st.floats(0.0, 0.05))


@settings(deadline=None)  # the first example may load (or build) the C data plane
@given(st.lists(st.tuples(_DT, st.integers(0, 12) | st.integers(0, 60)), max_size=300),
       st.sampled_from([0.001, 0.004, 0.01]), st.sampled_from([1024.0, 65536.0]) | st.floats(1.0, 1e6))
def test_the_lanes_c_rule_is_kickbatchers(steps: list[tuple[float, int]], period: float, t0: float) -> None:
    """The kick lane's batcher() (kick_lane.c) against KickBatcher on the same drains: the same state
    after every drain, and the same grid point for a busy ring's next poll.  Times start above 0,
    as CLOCK_MONOTONIC does (the C slot takes a window start of 0 to mean none yet)."""
    _same_rule(steps, period, t0)


@pytest.mark.parametrize("windows", [
    [(0.5, 25), (0.5, 10), (0.5, 9), (0.5, 24), (0.5, 25), (0.5, 9)],  # 50 busy, 20 stays, 18 leaves, 48 not yet
    [(0.5, 26), (0.5, 24), (0.5, 10), (0.5, 9), (0.5, 10), (0.5, 25), (0.5, 0)],
    [(0.5, 25), (2.0, 40), (2.0, 39)],  # 20.0 stays busy, 19.5 leaves
])
def test_the_lanes_c_rule_at_the_thresholds(windows: list[tuple[float, int]]) -> None:
    """Windows whose lengths are exact in binary, so rates fall exactly on and just off each threshold,
    crossed both ways."""
    steps = [(0.0, 0), *windows]
    ref, t, states = KickBatcher(0.004), 1024.0, []
    for dt, n in steps:
        t += dt
        states.append(ref.drained(t, n) > 1)
    assert True in states and states[-1] is False  # each sequence does go busy and back
    _same_rule(steps, 0.004, 1024.0)


def _same_rule(steps: list[tuple[float, int]], period: float, t0: float) -> None:
    require_c_dataplane()
    lib = dataplane().lib
    slot = ffi.new("vuc_slot *")
    slot.batch_delay = period
    due = ffi.new("double *")
    ref = KickBatcher(period, max_ahead=32)  # the lane's rates and window are KickBatcher's defaults
    t = t0
    for dt, n in steps:
        t += dt
        ref.drained(t, n)
        busy = lib.vuc_busy_rule(slot, t, n, due)
        assert bool(busy) == ref.busy, (t, n, ref.rate)
        assert due[0] == (ref.next_poll(t) or 0.0)


# -- whole VMs, on the kick lane and on the event loop ---------------------------------------


@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_a_busy_vm_is_polled_without_kicks_and_an_idle_one_kicks(tmp_path, path: str) -> None:  # type: ignore[no-untyped-def]
    if path == "kick-lane":
        require_c_dataplane()
    svc, pol, slot, _ = await engine_vm(tmp_path, lane=path == "kick-lane")
    g = await start_guest(str(tmp_path / "vm.sock"), util_threshold=1)
    q = g.driver.queue
    loop = asyncio.get_running_loop()
    try:
        await until(lambda: slot.device.features() and slot.connection is not None)
        sent = 0

        async def load(seconds: float) -> int:
            # Several hundred batches/s, each a rise or a fall: busy on either path (the loop polls
            # from 250/s on, the lane from 50/s).
            nonlocal sent
            kicks0 = g.driver.stats.kicks
            end = loop.time() + seconds
            while loop.time() < end:
                sent += 1
                g.driver.set_util(sent % 4, 100 + 800 * (sent // 4 % 2))
                g.driver.flush()
                await asyncio.sleep(0.001)
            return g.driver.stats.kicks - kicks0

        warm_kicks = await load(0.3)  # kicked at first, busy after one window
        assert warm_kicks >= 1
        polls0, batches0 = slot.counters.get("polls"), g.driver.stats.batches
        busy_kicks = await load(0.5)
        # Busy: the device asks for a kick only after half the ring, more than arrives between two polls.
        assert busy_kicks == 0, busy_kicks
        assert g.driver.stats.batches - batches0 > 50
        assert (q.avail_event - q.avail_idx) & 0xFFFF > 1
        assert slot.counters.get("polls") > polls0
        await until(lambda: slot.counters.get("records") == g.driver.stats.records, what="every record")
        assert (slot.device._lane_slot is not None) == (path == "kick-lane")
        # Quiet: within a window or two the device asks for the very next buffer again...
        await until(lambda: q.avail_event == q.avail_idx, timeout=2.0, what="the device to want kicks again")
        polls1 = slot.counters.get("polls")
        await asyncio.sleep(0.1)
        assert slot.counters.get("polls") == polls1  # ...and stopped polling
        # ...so a lone rise is kicked at once and decided.
        kicks = g.driver.stats.kicks
        g.driver.set_util(0, 1024)
        g.driver.flush()
        assert g.driver.stats.kicks == kicks + 1
        await until(lambda: slot.counters.get("records") == g.driver.stats.records, what="the lone rise")
        assert slot.device.vcpus[0].util == 1024
        assert pol.vms["vm"].engine.vcpus[0] == 160  # vCPU 0's capacity: the rise was decided on
    finally:
        del q  # no view of guest RAM may outlive the guest's close (it unmaps and closes the memfd)
        await g.close()
        await svc.close()
