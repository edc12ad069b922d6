"""Actuators on real threads of a child process: sched_setaffinity, sched_getattr/setattr, restore."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from vhost_user_cpufreq.backend.host import sched
from vhost_user_cpufreq.backend.host.actuators import CgroupClampActuator, ThreadActuator
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.host.statefile import StateFile

CHILD = """
import threading, time, sys
def idle(): time.sleep(60)
for _ in range(3): threading.Thread(target=idle, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child_threads() -> Iterator[list[int]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    tids = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
    yield tids
    p.kill()
    p.wait()


def test_sched_getattr_reads_a_real_thread(child_threads: list[int]) -> None:
    a = sched.sched_getattr(child_threads[1])
    assert a.policy == 0  # SCHED_OTHER, as Python threads start
    assert sched.SCHED_ATTR_SIZE == 56


def test_clamps_are_set_or_refused_with_eopnotsupp_as_this_kernel_dictates(child_threads: list[int]) -> None:
    tid = child_threads[1]
    reason = sched.probe_uclamp()
    if reason is None:
        sched.sched_setattr_clamp(tid, 300)
        a = sched.sched_getattr(tid)
        assert a.util_min == 300
        assert a.flags & sched.SCHED_FLAG_RESET_ON_FORK  # a thread it forks does not inherit the boost
        sched.sched_setattr_clamp(tid, 0, reset_on_fork=False)
        a = sched.sched_getattr(tid)
        assert a.util_min == 0 and not a.flags & sched.SCHED_FLAG_RESET_ON_FORK
    else:
        if os.environ.get("VUC_REQUIRE_UCLAMP") == "1":  # set where the kernel has them: the test host
            pytest.fail(f"VUC_REQUIRE_UCLAMP=1 but {reason}", pytrace=False)
        # This kernel has no CONFIG_UCLAMP_TASK: the real syscall says EOPNOTSUPP.
        with pytest.raises(sched.UclampUnsupported) as ei:
            sched.sched_setattr_clamp(tid, 300)
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "CONFIG_UCLAMP_TASK" in reason


def test_clamping_a_thread_that_does_not_exist_fails_with_esrch() -> None:
    with pytest.raises(OSError) as ei:
        sched.sched_getattr(2**22 + 12345)
    assert ei.value.errno == errno.ESRCH


def test_pin_then_restore_puts_the_original_affinity_back(child_threads: list[int]) -> None:
    tid = child_threads[2]
    original = os.sched_getaffinity(tid)
    target = max(original)
    c = Counters()
    act = ThreadActuator(c)
    assert act.pin(tid, target)
    assert os.sched_getaffinity(tid) == {target}
    assert act.clamp(tid, 512)
    assert act.clamps[tid] == 512
    assert c.get("clamps_applied" if act.degraded is None else "clamps_recorded") == 1
    act.restore_all()
    assert os.sched_getaffinity(tid) == original
    assert act.originals == {} and c.get("restored") == 1


def test_dry_run_touches_nothing(child_threads: list[int]) -> None:
    tid = child_threads[1]
    original = os.sched_getaffinity(tid)
    act = ThreadActuator(Counters(), dry_run=True)
    assert act.pin(tid, min(original)) and act.clamp(tid, 700)
    assert os.sched_getaffinity(tid) == original
    assert act.degraded == "dry run: nothing is applied" and act.clamps[tid] == 700


def test_a_vanished_thread_is_counted_not_raised() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    c = Counters()
    act = ThreadActuator(c)
    assert not act.pin(p.pid, 0)
    assert c.get("pin_failed", "esrch") == 1


def test_cgroup_clamp_writes_percent_and_restores(tmp_path: Path) -> None:
    # cgroup v2's cpu controller is not enabled on this machine: a directory
    # with the same file stands in for one vCPU cgroup of libvirt's layout.
    cg = tmp_path / "vcpu0"
    cg.mkdir()
    (cg / "cpu.uclamp.min").write_text("0.00\n")
    act = CgroupClampActuator(Counters())
    assert act.clamp(cg, 512)
    assert (cg / "cpu.uclamp.min").read_text() == "50.00\n"
    act.restore_all()
    assert (cg / "cpu.uclamp.min").read_text() == "0.00\n"


def test_a_power_cap_sets_uclamp_max_lowers_a_higher_clamp_and_restore_puts_both_back(
        child_threads: list[int], tmp_path: Path) -> None:
    tid = child_threads[1]
    before = sched.sched_getattr(tid)
    c = Counters()
    state = StateFile(str(tmp_path / "state.json"))
    act = ThreadActuator(c, state=state)
    assert act.clamp(tid, 700)
    # Written ahead: the original clamps (uclamp_max included) are on disk before the thread changes.
    rec = json.loads((tmp_path / "state.json").read_text())["threads"][0]
    assert (rec["tid"], rec["util_min"], rec["util_max"]) == (tid, before.util_min, before.util_max)
    assert act.cap(tid, 400)
    assert act.caps[tid] == 400
    if act.degraded is None:
        a = sched.sched_getattr(tid)
        # The kernel refuses uclamp_min > uclamp_max: the clamp came down with the cap.
        assert (a.util_min, a.util_max) == (400, 400) and act.clamps[tid] == 400
        assert c.get("caps_applied") == 1
        assert act.cap(tid, None)  # the cap taken away: the thread's own uclamp_max again
        assert sched.sched_getattr(tid).util_max == before.util_max and tid not in act.caps
        assert act.cap(tid, 600)
        assert sched.sched_getattr(tid).util_max == 600
    else:
        if os.environ.get("VUC_REQUIRE_UCLAMP") == "1":
            pytest.fail(f"VUC_REQUIRE_UCLAMP=1 but {act.degraded}", pytrace=False)
        assert c.get("caps_recorded") == 1  # no CONFIG_UCLAMP_TASK here: recorded, as clamps are
    act.restore_all()
    after = sched.sched_getattr(tid)
    assert (after.util_min, after.util_max) == (before.util_min, before.util_max)
    assert act.caps == {} and json.loads((tmp_path / "state.json").read_text())["threads"] == []


def test_cgroup_power_cap_writes_uclamp_max_and_restores(tmp_path: Path) -> None:
    cg = tmp_path / "vcpu0"
    cg.mkdir()
    (cg / "cpu.uclamp.min").write_text("0.00\n")
    (cg / "cpu.uclamp.max").write_text("max\n")
    c = Counters()
    act = CgroupClampActuator(c)
    assert act.cap(cg, 768)
    assert (cg / "cpu.uclamp.max").read_text() == "75.00\n" and act.max_values[cg] == 768
    assert act.cap(cg, None)  # taken away: back to what it was
    assert (cg / "cpu.uclamp.max").read_text() == "max\n" and cg not in act.max_values
    assert act.cap(cg, 512) and act.clamp(cg, 300)
    act.restore_all()
    assert (cg / "cpu.uclamp.max").read_text() == "max\n" and (cg / "cpu.uclamp.min").read_text() == "0.00\n"
    missing = tmp_path / "gone"
    assert not act.cap(missing, 512) and c.get("cap_failed", "enoent") == 1
