"""bench/tail_trace.py: its reading of perf's events (synthetic traces), and one real traced run.

The real run needs root and perf: CI demands both (VUC_REQUIRE_ROOT, VUC_REQUIRE_TOOLS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import require_c_dataplane, unavailable

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import tail_trace as T  # noqa: E402

GUEST, LANE = 10, 20
T0 = 5_000_000_000  # the kick, ns


def _trace(*lines: str) -> list[T.Event]:
    """Lines of ``perf script`` output with times in microseconds after the kick."""
    out = []
    for line in lines:
        comm, tid, cpu, us, rest = line.split(" ", 4)
        t = T0 + int(float(us) * 1000)
        out.append(f"{comm} {tid} [{int(cpu):03d}] {t // 10**9}.{t % 10**9:09d}: {rest}")
    return T.parse("\n".join(out))


def _explain(events: list[T.Event], woke_us: float) -> T.Sample:
    s = T.Sample(0, T0, T0 + int(woke_us * 1000))
    T.explain(s, events, [e.t for e in events], LANE, GUEST)
    return s


WRITE = f"python {GUEST} 0 1.0 syscalls:sys_enter_write: fd: 0xf, count: 0x8"
WAKE_HERE = f"python {GUEST} 0 3.0 sched:sched_waking: comm=python pid={LANE} prio=120 target_cpu=000"


def _switch(us: float, prev: tuple[str, int], nxt: tuple[str, int], cpu: int = 0) -> str:
    return (f"{prev[0]} {prev[1]} {cpu} {us} sched:sched_switch: prev_comm={prev[0]} prev_pid={prev[1]} "
            f"prev_prio=120 prev_state=R ==> next_comm={nxt[0]} next_pid={nxt[1]} next_prio=120")


def _epoll_exit(us: float, cpu: int = 0) -> str:
    return f"python {LANE} {cpu} {us} syscalls:sys_exit_epoll_wait: 0x1"


def test_a_quick_wake_up_has_no_cause() -> None:
    s = _explain(_trace(WRITE, WAKE_HERE, _switch(5, ("python", GUEST), ("python", LANE)), _epoll_exit(7)), 8)
    assert s.causes == [] and s.epoll_exit_ns == T0 + 7000 and len(s.timeline) == 4


def test_another_task_that_ran_first_is_named_and_its_run_is_not_a_stall() -> None:
    s = _explain(_trace(WRITE, WAKE_HERE, _switch(5, ("python", GUEST), ("kdamond.0", 78)),
                        _switch(900, ("kdamond.0", 78), ("python", LANE)), _epoll_exit(905)), 906)
    assert s.causes == ["ran first: kdamond"]


def test_a_stretch_without_events_is_reported() -> None:
    s = _explain(_trace(WRITE, WAKE_HERE, _switch(5, ("python", GUEST), ("python", LANE)), _epoll_exit(75)), 76)
    assert s.causes == ["no events for 70 us"]
    short = _explain(_trace(WRITE, WAKE_HERE, _switch(5, ("python", GUEST), ("python", LANE)), _epoll_exit(27)), 28)
    assert short.causes == []  # 22 us without an event: within what tracing itself spaces events by


def test_a_wake_up_on_the_other_cpu() -> None:
    """Where the lane was put is sched_wakeup's CPU; sched_waking names the CPU it last ran on."""
    waking = f"python {GUEST} 0 3.0 sched:sched_waking: comm=python pid={LANE} prio=120 target_cpu=000"
    woken = f"python {GUEST} 0 4.0 sched:sched_wakeup: comm=python pid={LANE} prio=120 target_cpu="
    away = _explain(_trace(WRITE, waking, woken + "001", _switch(20, ("swapper/1", 0), ("python", LANE), cpu=1),
                           _epoll_exit(24, cpu=1)), 25)
    assert away.causes == ["woken on the other CPU"]
    here = _explain(_trace(WRITE, waking.replace("=000", "=001"), woken + "000",
                           _switch(5, ("python", GUEST), ("python", LANE)), _epoll_exit(7)), 8)
    assert here.causes == []


def test_the_guest_running_on_the_lanes_cpu_and_a_timer_tick() -> None:
    """The guest runs on from its write's return; a stall inside the write is a stall, not the guest."""
    s = _explain(_trace(WRITE, WAKE_HERE, f"python {GUEST} 0 5.0 syscalls:sys_exit_write: 0x8",
                        f"python {GUEST} 0 20.0 irq_vectors:local_timer_entry: vector=236",
                        f"python {GUEST} 0 35.0 irq:softirq_entry: vec=1 [action=TIMER]",
                        _switch(50, ("python", GUEST), ("python", LANE)), _epoll_exit(55)), 56)
    assert s.causes == ["guest ran on for 45 us", "timer interrupt"]
    spinning = _explain(_trace(WRITE, WAKE_HERE, f"python {GUEST} 0 5.0 syscalls:sys_exit_write: 0x8",
                               _switch(3805, ("python", GUEST), ("python", LANE)), _epoll_exit(3810)), 3811)
    assert spinning.causes == ["guest ran on for 3800 us"]  # its user-space run is not a stall
    stalled = _explain(_trace(WRITE, WAKE_HERE, f"python {GUEST} 0 45.0 syscalls:sys_exit_write: 0x8",
                              _switch(48, ("python", GUEST), ("python", LANE)), _epoll_exit(50)), 51)
    assert stalled.causes == ["no events for 42 us"]


def test_other_processes_and_uninvolved_cpus_are_left_out() -> None:
    s = _explain(_trace(WRITE, WAKE_HERE, "agent 99 0 4.0 syscalls:sys_enter_write: fd: 0x3, count: 0x8",
                        "agent 99 1 4.0 irq_vectors:local_timer_entry: vector=236",
                        _switch(5, ("python", GUEST), ("python", LANE)), _epoll_exit(7)), 8)
    assert s.causes == [] and not any("agent" in line for line in s.timeline)


def test_a_real_traced_run_lines_up_with_the_lanes_stamps(tmp_path: Path) -> None:
    """Every explained sample shows the lane's epoll_wait return between its kick and its wake-up
    stamp: perf's clock and the bench's are the same, and the lane was found."""
    require_c_dataplane()
    if os.geteuid() != 0:
        unavailable("VUC_REQUIRE_ROOT", "tracing every CPU with perf needs root")
    if shutil.which("perf") is None:
        unavailable("VUC_REQUIRE_TOOLS", "perf is not installed (Debian: linux-perf)")
    out = tmp_path / "tail.json"
    r = subprocess.run([sys.executable, str(BENCH / "tail_trace.py"), "--n", "200", "--worst", "5", "--quiet",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["n"] == 200 and len(data["samples"]) == 5
    assert data["aligned"] == 5, data["samples"]
    for s in data["samples"]:
        assert 0 <= s["lane_epoll_exit_us"] <= s["kick_to_lane_woke_us"]
        assert s["timeline"]  # at least the kick's write and the lane's return
    assert sum(data["causes"].values()) >= 5
    assert "causes:" in r.stdout
