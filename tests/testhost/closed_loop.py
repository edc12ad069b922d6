"""Run inside the test host: the closed loop, from a guest's record to the frequency schedutil asks for.

``python -m tests.testhost.closed_loop DIR CEILING`` starts the real service
(clamp "thread", vCPU 0 pinned to the test host's CPU 1, ``ceiling``
CEILING) and a process that plays QEMU: a thread named "CPU 0/KVM" that runs a
low-duty load (busy 20% of every 4 ms) and an idle "CPU 1/KVM", and a modelled
guest connected to the service.  Phases of ``PHASE`` seconds (``PHASES``):
the load alone (no record: no clamp, as without the service), the guest
asking for util 900 on vCPU 0, util 0, 900 again, and then silent (the
service lets the last request go stale).  The test host's schedutil
drives our own cpufreq driver; every frequency it sets is traced
(``power:cpu_frequency``, on the monotonic clock the phases are timed with).
Prints one JSON line: per phase, over the phase's last ``PHASE - SETTLE``
seconds, the time-weighted mean frequency CPU 1 ran at, the share of that time
it ran at 80% of its maximum or more, and the lowest and median uclamp_min the
kernel held for the loaded thread (sampled every 20 ms).

``python -m tests.testhost.closed_loop DIR CEILING CHANGES`` then turns the
guest's utilisation from 0 to 900 and back ``CHANGES`` times, ``TOGGLE``
seconds apart, and reports when each change's first record left the guest
(this machine's ``CLOCK_MONOTONIC``) and the frequencies schedutil set
meanwhile; the test relates them to what the outer back-end received
(tests/testhost/loop_figures.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from vhost_user_cpufreq.backend.service.daemon import query_status

from ..helpers import start_guest
from . import duty

PHASE, SETTLE = 6.0, 2.0
#: the guest's utilisation in each phase (None: no records, so the service has no say or lets the last go stale)
PHASES = {"alone": None, "guest-900": 900, "guest-0": 0, "guest-900-again": 900, "guest-silent": None}
TOGGLE = 0.5  # seconds between changes: the frequency settles within a few tens of ms
CPU = 1  # the test host CPU vCPU 0's thread is pinned to (the big domain)


def _name_thread(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def _duty(stop: threading.Event, ready: threading.Barrier) -> None:
    _name_thread("CPU 0/KVM")
    ready.wait()
    duty.duty_cycle(0.0008, 0.004, stop, absolute=False)


def _idle(stop: threading.Event, ready: threading.Barrier) -> None:
    _name_thread("CPU 1/KVM")
    ready.wait()
    stop.wait()


def _probe(d: Path, tid: int | None) -> dict:  # type: ignore[type-arg]
    """What the service and the kernel say of the loaded thread, mid-phase."""
    from vhost_user_cpufreq.backend.host import sched

    assert tid is not None
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    st = query_status(str(d / "control.sock"))["vms"]["vm"]["vcpus"][0]
    return {"service_uclamp_min": st["uclamp_min"], "thread": st["thread"], "tid": tid,
            "kernel_uclamp_min": sched.sched_getattr(tid).util_min, "affinity": sorted(os.sched_getaffinity(tid)),
            "last_cpu": int(fields[36]), "utime_ticks": int(fields[11]),
            "effective_uclamp_min": _effective(tid),
            "cur_khz": int(Path(f"/sys/devices/system/cpu/cpu{CPU}/cpufreq/scaling_cur_freq").read_text())}


def _effective(tid: int) -> int:
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith("effective uclamp.min"):
            return int(line.split(":")[1])
    return -1


async def _report(g, util: int | None, seconds: float,  # type: ignore[no-untyped-def]
                  clamps: list[tuple[float, int]] | None = None, tid: int | None = None) -> float:
    """Report ``util`` every 20 ms for ``seconds``; returns when the first record was flushed.

    With ``clamps``, each turn also appends the uclamp_min the kernel holds for
    thread ``tid`` (the service's part of the loop, apart from schedutil's)."""
    from vhost_user_cpufreq.backend.host import sched

    first = time.monotonic()
    end = first + seconds
    i = 0
    while time.monotonic() < end:
        if util is not None:
            g.driver.set_util(0, util + (i % 2 if util < 1024 else -(i % 2)))
            g.driver.flush()
        if clamps is not None and tid is not None:
            clamps.append((time.monotonic(), sched.sched_getattr(tid).util_min))
        i += 1
        await asyncio.sleep(0.02)
    return first


def _clamp_summary(clamps: list[tuple[float, int]], start: float, end: float) -> dict[str, int]:
    """The lowest and the median uclamp_min the kernel held over [start, end)."""
    vals = sorted(v for t, v in clamps if start <= t < end)
    return {"min": vals[0], "median": vals[len(vals) // 2], "samples": len(vals)} if vals else {"samples": 0}


async def main(d: Path, ceiling: int, changes: int = 0) -> dict:  # type: ignore[type-arg]
    cfg = d / "config.toml"
    cfg.write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"',
        "[vm.vm]", f'socket = "{d}/vm.sock"', "vcpus = 2", f"pinning = [{CPU}, 0]", 'clamp = "thread"',
        f"ceiling = {ceiling}"]) + "\n")
    # The service and this process stay on CPU 0: CPU 1 is the load's alone.
    os.sched_setaffinity(0, {0})
    svc = subprocess.Popen(["/opt/vuc/bin/vhost-user-cpufreq", "serve", "--config", str(cfg)],
                           stderr=open(d / "service.log", "wb"))
    stop = threading.Event()
    ready = threading.Barrier(3)
    threads = [threading.Thread(target=_duty, args=(stop, ready), daemon=True),
               threading.Thread(target=_idle, args=(stop, ready), daemon=True)]
    for t in threads:
        t.start()
    ready.wait()
    report: dict = {"ceiling": ceiling}  # type: ignore[type-arg]
    try:
        deadline = time.monotonic() + 60
        while not (d / "control.sock").exists():
            assert time.monotonic() < deadline and svc.poll() is None, (d / "service.log").read_text()
            await asyncio.sleep(0.1)
        g = await start_guest(str(d / "vm.sock"), util_threshold=1)
        await asyncio.sleep(SETTLE)  # the service's start-up work done
        duty.trace(True)
        # What CPU 1 ran at before the first traced change (a run may have none at all).
        start_khz = int(Path(f"/sys/devices/system/cpu/cpu{CPU}/cpufreq/scaling_cur_freq").read_text())
        bounds = [time.monotonic()]
        report["probe"] = []
        clamps: list[tuple[float, int]] = []
        tid = threads[0].native_id
        for util in PHASES.values():
            # A busy guest keeps reporting (the engine lets a hint go stale otherwise): every 20 ms,
            # one unit apart so that each report is a record.
            await _report(g, util, PHASE / 2, clamps, tid)
            report["probe"].append(_probe(d, tid))
            await _report(g, util, PHASE / 2, clamps, tid)
            bounds.append(time.monotonic())
        if changes:
            # Each change's first record differs from the last by far more than the driver's
            # threshold, so the time it was flushed is when the guest asked.
            report["changes"] = []
            for i in range(changes):
                util = 900 if i % 2 == 0 else 0
                report["changes"].append((await _report(g, util, TOGGLE), util))
        duty.trace(False)
        st = query_status(str(d / "control.sock"))["vms"]["vm"]
        report["uclamp_min_at_end"] = st["vcpus"][0]["uclamp_min"]
        await g.close()
        events = duty.frequencies(CPU)
        report["start_khz"] = start_khz
        report["events"] = len(events)
        report["frequencies"] = events if changes else []
        fmax = int(Path(f"/sys/devices/system/cpu/cpu{CPU}/cpufreq/cpuinfo_max_freq").read_text())
        report["cpuinfo_max_khz"] = fmax
        report["phases"] = {name: duty.step_mean(events, bounds[i] + SETTLE, bounds[i + 1], start_khz)
                            for i, name in enumerate(PHASES)}
        # The share of each phase spent near the top (at 80% of the maximum or more), and what the
        # kernel held as the thread's clamp meanwhile.
        report["near_top"] = {name: duty.step_share(events, bounds[i] + SETTLE, bounds[i + 1], start_khz,
                                                    fmax * 4 // 5) for i, name in enumerate(PHASES)}
        report["clamps"] = {name: _clamp_summary(clamps, bounds[i] + SETTLE, bounds[i + 1])
                            for i, name in enumerate(PHASES)}
    finally:
        stop.set()
        svc.terminate()
        report["service_rc"] = svc.wait(30)
        report["log"] = (d / "service.log").read_text(errors="replace")[-2000:]
    return report


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(asyncio.run(main(Path(args[0]), int(args[1]), int(args[2]) if len(args) > 2 else 0))))
