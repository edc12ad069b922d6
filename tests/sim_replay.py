"""The simulator's PELT, util_est and schedutil replayed on what a real kernel ran, beside what it showed.

The test host's PELT probe (tests/testhost/pelt_probe.py) records, per
duty-cycle load, the kernel's own timeline of the load's thread on CPU 1
(every context switch and tick, traced) and samples of its
``se.avg.util_avg``, ``runnable_avg``, ``util_est`` and
``last_update_time`` (the PELT clock when the kernel last updated them).
:func:`replay` feeds that timeline, not the duty cycle the load asked for
(under TCG the two differ by 5-20%), to the simulator's own
:class:`~vhost_user_cpufreq.backend.sim.pelt.Pelt`,
:class:`~vhost_user_cpufreq.backend.sim.pelt.UtilEst` and
:class:`~vhost_user_cpufreq.backend.sim.schedutil.DomainGovernor`.

Two facts of the kernel shape the comparison.  ``/proc/PID/sched`` shows a
thread's PELT as of its last update, not as of the read: a sleeping
thread's util is the one it had when it went to sleep, the peak of its
sawtooth.  So each kernel sample is compared with the simulator's util at
that sample's ``last_update_time``, mapped to the monotonic clock by the
dequeues (a sleeping thread's last update is its switch-out).  And
schedutil looks only at scheduler events: wake-up (util_est counted),
sleep (not counted), ticks while the thread runs; on a one-CPU policy it
never lowers the frequency before the CPU has idled since its last look.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from vhost_user_cpufreq.backend.sim.hostmodel import Domain, Opp
from vhost_user_cpufreq.backend.sim.pelt import Pelt, UtilEst
from vhost_user_cpufreq.backend.sim.schedutil import DomainGovernor

from .testhost.duty import step_mean

__all__ = ["SETTLE", "TARGET", "KERNEL_TIPPING", "DISTURBED", "clock_offset", "replay", "replay_all", "check"]

SETTLE = 1.0  # seconds of each load before the comparison window (PELT's ramp)
TARGET = 0.10  # the simulator within 10% of the kernel (issue 21)
#: the kernel's util at which a non-invariant schedutil request leaves the bottom: 1024 / 1.25 / 1.25
#: (sugov_effective_cpu_perf's 25% on util, get_capacity_ref_freq's 1.25 x the current frequency)
KERNEL_TIPPING = 1024 / 1.25 / 1.25
DISTURBED = 0.02  # a load that shared its CPU more than this tells nothing of schedutil's answer to it alone


@dataclass(frozen=True)
class _Ev:
    t: float
    kind: str  # "in" (switched in), "sleep" (out, dequeued), "preempt" (out, still runnable), "idle", "tick"


def _timeline(load: dict) -> list[_Ev]:  # type: ignore[type-arg]
    tid = load["tid"]
    evs = []
    for sw in load["switches"]:
        t, prev, state, nxt = sw[:4]
        if prev == tid:
            evs.append(_Ev(t, "preempt" if state.startswith("R") else "sleep"))
        if nxt == tid:
            evs.append(_Ev(t, "in"))
        elif nxt == 0:
            evs.append(_Ev(t, "idle"))
    evs += [_Ev(t, "wake") for t, pid in load.get("wakeups", ()) if pid == tid]
    evs += [_Ev(t, "tick") for t in load["ticks"]]
    return sorted(evs, key=lambda e: e.t)


def _others(load: dict, start: float, end: float) -> float:  # type: ignore[type-arg]
    """The share of [start, end) the CPU ran anything but the load and the idle task."""
    busy, cur, since = 0.0, None, start
    for sw in load["switches"]:
        t, nxt = sw[0], sw[3]
        if cur not in (None, 0, load["tid"]):
            busy += max(0.0, min(t, end) - max(since, start))
        cur, since = nxt, t
    return busy / (end - start)


def _asleep_offsets(load: dict, evs: list[_Ev]) -> list[float]:  # type: ignore[type-arg]
    """Monotonic minus PELT clock (s) at each sample taken while the thread slept: its last update was
    its switch-out."""
    outs = [e for e in evs if e.kind in ("sleep", "in")]
    offs = []
    j = 0
    for s in load["samples"]:
        now, lut = s[0], s[5]
        while j + 1 < len(outs) and outs[j + 1].t <= now:
            j += 1
        # Asleep at the sample, and long enough after it that the read cannot straddle a wake-up.
        if outs and outs[j].t <= now and outs[j].kind == "sleep" and (j + 1 == len(outs) or outs[j + 1].t > now + 0.001):
            offs.append(outs[j].t - lut / 1e9)
    return offs


def clock_offset(report: dict) -> tuple[float, float]:  # type: ignore[type-arg]
    """Monotonic minus PELT clock (s) over the whole run, and its spread (median absolute deviation).

    One offset serves every load: both clocks count the same TSC, and the
    offset drifts by microseconds over a run."""
    offs = [o for load in report["loads"] for o in _asleep_offsets(load, _timeline(load))]
    if len(offs) < 10:
        raise ValueError(f"only {len(offs)} samples while asleep: cannot relate the PELT clock to the trace")
    med = statistics.median(offs)
    return med, statistics.median(abs(o - med) for o in offs)


def replay_all(report: dict) -> list[dict]:  # type: ignore[type-arg]
    """Every load of the probe's report, replayed (see :func:`replay`)."""
    off = clock_offset(report)
    return [replay(report, load, off) for load in report["loads"]]


def replay(report: dict, load: dict, clock: tuple[float, float]) -> dict:  # type: ignore[type-arg]
    """One load of the probe's report: the kernel's figures and the simulator's, side by side.

    ``clock``: :func:`clock_offset` of the report."""
    opps = sorted(report["available_khz"] or [report["min_khz"], report["max_khz"]])
    dom = Domain(report["cpu"], (report["cpu"],), tuple(Opp(f, 0.0) for f in opps), 1024, 0.0)
    rate = (report["rate_limit_us"] or 1000) / 1e6
    evs = _timeline(load)
    off, spread = clock
    samples = load["samples"]
    first = samples[0]
    t = first[5] / 1e9 + off
    util, runnable, est = Pelt(0.001, float(first[1])), Pelt(0.001, float(first[4])), UtilEst(float(first[2]))
    gov = DomainGovernor(dom, rate, invariant=report["aperfmperf"])
    gov.cur_khz = load["start_khz"]
    picks: list[tuple[float, int]] = []
    # The thread's state at the first sample's update: from the last switch before it.
    before = [e for e in evs if e.t <= t and e.kind in ("in", "sleep", "preempt")]
    running = bool(before) and before[-1].kind == "in"
    queued = bool(before) and before[-1].kind != "sleep"
    idled = False  # the CPU idled since schedutil's last look
    start, end = load["t0"] + SETTLE, samples[-1][0]
    sim_u, ker_u, sim_e, ker_e, sim_r, ker_r = [], [], [], [], [], []
    k = 0

    def advance(to: float) -> None:
        nonlocal t
        if to > t:
            util.advance(to - t, running)
            runnable.advance(to - t, queued)
            t = to

    def look(now: float, enqueued: bool) -> None:
        nonlocal idled
        if now - gov.last_change < gov.rate_limit - 1e-12:
            return
        was = gov.cur_khz
        # cpu_util(boost): the larger of util_avg and runnable_avg, and of util_est while enqueued.
        seen = max(util.util, runnable.util, est.ewma if enqueued else 0.0)
        gov.update(now, [seen], hold=not idled)
        gov.segments(now, now)  # no transition latency here: land the change now
        idled = False
        if gov.cur_khz != was:
            picks.append((now, gov.cur_khz))

    for ev in [e for e in evs if e.t > t] + [_Ev(float("inf"), "end")]:
        # The samples whose kernel update falls before this event: compare at that instant.
        while k < len(samples) and samples[k][5] / 1e9 + off <= ev.t:
            s = samples[k]
            advance(s[5] / 1e9 + off)
            if s[0] >= start:
                sim_u.append(util.util)
                ker_u.append(s[1])
                sim_e.append(est.ewma)
                ker_e.append(s[2])
                sim_r.append(runnable.util)
                ker_r.append(s[4])
            k += 1
        if ev.kind == "end":
            break
        advance(ev.t)
        if ev.kind == "wake":
            # The enqueue: schedutil looks, util_est counted.  runnable_avg is left to start at the
            # switch-in: the kernel counts little of this wait (see docs/simulator.md).
            look(ev.t, True)
        elif ev.kind == "in":
            running = queued = True
            look(ev.t, True)
        elif ev.kind == "sleep":
            running = queued = False
            est.dequeue(util.util, runnable.util)
            look(ev.t, False)
        elif ev.kind == "preempt":
            running = False
            look(ev.t, True)
        elif ev.kind == "idle":
            idled = True
        elif ev.kind == "tick" and running:
            look(ev.t, True)
    ran = sum(b - a for a, b in _runs(evs, load["t0"], end))
    k_f = step_mean(load["freqs"], start, end, load["start_khz"])
    s_f = step_mean(picks, start, end, load["start_khz"])
    mean = statistics.fmean
    rel = [(a - b) / max(1.0, b) for a, b in zip(sim_u, ker_u)]  # the simulator's util against each sample
    return {
        "load": f"{load['busy_ms']}/{load['period_ms']} ms", "asked_busy": round(load["busy_ms"] / load["period_ms"], 3),
        "ran_busy": round(ran / (end - load["t0"]), 3), "samples": len(ker_u),
        "clock_spread_us": round(spread * 1e6, 1),
        "kernel_util": round(mean(ker_u), 1), "sim_util": round(mean(sim_u), 1),
        "util_err": round(abs(mean(sim_u) - mean(ker_u)) / max(1.0, mean(ker_u)), 3),
        "util_err_p90": round(sorted(map(abs, rel))[int(0.9 * len(rel))], 3),
        # the standard error of the mean relative difference: how well this many samples judge the load
        "util_err_se": round(statistics.stdev(rel) / len(rel) ** 0.5, 4) if len(rel) > 1 else 1.0,
        "kernel_seen_max": round(max(max(u, e, r) for u, e, r in zip(ker_u, ker_e, ker_r)), 1),
        "kernel_runnable": round(mean(ker_r), 1), "sim_runnable": round(mean(sim_r), 1),
        "kernel_util_est": round(mean(ker_e), 1), "sim_util_est": round(mean(sim_e), 1),
        "util_est_err": round(abs(mean(sim_e) - mean(ker_e)) / max(1.0, mean(ker_e)), 3),
        "kernel_mean_khz": round(k_f), "sim_mean_khz": round(s_f), "freq_err": round(abs(s_f - k_f) / k_f, 3),
        "kernel_changes": len(load["freqs"]), "sim_changes": len(picks),
        "others_busy": round(_others(load, start, end), 4),
    }


def _runs(evs: list[_Ev], start: float, end: float) -> list[tuple[float, float]]:
    """The thread's running intervals, clipped to [start, end)."""
    out, since = [], None
    for e in evs:
        if e.kind == "in" and since is None:
            since = e.t
        elif e.kind in ("sleep", "preempt") and since is not None:
            out.append((max(since, start), min(e.t, end)))
            since = None
    if since is not None:
        out.append((max(since, start), end))
    return [(a, b) for a, b in out if b > a]


def check(report: dict, rows: list[dict]) -> None:  # type: ignore[type-arg]
    """What the comparison must show; an AssertionError names the load and both figures."""
    assert report["governor"] == "schedutil", report["governor"]
    assert not report["aperfmperf"], "the test host has frequency invariance: compare with invariant PELT instead"
    assert all(row["clock_spread_us"] < 100 for row in rows), rows
    # A load the kernel updated too seldom to judge (a near-busy one on a loaded machine sleeps, and so
    # updates, rarely) is left out, one at most: too seldom means that the mean difference's standard
    # error is not small beside the target.
    few = [(r["load"], r["samples"], r["util_err_se"]) for r in rows if r["util_err_se"] > TARGET / 10]
    assert len(few) <= 1, few
    rows = [r for r in rows if r["util_err_se"] <= TARGET / 10]
    bad = [(r["load"], r["kernel_util"], r["sim_util"], r["util_err"]) for r in rows if r["util_err"] > TARGET]
    assert not bad, f"util_avg: {bad}"
    bad = [(r["load"], r["kernel_util_est"], r["sim_util_est"], r["util_est_err"]) for r in rows
           if r["util_est_err"] > TARGET]
    assert not bad, f"util_est: {bad}"
    alone = [r for r in rows if r["others_busy"] <= DISTURBED]
    assert len(alone) >= len(rows) - 2, [(r["load"], r["others_busy"]) for r in rows]
    # What the model lacks (irq and RT time, iowait boost) only adds to the util schedutil sees.  So a kernel
    # request above the simulator's, for a load whose own util stayed below the kernel's tipping point (and
    # within 2 x TARGET of it), may be those inputs, which TCG on a loaded machine inflates: one such load is
    # left out and named.  A kernel below the simulator, or a load whose util crossed the point, is judged.
    lifted = [r for r in alone if r["freq_err"] > TARGET and r["kernel_mean_khz"] > r["sim_mean_khz"]
              and KERNEL_TIPPING * (1 - 2 * TARGET) <= r["kernel_seen_max"] < KERNEL_TIPPING]
    assert len(lifted) <= 1, [(r["load"], r["kernel_seen_max"], r["kernel_mean_khz"], r["sim_mean_khz"])
                              for r in lifted]
    bad = [(r["load"], r["kernel_mean_khz"], r["sim_mean_khz"], r["freq_err"]) for r in alone
           if r["freq_err"] > TARGET and r not in lifted]
    assert not bad, f"schedutil: {bad}"
