"""The simulator against a real kernel: PELT util and schedutil's request on the Linux test host.

The test host (docs/testhost.md) runs duty-cycle loads on its CPU 1, whose
cpufreq is our own virtio-cpufreq driver under schedutil
(tests/testhost/pelt_probe.py).  Here the simulator's own code is fed the
load's measured run time (``schedstat``) and must land within 10% of the
kernel's ``se.avg.util_avg`` (``backend/sim/pelt.py``), and its schedutil
(``backend/sim/schedutil.py``), driven by the simulated util, within 10% of
the mean frequency the kernel asked for.  The test host is x86 under TCG,
without APERF/MPERF, so its PELT is not frequency-invariant and schedutil
scales from the current frequency: the simulator is run the same way.
``VUC_SIM_VALIDATION_OUT=FILE`` writes the figures (docs/simulator.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vhost_user_cpufreq.backend.sim.hostmodel import Domain, Opp
from vhost_user_cpufreq.backend.sim.pelt import decay
from vhost_user_cpufreq.backend.sim.schedutil import target_khz

from .testhost.host import SRC, TestHost

SETTLE = 1.0  # seconds of each load before the comparison window (PELT's ramp)


def _mean_step(events: list[tuple[float, int]], start: float, end: float, before: int) -> float:
    cur, t, acc = before, start, 0.0
    for ts, f in events:
        if ts <= start:
            cur = f
            continue
        if ts >= end:
            break
        acc += cur * (ts - t)
        t, cur = ts, f
    return (acc + cur * (end - t)) / (end - start)


def compare(report: dict, load: dict) -> dict:  # type: ignore[type-arg]
    """The simulator's PELT and schedutil on one load's measured run time, beside the kernel's."""
    opps = report["available_khz"] or [report["min_khz"], report["max_khz"]]
    dom = Domain(1, (1,), tuple(Opp(f, 0.0) for f in sorted(opps)), 1024, 0.0)
    rate = (report["rate_limit_us"] or 1000) / 1e6
    samples = load["samples"]
    t_prev, util0, _, run_prev = samples[0]
    util = float(util0)
    cur = load["start_khz"]
    last_change = float("-inf")
    sim_u, ker_u, ker_est, sim_f = [], [], [], []
    for t, k_util, k_est, run_ns in samples[1:]:
        dt = t - t_prev
        frac = min(1.0, max(0.0, (run_ns - run_prev) / 1e9 / dt)) if dt > 0 else 0.0
        y = decay(dt)
        util = util * y + frac * 1024 * (1 - y)  # the same step as Pelt.step, at the sample's own dt
        if t - last_change >= rate:
            want = target_khz(dom, min(util, 1024), cur_khz=cur)
            if want != cur:
                cur, last_change = want, t
        if t - load["t0"] >= SETTLE:
            sim_u.append(util)
            ker_u.append(k_util)
            ker_est.append(k_est)
            sim_f.append(cur)
        t_prev, run_prev = t, run_ns
    start, end = load["t0"] + SETTLE, samples[-1][0]
    k_f = _mean_step(load["freqs"], start, end, load["start_khz"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    busy = (samples[-1][3] - samples[0][3]) / 1e9 / (samples[-1][0] - samples[0][0])
    return {
        "load": f"{load['busy_ms']}/{load['period_ms']} ms", "measured_busy": round(busy, 3),
        "kernel_util": round(mean(ker_u), 1), "sim_util": round(mean(sim_u), 1),
        "util_err": round(abs(mean(sim_u) - mean(ker_u)) / max(1.0, mean(ker_u)), 3),
        "kernel_util_est": round(mean(ker_est), 1),
        "kernel_mean_khz": round(k_f), "sim_mean_khz": round(mean(sim_f)),
        "freq_err": round(abs(mean(sim_f) - k_f) / k_f, 3), "freq_changes": len(load["freqs"]),
    }


@pytest.mark.xfail(strict=True, reason="2026-12-05: simulated util 8-16% below the kernel's, requests 24-75% off "
                   "(docs/simulator.md: per-interval clipping of TCG's lumpy schedstat, and no util_est)")
def test_simulated_pelt_and_schedutil_match_the_test_hosts_kernel_within_10_percent(testhost: TestHost) -> None:
    r = testhost.sh(f"cd {SRC} && /opt/vuc/bin/python -m tests.testhost.pelt_probe", timeout=300).check()
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["governor"] == "schedutil", report["governor"]
    rows = [compare(report, load) for load in report["loads"]]
    out = os.environ.get("VUC_SIM_VALIDATION_OUT")
    if out:
        Path(out).write_text(json.dumps({"aperfmperf": report["aperfmperf"], "rate_limit_us": report["rate_limit_us"],
                                         "available_khz": report["available_khz"], "rows": rows}, indent=1))
    for row in rows:
        print(row)
    assert not report["aperfmperf"], "the test host has frequency invariance: compare with invariant PELT instead"
    bad = [row for row in rows if row["util_err"] > 0.10]
    assert not bad, bad
    bad = [row for row in rows if row["freq_err"] > 0.10]
    assert not bad, bad
