"""Small helpers shared by the benchmark: summaries of samples and /proc readers."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Sequence

__all__ = ["summary", "machine_info", "proc_rss", "proc_cpu_seconds", "mono_ns"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def mono_ns() -> int:
    """CLOCK_MONOTONIC in ns: the one clock every process of the benchmark stamps with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _pct(sorted_xs: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    n = len(sorted_xs)
    if n == 1:
        return float(sorted_xs[0])
    pos = q / 100.0 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def summary(xs: Sequence[float], unit: str = "us", scale: float = 1.0) -> dict[str, object]:
    """median, p99, IQR, min/max and n of ``xs`` (each multiplied by ``scale``)."""
    if not xs:
        return {"n": 0, "unit": unit, "median": None, "p99": None, "p25": None, "p75": None, "min": None,
                "max": None, "mean": None}
    s = sorted(x * scale for x in xs)
    return {
        "n": len(s),
        "unit": unit,
        "median": round(_pct(s, 50), 3),
        "p99": round(_pct(s, 99), 3),
        "p25": round(_pct(s, 25), 3),
        "p75": round(_pct(s, 75), 3),
        "min": round(s[0], 3),
        "max": round(s[-1], 3),
        "mean": round(sum(s) / len(s), 3),
    }


def repeat_summary(values: Sequence[float], unit: str) -> dict[str, object]:
    """For figures measured over a few repeated windows (rates, CPU shares): median and min/max."""
    d = summary(values, unit)
    return d


def machine_info() -> dict[str, object]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = None
    try:
        load = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "loadavg_at_start": load,
    }


def proc_rss(pid: int) -> dict[str, float]:
    """VmRSS and its parts (MiB) from /proc/PID/status."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 1024.0, 2)
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (clock-tick resolution) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_run_delay_seconds(pid: int) -> float:
    """Time the threads of ``pid`` spent runnable but waiting for a CPU (schedstat's run delay), in seconds.

    On a shared machine this is what other processes cost the back-end: work it had
    but could not do.  0 where the kernel keeps no schedstats.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                pass
    except FileNotFoundError:
        return 0.0
    return total / 1e9


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat (steal excluded from busy)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    steal = vals[7] if len(vals) > 7 else 0
    total = sum(vals[:8])
    return float(total - idle - steal), float(total)


def steal_jiffies() -> float:
    """Time the hypervisor ran something else while our vCPUs wanted to run (all CPUs)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    return float(parts[7]) if len(parts) > 7 else 0.0
