#!/usr/bin/env python3
"""Why the slowest requests were slow: the judged latency path under perf's tracepoints.

usage: bench/tail_trace.py [--n 1500] [--worst 12] [--placement scheduler|same] [--busy-before-us US]
                           [--json FILE]

Runs the daemon's path as ``bench/run.py`` judges it (a request every 6 ms, each
kicked, the guest blocking for its ack) while ``perf record`` traces scheduler,
interrupt and syscall events on every CPU in CLOCK_MONOTONIC, the clock the
bench stamps with.  Each request splits at the kick lane's wake-up (the lane
stamps it, see bench/README.md); for the requests whose kick -> lane woke took
longest, it prints what happened on the machine between the two and names the
causes it can see:

* ``ran first: NAME``   another task ran on the lane's CPU between its wake-up and its run;
* ``woken on the other CPU``  the lane was woken away from its kicker's CPU (an idle vCPU);
* ``no events for N us``  25 us or more with no event on the CPUs involved: the vCPU itself was
  not running (the hypervisor), or a long stretch of kernel code with no tracepoint;
* ``timer interrupt``   the scheduler tick (with its softirqs) came in between;
* ``other interrupts``  IPIs or device interrupts came in between;
* ``guest ran on for N us``  the kicker went on running after it woke the lane, on the lane's CPU.

As a check on the alignment, every traced sample must show the lane thread's
return from epoll_wait between the kick and the lane's own wake-up stamp.

Needs root and perf (Debian: linux-perf).  A diagnostic, not a measurement:
tracing slows every event by a few microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from stats import summary  # noqa: E402  (bench/stats.py: the percentiles every bench figure uses)

EVENTS = ("sched:sched_switch", "sched:sched_waking", "sched:sched_wakeup", "irq:irq_handler_entry",
          "irq:softirq_entry", "irq_vectors:local_timer_entry", "irq_vectors:call_function_entry",
          "irq_vectors:call_function_single_entry", "irq_vectors:reschedule_entry",
          "exceptions:page_fault_user", "exceptions:page_fault_kernel",
          "syscalls:sys_enter_write", "syscalls:sys_exit_write", "syscalls:sys_exit_epoll_wait")
INTERRUPTS = {"irq_handler_entry", "softirq_entry", "local_timer_entry", "call_function_entry",
              "call_function_single_entry", "reschedule_entry"}
STALL_NS = 25_000  # a stretch this long with no event on a CPU is reported (traced events come every few us)
_LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+(\d+)\.(\d+):\s+(\S+):\s+(.*)")


@dataclass(frozen=True, slots=True)
class Event:
    t: int  # CLOCK_MONOTONIC ns
    cpu: int
    comm: str
    tid: int
    name: str  # the tracepoint without its group
    detail: str


@dataclass
class Sample:
    index: int
    kick_ns: int
    woke_ns: int
    causes: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    epoll_exit_ns: int | None = None

    @property
    def kick_to_woke_us(self) -> float:
        return (self.woke_ns - self.kick_ns) / 1e3


def parse(text: str) -> list[Event]:
    """``perf script -F comm,tid,cpu,time,event,trace --ns`` output, in time order."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Event(int(m.group(4)) * 1_000_000_000 + int(m.group(5)), int(m.group(3)), m.group(1),
                             int(m.group(2)), m.group(6).split(":")[-1], m.group(7)))
    out.sort(key=lambda e: e.t)
    return out


def _field(detail: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=(\S+)", detail)
    return m.group(1) if m else None


def explain(s: Sample, events: list[Event], times: list[int], lane: int, guest: int) -> None:
    """Fill ``s.causes`` and ``s.timeline`` from the events between its kick and its lane's wake-up."""
    lo = bisect.bisect_left(times, s.kick_ns - 3_000)
    hi = bisect.bisect_right(times, s.woke_ns + 1_000)
    window = events[lo:hi]
    ours = {lane, guest}
    kick_cpu = next((e.cpu for e in window if e.tid == guest and e.name == "sys_enter_write"), None)
    waking = next((e for e in window if e.name == "sched_waking" and _field(e.detail, "pid") == str(lane)), None)
    # sched_waking's target_cpu is where the lane last ran; sched_wakeup's is where it was put.
    wakeup = next((e for e in window if e.name == "sched_wakeup" and _field(e.detail, "pid") == str(lane)), waking)
    lane_cpu = int(_field(wakeup.detail, "target_cpu") or -1) if wakeup is not None else kick_cpu
    cpus = {c for c in (kick_cpu, lane_cpu) if c is not None}
    seen: list[Event] = []
    for e in window:
        if e.cpu not in cpus or (e.name.startswith("sys_") and e.tid not in ours):
            continue  # other CPUs, and other processes' syscalls, say nothing about this request
        seen.append(e)
        s.timeline.append(f"{(e.t - s.kick_ns) / 1e3:8.1f} us  cpu{e.cpu}  {e.comm[:16]:16} {e.name:22} "
                          f"{re.sub(r'(prev_|next_)?prio=-?[0-9]+ ?', '', e.detail)[:90]}")
        if e.tid == lane and e.name == "sys_exit_epoll_wait" and s.kick_ns <= e.t <= s.woke_ns:
            s.epoll_exit_ns = e.t
    if waking is not None and kick_cpu is not None and lane_cpu != kick_cpu:
        s.causes.append("woken on the other CPU")
    if waking is not None:
        # The guest "ran on" from where its kick's write returned to user space, not from the wake-up:
        # a stall inside the write is reported as a stall.
        back = next((e.t for e in seen if e.tid == guest and e.name == "sys_exit_write" and e.t >= waking.t),
                    waking.t)
        for e in seen:
            if e.t < waking.t or e.t > s.woke_ns or e.name != "sched_switch" or e.cpu != lane_cpu:
                continue
            nxt = _field(e.detail, "next_comm") or "?"
            nxt_pid = _field(e.detail, "next_pid")
            if nxt_pid not in (str(lane), str(guest), "0"):
                s.causes.append(f"ran first: {re.sub(r'[/:.-]?[0-9]+$', '', nxt)}")
            if nxt_pid == str(lane):
                if _field(e.detail, "prev_pid") == str(guest) and e.t - back > 20_000:
                    s.causes.append(f"guest ran on for {(e.t - back) / 1e3:.0f} us")
                break
    # A stretch with no event, unless it starts where another task was switched in (that task ran)
    # or where the guest's write returned to user space (the guest ran on: reported above).
    inside = [e for e in seen if s.kick_ns <= e.t <= s.woke_ns]

    def stall_may_start(e: Event) -> bool:
        if e.name == "sched_switch":
            return _field(e.detail, "next_pid") in (str(lane), str(guest), "0")
        return not (e.tid == guest and e.name == "sys_exit_write")

    starts = [(s.kick_ns, True)] + [(e.t, stall_may_start(e)) for e in inside]
    ends = [e.t for e in inside] + [s.woke_ns]
    gap = max((b - a for (a, may), b in zip(starts, ends) if may), default=0)
    if gap >= STALL_NS:
        s.causes.append(f"no events for {gap / 1e3:.0f} us")
    if any(e.name == "local_timer_entry" for e in inside):
        s.causes.append("timer interrupt")
    if any(e.name in INTERRUPTS - {"local_timer_entry", "softirq_entry"} for e in inside):
        s.causes.append("other interrupts")


async def _measure(n: int, placement: str, perf_out: str, tmp: str, busy_before_us: int | None) -> dict[str, Any]:
    import guestlib  # the bench's modules load only for a real run, not for parse() and explain()
    import harness

    async with harness.Backend(tmp, vms=1, vcpus=8, stamps=True, policy="engine", kick_batch_delay=0.0) as be:
        g = await guestlib.connect_guest(be.sock(0), lazy_records=0)
        mine = os.sched_getaffinity(0)
        try:
            await asyncio.sleep(0.1)  # the lane thread exists once the ring is served
            if placement == "same":
                harness.pin_process(be.pid, 0)
                os.sched_setaffinity(0, {0})
            threads = {int(t) for t in os.listdir(f"/proc/{be.pid}/task")}
            perf = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-o", perf_out]
                                    + [x for e in EVENTS for x in ("-e", e)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # perf opens its events on every CPU
            if perf.poll() is not None:
                raise RuntimeError(f"perf record failed: {perf.stderr.read().decode()[-300:] if perf.stderr else ''}")
            assert be.stamps is not None
            if busy_before_us is None:
                lat = guestlib.latency_inprocess(g, be.stamps, 0, 8, 8, n, 6000, warmup=20)
                kicks, k2w = lat.split_kick_at_ns, lat.kick_to_lane_woke_ns
            else:  # a vCPU that spins before its kick and on after it (bench/run.py's busy_vcpu)
                busy = guestlib.BusyVcpu(g, be.stamps, 0, 8, 8)
                busy.run(n, 6000, busy_before_us)
                kicks, k2w = busy.split_kick_at_ns, busy.kick_to_lane_woke_ns
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
        finally:
            os.sched_setaffinity(0, mine)
            await g.close()
    return {"kicks": kicks, "k2w": k2w, "guest": os.getpid(), "backend": be.pid, "threads": sorted(threads)}


def analyse(m: dict[str, Any], events: list[Event], worst: int) -> dict[str, Any]:
    times = [e.t for e in events]
    woke = [k + w for k, w in zip(m["kicks"], m["k2w"])]
    # The lane is the back-end thread whose epoll_wait returns match the wake-up stamps.
    exits = {t: [e.t for e in events if e.tid == t and e.name == "sys_exit_epoll_wait"] for t in m["threads"]}

    def matches(tid: int) -> int:
        ts = exits[tid]
        return sum(1 for k, w in zip(m["kicks"], woke)
                   if (i := bisect.bisect_right(ts, w)) and k <= ts[i - 1] <= w)

    lane = max(m["threads"], key=matches)
    order = sorted(range(len(woke)), key=lambda i: -m["k2w"][i])[:worst]
    samples = []
    for i in sorted(order):
        s = Sample(i, m["kicks"][i], woke[i])
        explain(s, events, times, lane, m["guest"])
        samples.append(s)
    counts: dict[str, int] = {}
    for s in samples:
        for c in {re.sub(r"[0-9]+ us", "N us", c) for c in s.causes} or {"none seen"}:
            counts[c] = counts.get(c, 0) + 1
    k2w = summary(m["k2w"], "us", 1e-3)
    return {"n": k2w["n"], "lane_tid": lane, "guest_pid": m["guest"],
            "kick_to_lane_woke_p50_us": k2w["median"], "kick_to_lane_woke_p99_us": k2w["p99"],
            "aligned": sum(1 for s in samples if s.epoll_exit_ns is not None),
            "causes": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "samples": [{"index": s.index, "kick_to_lane_woke_us": round(s.kick_to_woke_us, 1), "causes": s.causes,
                         "lane_epoll_exit_us": None if s.epoll_exit_ns is None
                         else round((s.epoll_exit_ns - s.kick_ns) / 1e3, 1),
                         "timeline": s.timeline} for s in samples]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1500, help="requests (one every 6 ms)")
    p.add_argument("--worst", type=int, default=12, help="how many of the slowest wake-ups to explain")
    p.add_argument("--placement", choices=("scheduler", "same"), default="scheduler",
                   help="where the scheduler puts guest and back-end, or both pinned to CPU 0")
    p.add_argument("--busy-before-us", type=int, default=None,
                   help="a vCPU that spins this long before each kick and on after it, pinned with the "
                        "back-end to CPU 0 (bench/run.py's busy_vcpu), instead of one that blocks for its ack")
    p.add_argument("--json", help="write the analysis here")
    p.add_argument("--quiet", action="store_true", help="summary only, no timelines")
    a = p.parse_args()
    if shutil.which("perf") is None:
        print("tail_trace: perf is not installed (Debian: linux-perf)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("tail_trace: tracing every CPU needs root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vuc-tail-") as tmp:
        data = os.path.join(tmp, "perf.data")
        if a.busy_before_us is not None:
            a.placement = "same"
        m = asyncio.run(_measure(a.n, a.placement, data, tmp, a.busy_before_us))
        text = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,cpu,time,event,trace", "--ns"],
                              capture_output=True, text=True, check=True).stdout
    r = analyse(m, parse(text), a.worst)
    r["placement"] = a.placement
    r["busy_before_us"] = a.busy_before_us
    what = "" if a.busy_before_us is None else f", a vCPU busy {a.busy_before_us} us before and on after each kick"
    print(f"{r['n']} requests, {a.placement} placement{what}; kick -> lane woke p50 {r['kick_to_lane_woke_p50_us']:.1f} us, "
          f"p99 {r['kick_to_lane_woke_p99_us']:.1f} us (traced: every event costs a few us more)")
    print(f"the {len(r['samples'])} slowest wake-ups; lane epoll_wait return seen inside {r['aligned']} of them")
    for s in r["samples"]:
        print(f"--- request {s['index']}: kick -> lane woke {s['kick_to_lane_woke_us']} us: "
              f"{'; '.join(s['causes']) or 'none seen'}")
        if not a.quiet:
            print("\n".join("    " + t for t in s["timeline"]))
    print("causes: " + ", ".join(f"{k} {v}" for k, v in r["causes"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
