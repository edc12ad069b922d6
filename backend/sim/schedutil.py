"""schedutil on one frequency domain, with uclamp, rate limit and transition latency.

Theory of operation (kernel/sched/cpufreq_schedutil.c): a CPU's util is its
run queue's util_avg, or while a task is enqueued the larger of that and the
task's util_est (kernel/sched/fair.c ``cpu_util``), clamped by the run
queue's uclamp values while a task is runnable (an idle CPU's blocked util
is not boosted by ``uclamp_min``, kernel/sched/core.c
``uclamp_rq_util_with`` / ``UCLAMP_FLAG_IDLE``).  The domain's target is
``1.25 * f_max * util / capacity`` of its busiest CPU
(``sugov_effective_cpu_perf`` adds the 25% to util, capped at capacity),
resolved to the lowest OPP at or above it (CPUFREQ_RELATION_L).  A new
frequency is chosen at most once per ``rate_limit`` since the last change
(``sugov_should_update_freq``; the rate limit is
``min(transition_latency * 1000, 2 ms)`` in cpufreq.c, 2 ms on these
hosts) and takes effect ``transition`` seconds later (the DT
``clock-latency-ns``).
"""

from __future__ import annotations

from .hostmodel import Domain

__all__ = ["RATE_LIMIT_S", "target_khz", "effective_util", "DomainGovernor"]

RATE_LIMIT_S = 0.002


def effective_util(util: float, runnable: bool, uclamp_min: int, uclamp_max: int, capacity: int,
                   util_est: float = 0.0) -> float:
    """The util schedutil sees for one CPU, capped at the CPU's capacity (``util_est``: its enqueued task's)."""
    if runnable:
        util = max(util, util_est, uclamp_min)
    util = min(util, uclamp_max)
    return min(util, capacity)


def target_khz(dom: Domain, util: float, cur_khz: int | None = None) -> int:
    """schedutil's pick for ``util`` on ``dom`` (``get_next_freq`` then RELATION_L).

    With ``cur_khz``, the pick of a kernel without frequency invariance (x86
    without APERF/MPERF, as under TCG): ``get_capacity_ref_freq`` scales from
    1.25 times the current frequency instead of the maximum, on top of the
    25% already added to util, so the request rises only above util 655.
    """
    perf = min(1.25 * util, dom.capacity)
    ref = dom.max_khz if cur_khz is None else 1.25 * cur_khz
    return dom.opp_at_least(ref * perf / dom.capacity).khz


class DomainGovernor:
    """The frequency of one domain over time: decisions, latency, and the speed of a step."""

    def __init__(self, dom: Domain, rate_limit: float = RATE_LIMIT_S, invariant: bool = True) -> None:
        self.dom = dom
        self.rate_limit = rate_limit
        self.invariant = invariant  # False: a kernel without frequency invariance (see target_khz)
        self.cur_khz = dom.min_khz
        self.last_change = float("-inf")
        self._pending: list[tuple[float, int]] = []  # (when it lands, kHz)
        self.changes = 0

    def update(self, now: float, utils: list[float], hold: bool = False) -> None:
        """A scheduler event at ``now`` with each CPU's effective util.

        ``hold``: the domain is one CPU that has not been idle since the last
        look, and a fall would be premature (``sugov_hold_freq``; shared
        domains have no such rule)."""
        if now - self.last_change < self.rate_limit - 1e-12:
            return
        latest = self._pending[-1][1] if self._pending else self.cur_khz
        want = target_khz(self.dom, max(utils) if utils else 0.0, cur_khz=None if self.invariant else latest)
        if want == latest or (hold and want < latest):
            return
        self.last_change = now
        self._pending.append((now + self.dom.transition_s, want))
        self.changes += 1

    def segments(self, t0: float, t1: float) -> list[tuple[float, int]]:
        """The (duration, kHz) pieces of [t0, t1); applies the changes that land in it."""
        out: list[tuple[float, int]] = []
        t = t0
        while self._pending and self._pending[0][0] < t1:
            when, khz = self._pending.pop(0)
            if when > t:
                out.append((when - t, self.cur_khz))
                t = when
            self.cur_khz = khz
        out.append((t1 - t, self.cur_khz))
        return out
