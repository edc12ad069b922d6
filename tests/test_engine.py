"""The policy engine (backend/policy/engine.py): pure functions and the clamp state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vhost_user_cpufreq.backend.policy.engine import (
    ClampEngine,
    EngineConfig,
    VcpuPlacement,
    VmLimits,
    bound,
    clamp_percent,
    domain_cap,
    domain_clamps,
    effective_cap,
    perf_to_clamp,
    plan_pinning,
    util_to_clamp,
)

BIG = VcpuPlacement(0, 6, 1024, 1024, 2802000)
LITTLE = VcpuPlacement(1, 0, 160, 160, 1803000)
CFG = EngineConfig(hysteresis=32, min_interval=0.01, stale_after=0.5)


def test_util_is_scaled_by_vcpu_capacity_and_capped_by_the_pcpu() -> None:
    assert util_to_clamp(512, 1024, 1024) == 512
    assert util_to_clamp(1024, 160, 160) == 160  # a saturated little vCPU on a little pCPU
    assert util_to_clamp(512, 1024, 498) == 498  # a big vCPU's half is more than a mid pCPU has
    assert util_to_clamp(1024, 160, 1024) == 160  # a little vCPU on a big pCPU needs only 160


def test_frequency_requests_pay_schedutil_headroom_once() -> None:
    # Asking for the top frequency: schedutil reaches f_max at util = capacity / 1.25 = 0.8 * capacity.
    assert perf_to_clamp(2802000, 2802000, 1024, 0.8) == 819
    assert perf_to_clamp(1401000, 2802000, 1024, 0.8) == 409
    assert perf_to_clamp(9_999_999, 2802000, 1024, 0.8) == 819  # above max is max
    assert perf_to_clamp(100, 0, 1024, 0.8) == 0


@given(st.integers(0, 4096), st.integers(0, 1024), st.integers(0, 1024), st.integers(1, 1024))
def test_bound_stays_within_floor_ceiling_and_pcpu(value: int, a: int, b: int, cap: int) -> None:
    lim = VmLimits(min(a, b), max(a, b))
    out = bound(value, lim, cap)
    assert min(lim.floor, cap) <= out <= min(lim.ceiling, cap)


def test_first_request_applies_then_hysteresis_holds_small_moves() -> None:
    e = ClampEngine([BIG], VmLimits(), CFG)
    assert [c.uclamp_min for c in e.on_record(0, 500, 0, 0.0)] == [500]
    assert e.on_record(0, 520, 0, 1.0) == []  # 20 < hysteresis 32
    assert [c.uclamp_min for c in e.on_record(0, 540, 0, 2.0)] == [540]
    assert [c.uclamp_min for c in e.on_record(0, 1024, 0, 3.0)] == [1024]
    assert [c.uclamp_min for c in e.on_record(0, 1010, 0, 4.0)] == []
    assert [c.uclamp_min for c in e.on_record(0, 0, 0, 5.0)] == [0]


def test_changes_are_rate_limited_per_vcpu_and_the_newest_value_wins() -> None:
    e = ClampEngine([BIG, LITTLE], VmLimits(), CFG)
    assert len(e.on_record(0, 100, 0, 0.0)) == 1
    assert e.on_record(0, 600, 0, 0.001) == []
    assert e.on_record(0, 800, 0, 0.002) == []
    assert len(e.on_record(1, 1024, 0, 0.002)) == 1  # other vCPUs are not held back
    assert e.next_deadline() == pytest.approx(0.01)
    assert e.tick(0.005) == []
    changes = e.tick(0.01)
    assert [(c.vcpu, c.uclamp_min, c.reason) for c in changes] == [(0, 800, "deferred")]


def test_a_silent_guest_loses_its_boost() -> None:
    e = ClampEngine([BIG], VmLimits(floor=64), CFG)
    e.on_record(0, 900, 0, 0.0)
    assert e.tick(0.4) == []
    assert e.next_deadline() == pytest.approx(0.5)
    assert [(c.uclamp_min, c.reason) for c in e.tick(0.5)] == [(64, "stale")]
    assert e.next_deadline() is None


def test_ceiling_and_floor_bound_every_request() -> None:
    e = ClampEngine([BIG], VmLimits(floor=100, ceiling=600), CFG)
    assert e.on_record(0, 1024, 0, 0.0)[0].uclamp_min == 600
    assert e.on_record(0, 0, 0, 1.0)[0].uclamp_min == 100


def test_release_all_returns_every_touched_vcpu_to_no_boost() -> None:
    e = ClampEngine([BIG, LITTLE], VmLimits(), CFG)
    e.on_record(0, 700, 0, 0.0)
    assert [(c.vcpu, c.uclamp_min) for c in e.release_all()] == [(0, 0)]
    assert e.vcpus == {0: 0, 1: None}


events = st.lists(
    st.tuples(st.sampled_from(["rec", "tick"]), st.integers(0, 1), st.integers(0, 1024), st.integers(0, 3_000_000),
              st.floats(0, 0.2)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(0, 512), st.integers(512, 1024))
def test_engine_invariants_hold_for_any_sequence(evs, floor: int, ceiling: int) -> None:  # type: ignore[no-untyped-def]
    lim = VmLimits(floor, ceiling)
    e = ClampEngine([BIG, LITTLE], lim, CFG)
    now = 0.0
    last_change: dict[int, float] = {}
    for kind, vcpu, util, perf, dt in evs:
        now += dt
        changes = e.on_record(vcpu, util, perf if perf % 3 == 0 else 0, now) if kind == "rec" else e.tick(now)
        for c in changes:
            cap = e.placement(c.vcpu).pcpu_capacity
            assert bound(c.uclamp_min, lim, cap) == c.uclamp_min  # always within limits
            assert now - last_change.get(c.vcpu, -1.0) >= CFG.min_interval  # rate limit
            last_change[c.vcpu] = now
    # Whatever happened, silence plus time brings every vCPU to the floor.
    e.tick(now + 10)
    e.tick(now + 20)
    for v, applied in e.vcpus.items():
        assert applied is None or applied == bound(0, lim, e.placement(v).pcpu_capacity)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(0, 1024), st.integers(0, 1024), st.integers(0, 1024),
       st.sampled_from([1024, 0, 300]) | st.integers(0, 1024), st.sampled_from([1024, 130]) | st.integers(0, 1024),
       st.booleans())
def test_caps_bound_every_clamp(evs, a: int, b: int, c: int, cap0: int, cap1: int,  # type: ignore[no-untyped-def]
                                release: bool) -> None:
    floor, ceiling, vm_cap = sorted((a, b, c))[0], sorted((a, b, c))[2], sorted((a, b, c))[1]
    lim = VmLimits(floor, ceiling, vm_cap)
    places = [VcpuPlacement(0, 6, 1024, 1024, 2802000, 1, cap0), VcpuPlacement(1, 0, 160, 160, 1803000, 0, cap1)]
    e = ClampEngine(places, lim, CFG)
    top = {p.vcpu: min(cap0 if p.vcpu == 0 else cap1, vm_cap) for p in places}
    assert {p.vcpu: effective_cap(p, lim) for p in places} == top
    now = 0.0
    for kind, vcpu, util, perf, dt in evs:
        now += dt
        changes = e.on_record(vcpu, util, perf if perf % 3 == 0 else 0, now) if kind == "rec" else e.tick(now)
        if release and util % 7 == 0:
            changes += e.release_all()
        for ch in changes:
            assert ch.uclamp_min <= top[ch.vcpu]  # the floor too: the kernel refuses uclamp_min > uclamp_max
        for v, applied in e.vcpus.items():
            assert applied is None or applied <= top[v]


def test_a_cap_below_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="uclamp_max"):
        VmLimits(floor=300, uclamp_max=200)


def test_a_vcpu_advertised_a_lower_top_frequency_is_capped_there() -> None:
    # A vCPU promised 1.4 GHz on a 2.8 GHz pCPU: the clamp at which schedutil picks 1.4 GHz.
    assert domain_cap(1401000, 2802000, 1024, 0.8) == perf_to_clamp(1401000, 2802000, 1024, 0.8) == 409
    assert domain_cap(2802000, 2802000, 1024, 0.8) == 1024  # same top: no cap
    assert domain_cap(3000000, 2802000, 1024, 0.8) == 1024  # a faster promise is not a cap
    assert domain_cap(1401000, 0, 1024, 0.8) == 1024  # unknown pCPU top: no cap
    e = ClampEngine([VcpuPlacement(0, 6, 1024, 1024, 2802000, 0, 409)], VmLimits(floor=500), CFG)
    assert [c.uclamp_min for c in e.on_record(0, 1024, 0, 0.0)] == [409]  # floor and request, both capped


def test_domain_clamps_take_the_max_of_their_vcpus() -> None:
    assert domain_clamps({0: 100, 1: 300, 2: None, 3: 50}, {0: 0, 1: 0, 2: 1, 3: 1}) == {0: 300, 1: 50}


def test_cgroup_percent_format() -> None:
    assert clamp_percent(1024) == "100.00" and clamp_percent(0) == "0.00" and clamp_percent(512) == "50.00"
    assert clamp_percent(160) == "15.62"


PHONE = [[0, 1, 2, 3], [4, 5, 6], [7]]


def test_automatic_pinning_spreads_over_capacity_classes_little_first() -> None:
    assert plan_pinning(3, PHONE) == (0, 4, 7)
    assert plan_pinning(8, PHONE) == (0, 1, 2, 3, 4, 5, 6, 7)
    assert plan_pinning(4, PHONE, taken=[0, 1, 4]) == (2, 3, 5, 7)


def test_automatic_pinning_refuses_more_vcpus_than_free_pcpus() -> None:
    with pytest.raises(ValueError, match="free"):
        plan_pinning(9, PHONE)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.data())
def test_pinning_plans_are_one_to_one_on_free_cpus(sizes: list[int], data: st.DataObject) -> None:
    classes, c = [], 0
    for n in sizes:
        classes.append(list(range(c, c + n)))
        c += n
    taken = data.draw(st.sets(st.integers(0, c - 1)))
    free = c - len(taken)
    n = data.draw(st.integers(0, free))
    plan = plan_pinning(n, classes, taken=taken)
    assert len(plan) == n and len(set(plan)) == n and not set(plan) & taken
    nonempty = [cls for cls in classes if set(cls) - taken]
    if n >= len(nonempty):
        assert all(set(plan) & set(cls) for cls in nonempty)
