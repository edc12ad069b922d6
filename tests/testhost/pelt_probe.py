"""Run inside the test host: duty-cycle loads, and what the kernel's PELT and schedutil make of them.

``python -m tests.testhost.pelt_probe`` runs one thread pinned to CPU 1 (the
big domain of our own virtio-cpufreq driver, under schedutil) through each
load of :data:`LOADS` (busy ``b`` ms of every ``p`` ms, ``SECONDS`` each),
while this thread, on CPU 0, samples every ``SAMPLE`` s the load's
``se.avg.util_avg``, ``runnable_avg``, ``util_est`` and
``last_update_time`` from ``/proc/self/task/TID/sched`` and its run time
(``schedstat``).  The kernel's own timeline of the load is traced on CPU 1
(tests/testhost/duty.py): every wake-up and context switch (when it really
ran, which under TCG is not the duty cycle it asked for), every tick, and
every frequency schedutil set.  Prints one JSON line; the simulator replays it in
tests/test_sim_validation.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from . import duty

LOADS = ((2, 16), (8, 16), (12, 16), (14, 16), (15, 16), (3, 4))  # (busy ms, period ms): schedutil moves only above 80%
SECONDS = 3.0
SAMPLE = 0.005
CPU = 1
_FIELDS = {"se.avg.util_avg": "util", "se.avg.runnable_avg": "runnable", "se.avg.util_est": "est",
           "se.avg.last_update_time": "lut"}


def _sched(tid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        key, _, val = line.partition(":")
        if key.strip() in _FIELDS:
            out[_FIELDS[key.strip()]] = int(val.split()[0]) & 0x7FFFFFFF if key.strip() == "se.avg.util_est" \
                else int(float(val.split()[0]))
    return out


def main() -> dict:  # type: ignore[type-arg]
    import os

    os.sched_setaffinity(0, {0})
    cf = Path(f"/sys/devices/system/cpu/cpu{CPU}/cpufreq")
    avail = cf / "scaling_available_frequencies"
    report: dict = {  # type: ignore[type-arg]
        "kernel": os.uname().release, "cpu": CPU,
        "min_khz": int((cf / "cpuinfo_min_freq").read_text()), "max_khz": int((cf / "cpuinfo_max_freq").read_text()),
        "available_khz": [int(x) for x in avail.read_text().split()] if avail.exists() else [],
        "governor": (cf / "scaling_governor").read_text().strip(),
        "aperfmperf": " aperfmperf" in Path("/proc/cpuinfo").read_text(),
        "rate_limit_us": next((int(f.read_text()) for f in (cf / "schedutil/rate_limit_us",
                              Path("/sys/devices/system/cpu/cpufreq/schedutil/rate_limit_us")) if f.exists()), None),
        "loads": []}
    for busy, period in LOADS:
        time.sleep(0.5)  # the previous load's util decays
        duty.trace(True, cpu=CPU, timeline=True)
        start_khz = int((cf / "scaling_cur_freq").read_text())
        stop, tid = threading.Event(), []  # type: ignore[var-annotated]
        th = threading.Thread(target=duty.duty_cycle, args=(busy / 1000, period / 1000, stop),
                              kwargs={"cpu": CPU, "started": tid}, daemon=True)
        t0 = time.monotonic()
        th.start()
        while not tid:
            time.sleep(0.0005)
        samples = []
        while (now := time.monotonic()) - t0 < SECONDS:
            s = _sched(tid[0])
            run_ns = int(Path(f"/proc/self/task/{tid[0]}/schedstat").read_text().split()[0])
            samples.append((now, s["util"], s["est"], run_ns, s["runnable"], s["lut"]))
            time.sleep(SAMPLE)
        stop.set()
        th.join()
        duty.trace(False, timeline=True)
        lines = (duty.TRACING / "trace").read_text().splitlines()
        report["loads"].append({"busy_ms": busy, "period_ms": period, "t0": t0, "tid": tid[0], "start_khz": start_khz,
                                "samples": samples, "freqs": duty.frequencies(CPU, lines),
                                "switches": duty.switches(CPU, lines), "wakeups": duty.wakeups(CPU, lines),
                                "ticks": duty.ticks(CPU, lines),
                                "lost": sum("LOST" in line for line in lines)})
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
