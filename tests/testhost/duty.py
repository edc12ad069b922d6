"""Run inside the test host: a duty-cycle load, and the kernel's trace of what it made of it.

Shared by the closed loop (tests/testhost/closed_loop.py), whose "vCPU
thread" is such a load, and the PELT probe (tests/testhost/pelt_probe.py),
which runs several.  The trace (``/sys/kernel/tracing``, on the monotonic
clock so that its times compare with ``time.monotonic()``) gives every
frequency schedutil set, and, for the probe, every context switch and timer
expiry on one CPU: the kernel's own timeline of when the load ran.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

__all__ = ["duty_cycle", "trace", "frequencies", "switches", "wakeups", "ticks", "step_mean", "step_share"]

TRACING = Path("/sys/kernel/tracing")
_FREQ = re.compile(r"\s(\d+\.\d+): cpu_frequency: state=(\d+) cpu_id=(\d+)")
_SWITCH = re.compile(r"\[(\d+)\].*?\s(\d+\.\d+): sched_switch: prev_comm=.* prev_pid=(\d+) .*prev_state=(\S+) ==> "
                     r"next_comm=(.*) next_pid=(\d+) ")
_WAKE = re.compile(r"\s(\d+\.\d+): sched_wakeup: comm=.* pid=(\d+) prio=-?\d+ target_cpu=(\d+)")
_TICK = re.compile(r"\[(\d+)\].*?\s(\d+\.\d+): hrtimer_expire_entry: .*function=(\S+)")


def duty_cycle(busy: float, period: float, stop: threading.Event, *, cpu: int | None = None,
               started: list[int] | None = None, absolute: bool = True) -> None:
    """Spin ``busy`` seconds of every ``period`` until ``stop``.  With ``cpu``, pinned there first;
    ``started`` gets the thread's id.

    ``absolute``: on a fixed schedule, so a late period does not shift the
    next, and after a stall of the test host's clock the load catches up
    back to back (its mean duty holds); otherwise it sleeps ``period - busy``
    after each spin (its duty never rises above the one asked)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if started is not None:
        started.append(threading.get_native_id())
    nxt = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        while time.monotonic() - t0 < busy:
            pass
        nxt = nxt + period if absolute else time.monotonic() + period - busy
        time.sleep(max(0.0, nxt - time.monotonic()))


def trace(on: bool, *, cpu: int | None = None, timeline: bool = False) -> None:
    """Start (emptied, monotonic clock) or stop tracing schedutil's frequencies; with ``timeline``, also
    every context switch and timer expiry on ``cpu``."""
    if on:
        (TRACING / "trace_clock").write_text("mono")
        (TRACING / "trace").write_text("")
    where = {"sched/sched_switch": "CPU", "timer/hrtimer_expire_entry": "CPU", "sched/sched_wakeup": "target_cpu"}
    events = ["power/cpu_frequency"] + (list(where) if timeline else [])
    for ev in events:
        if on and ev != events[0]:
            (TRACING / "events" / ev / "filter").write_text(f"{where[ev]} == {cpu}" if cpu is not None else "0")
        (TRACING / "events" / ev / "enable").write_text("1" if on else "0")
        if not on and ev != events[0]:
            (TRACING / "events" / ev / "filter").write_text("0")


def _lines() -> list[str]:
    return (TRACING / "trace").read_text().splitlines()


def frequencies(cpu: int, lines: list[str] | None = None) -> list[tuple[float, int]]:
    """(time, kHz) of every frequency traced for ``cpu``."""
    out = []
    for line in _lines() if lines is None else lines:
        m = _FREQ.search(line)
        if m and int(m.group(3)) == cpu:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def switches(cpu: int, lines: list[str] | None = None) -> list[tuple[float, int, str, int, str]]:
    """(time, prev_pid, prev_state, next_pid, next_comm) of every context switch traced on ``cpu``."""
    out = []
    for line in _lines() if lines is None else lines:
        m = _SWITCH.search(line)
        if m and int(m.group(1)) == cpu:
            out.append((float(m.group(2)), int(m.group(3)), m.group(4), int(m.group(6)), m.group(5)))
    return out


def wakeups(cpu: int, lines: list[str] | None = None) -> list[tuple[float, int]]:
    """(time, pid) of every wake-up traced onto ``cpu``'s run queue."""
    out = []
    for line in _lines() if lines is None else lines:
        m = _WAKE.search(line)
        if m and int(m.group(3)) == cpu:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def ticks(cpu: int, lines: list[str] | None = None) -> list[float]:
    """When the scheduler tick's timer fired on ``cpu``."""
    out = []
    for line in _lines() if lines is None else lines:
        m = _TICK.search(line)
        if m and int(m.group(1)) == cpu and m.group(3).startswith("tick_"):
            out.append(float(m.group(2)))
    return out


def _segments(events: list[tuple[float, int]], start: float, end: float, before: int) -> Iterator[tuple[int, float]]:
    """(value, seconds it held) over [start, end) of the step function ``events``; ``before`` holds until the first."""
    cur, t = before, start
    for ts, f in events:
        if ts <= start:
            cur = f
            continue
        if ts >= end:
            break
        yield cur, ts - t
        t, cur = ts, f
    yield cur, end - t


def step_mean(events: list[tuple[float, int]], start: float, end: float, before: int) -> float:
    """Time-weighted mean of the step function ``events`` over [start, end); ``before`` holds until the first."""
    return sum(v * dt for v, dt in _segments(events, start, end, before)) / (end - start)


def step_share(events: list[tuple[float, int]], start: float, end: float, before: int, at_least: int) -> float:
    """Share of [start, end) during which the step function ``events`` was at least ``at_least``."""
    return sum(dt for v, dt in _segments(events, start, end, before) if v >= at_least) / (end - start)
