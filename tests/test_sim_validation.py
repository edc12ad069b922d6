"""The simulator against a real kernel: PELT util, util_est and schedutil's request, replayed offline.

``tests/fixtures/testhost-pelt-probe.json.gz`` is one run of the test host's
PELT probe (tests/testhost/pelt_probe.py), kept by
tests/test_testhost.py with ``VUC_PELT_PROBE_RECORD=FILE``: per duty-cycle
load, the kernel's own timeline of the thread (every wake-up, context switch
and tick on its CPU), its PELT figures as ``/proc`` showed them, and every
frequency schedutil set.  tests/sim_replay.py feeds that timeline to the
simulator's PELT, util_est and schedutil and compares.  The same comparison
runs live on a freshly booted test host (tests/test_testhost.py); this one
needs no QEMU, so a change to the model that breaks the agreement fails here
at once.  Figures and what they mean: docs/simulator.md.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from .sim_replay import DISTURBED, KERNEL_TIPPING, TARGET, check, replay_all

FIXTURE = Path(__file__).parent / "fixtures" / "testhost-pelt-probe.json.gz"


@pytest.fixture(scope="module")
def recorded() -> tuple[dict, list[dict]]:  # type: ignore[type-arg]
    report = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    return report, replay_all(report)


def test_the_recorded_run_is_schedutil_on_a_non_invariant_kernel_with_the_load_alone_on_its_cpu(
        recorded: tuple[dict, list[dict]]) -> None:  # type: ignore[type-arg]
    report, rows = recorded
    assert report["governor"] == "schedutil" and not report["aperfmperf"] and report["rate_limit_us"] == 1000
    assert len(rows) == 6 and all(r["others_busy"] <= DISTURBED for r in rows), rows
    # The PELT clock is tied to the trace's to within tens of microseconds (samples 5+ ms apart).
    assert all(r["clock_spread_us"] < 100 and r["samples"] >= 40 for r in rows), rows


def test_simulated_util_avg_util_est_and_requests_are_within_10_percent_of_the_kernels(
        recorded: tuple[dict, list[dict]]) -> None:  # type: ignore[type-arg]
    check(*recorded)


@pytest.mark.parametrize("flaw", ["no util_est", "one 25% margin"])
def test_the_comparison_fails_the_model_this_replaced(recorded: tuple[dict, list[dict]], flaw: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    """The check can fail: without util_est, or with the simulator's former non-invariant pick (one 25%
    margin, not two), the replay misses the kernel by far more than 10%."""
    from vhost_user_cpufreq.backend.sim import pelt, schedutil
    from vhost_user_cpufreq.backend.sim.hostmodel import Domain

    if flaw == "no util_est":
        monkeypatch.setattr(pelt.UtilEst, "dequeue", lambda self, *a, **k: self.ewma)
    else:
        def one_margin(dom: Domain, util: float, cur_khz: int | None = None) -> int:
            return dom.opp_at_least(1.25 * (dom.max_khz if cur_khz is None else cur_khz) * util / dom.capacity).khz
        monkeypatch.setattr(schedutil, "target_khz", one_margin)
    report, _ = recorded
    rows = replay_all(report)
    worst = max(r["util_est_err"] if flaw == "no util_est" else r["freq_err"] for r in rows)
    assert worst > 3 * TARGET, rows
    with pytest.raises(AssertionError):
        check(report, rows)


def test_only_one_load_below_the_tipping_point_may_be_lifted_by_what_the_model_lacks(
        recorded: tuple[dict, list[dict]]) -> None:  # type: ignore[type-arg]
    """A kernel request above the simulator's is forgiven on one load whose util stayed just below the
    kernel's tipping point (irq and RT time only add); a kernel below it, a load above the point, or two
    such loads are not."""
    report, rows = recorded

    def lifted(row: dict, seen: float, kernel_khz: int = 716000) -> dict:  # type: ignore[type-arg]
        return {**row, "kernel_seen_max": seen, "kernel_mean_khz": kernel_khz, "sim_mean_khz": 500000,
                "freq_err": round(abs(500000 - kernel_khz) / kernel_khz, 3)}

    below = KERNEL_TIPPING - 40
    check(report, [lifted(rows[0], below)] + rows[1:])
    for bad in ([lifted(rows[0], KERNEL_TIPPING + 1)] + rows[1:],            # its util crossed the point
                [lifted(rows[0], below, kernel_khz=400000)] + rows[1:],       # the kernel asked for less
                [lifted(rows[0], KERNEL_TIPPING * 0.5)] + rows[1:],           # far below: not near the point
                [lifted(rows[0], below), lifted(rows[1], below)] + rows[2:]):  # two loads
        with pytest.raises(AssertionError):
            check(report, bad)
