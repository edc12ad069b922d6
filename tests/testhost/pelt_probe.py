"""Run inside the test host: duty-cycle loads, and what the kernel's PELT and schedutil make of them.

``python -m tests.testhost.pelt_probe`` runs one thread pinned to CPU 1 (the
big domain of our own virtio-cpufreq driver, under schedutil) through each
load of :data:`LOADS` (busy ``b`` ms of every ``p`` ms, ``SECONDS`` each),
while this thread, on CPU 0, samples every ``SAMPLE`` s: the load's
``se.avg.util_avg`` and ``se.avg.util_est`` from ``/proc/self/task/TID/sched``
and its run time so far (``schedstat``).  Every frequency schedutil sets on
CPU 1 is traced (``power:cpu_frequency``).  Prints one JSON line; the
simulator's side of the comparison is in tests/test_sim_validation.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

LOADS = ((2, 16), (8, 16), (12, 16), (14, 16), (15, 16), (3, 4))  # (busy ms, period ms): schedutil moves only above 80%
SECONDS = 3.0
SAMPLE = 0.005
CPU = 1
TRACING = Path("/sys/kernel/tracing")


def _load(busy: float, period: float, stop: threading.Event, tid: list[int]) -> None:
    os.sched_setaffinity(0, {CPU})
    tid.append(threading.get_native_id())
    nxt = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        while time.monotonic() - t0 < busy:
            pass
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))


def _sched(tid: int) -> tuple[int, int]:
    util = est = -1
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.avg.util_avg"):
            util = int(line.split(":")[1])
        elif line.startswith("se.avg.util_est"):
            est = int(line.split(":")[1].split()[0])
    return util, est


def _freqs() -> list[tuple[float, int]]:
    out = []
    for line in (TRACING / "trace").read_text().splitlines():
        m = re.search(r"\s(\d+\.\d+): cpu_frequency: state=(\d+) cpu_id=(\d+)", line)
        if m and int(m.group(3)) == CPU:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def main() -> dict:  # type: ignore[type-arg]
    os.sched_setaffinity(0, {0})
    cf = Path(f"/sys/devices/system/cpu/cpu{CPU}/cpufreq")
    avail = cf / "scaling_available_frequencies"
    report: dict = {  # type: ignore[type-arg]
        "min_khz": int((cf / "cpuinfo_min_freq").read_text()), "max_khz": int((cf / "cpuinfo_max_freq").read_text()),
        "available_khz": [int(x) for x in avail.read_text().split()] if avail.exists() else [],
        "governor": (cf / "scaling_governor").read_text().strip(),
        "aperfmperf": " aperfmperf" in Path("/proc/cpuinfo").read_text(),
        "rate_limit_us": int((cf / "schedutil/rate_limit_us").read_text()) if (cf / "schedutil/rate_limit_us").exists()
        else None, "loads": []}
    for busy, period in LOADS:
        time.sleep(0.5)  # the previous load's util decays
        (TRACING / "trace_clock").write_text("mono")
        (TRACING / "trace").write_text("")
        (TRACING / "events/power/cpu_frequency/enable").write_text("1")
        start_khz = int((cf / "scaling_cur_freq").read_text())
        stop, tid = threading.Event(), []
        th = threading.Thread(target=_load, args=(busy / 1000, period / 1000, stop, tid), daemon=True)
        t0 = time.monotonic()
        th.start()
        while not tid:
            time.sleep(0.0005)
        samples = []
        while (now := time.monotonic()) - t0 < SECONDS:
            util, est = _sched(tid[0])
            run_ns = int(Path(f"/proc/self/task/{tid[0]}/schedstat").read_text().split()[0])
            samples.append((now, util, est, run_ns))
            time.sleep(SAMPLE)
        stop.set()
        th.join()
        (TRACING / "events/power/cpu_frequency/enable").write_text("0")
        report["loads"].append({"busy_ms": busy, "period_ms": period, "t0": t0, "start_khz": start_khz,
                                "samples": samples, "freqs": _freqs()})
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
