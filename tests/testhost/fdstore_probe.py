"""Run inside the test host: SIGKILL and ``systemctl restart`` of the shipped unit while a guest sends records.

``python -m tests.testhost.fdstore_probe KILLS`` expects the units installed
by tests/testhost/units.sh (vm0: two vCPUs pinned to CPUs 0 and 1, clamp
"thread").  It starts the service, connects a modelled guest whose process
has two threads named as QEMU names vCPU threads, and keeps sending records
(vCPU 0 alternating util 600/900, vCPU 1 300/500: never a zero clamp) every
millisecond, noting when each buffer comes back decided and sampling both
threads' ``util_min`` and affinity at every turn.  Meanwhile it kills the
service's main process with SIGKILL ``KILLS`` times (systemd restarts it from
its fd store), then runs ``systemctl restart``.  It prints one JSON line:
the gap in serving around each event (last decision before -> first after),
what the threads showed meanwhile, the service's counters, what is left in
the fd store after the guest goes, and ``systemd-analyze verify``'s lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from vhost_user_cpufreq.backend.host import sched
from vhost_user_cpufreq.backend.service.daemon import query_status

from ..helpers import named_vcpu_threads, start_guest

UNIT = "vhost-user-cpufreq.service"
CONTROL = "/run/vhost-user-cpufreq/control.sock"
SOCK = "/run/vhost-user-cpufreq/vm0.sock"


async def sh(*argv: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await p.communicate()
    return p.returncode or 0, out.decode(errors="replace")


async def status() -> dict[str, Any]:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: query_status(CONTROL, timeout=5))
    except (OSError, ValueError):
        return {}


async def main_pid() -> int:
    return int((await sh("systemctl", "show", "-P", "MainPID", UNIT))[1].strip() or 0)


async def serving(old_pid: int, timeout: float = 120.0) -> bool:
    """A new main process answers on the control socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await status()
        if st.get("pid") not in (None, old_pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def run(kills: int) -> dict[str, Any]:
    report: dict[str, Any] = {"events": []}
    rc, out = await sh("systemctl", "start", UNIT)
    report["started"] = rc == 0
    if rc:
        report["error"] = out
        return report
    done: list[int] = []
    samples: list[tuple[int, list[int], list[list[int]]]] = []  # time, util_min per thread, affinity per thread
    with named_vcpu_threads(2) as tids:
        g = await start_guest(SOCK, util_threshold=1)
        d = g.driver
        stop = asyncio.Event()
        n = 0

        async def load() -> None:
            nonlocal n
            while not stop.is_set():
                before = len(d._inflight)
                d._reclaim()
                now = time.monotonic_ns()
                done.extend([now] * (before - len(d._inflight)))
                samples.append((now, [sched.sched_getattr(t).util_min for t in tids],
                                [sorted(os.sched_getaffinity(t)) for t in tids]))
                n += 1
                d.set_util(0, 600 if n % 2 else 900)
                d.set_util(1, 300 if n % 2 else 500)
                d.flush()
                await asyncio.sleep(0.001)

        task = asyncio.get_running_loop().create_task(load())
        try:
            deadline = time.monotonic() + 60
            while (await status()).get("vms", {}).get("vm0", {}).get("counters", {}).get("records", 0) < 100:
                assert time.monotonic() < deadline, "no records served"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            report["threads_at_start"] = samples[-1]
            for i in range(kills + 1):
                pid = await main_pid()
                t0 = time.monotonic_ns()
                if i < kills:
                    os.kill(pid, 9)
                    what = "sigkill"
                else:
                    rc, out = await sh("systemctl", "restart", UNIT)
                    what = "restart"
                ok = await serving(pid)
                t1 = time.monotonic_ns()
                report["events"].append({"what": what, "old_pid": pid, "served_again": ok, "t0": t0, "t1": t1})
                if not ok:
                    break
                await asyncio.sleep(3.5)  # records flow again; and systemd's start limit (5 in 10 s) stays far
            st = await status()
            report["counters"] = st.get("vms", {}).get("vm0", {}).get("counters", {})
            report["service_counters"] = st.get("counters", {})
            report["status_clamps"] = [c["uclamp_min"] for c in st.get("vms", {}).get("vm0", {}).get("vcpus", [])]
        finally:
            stop.set()
            await task
        d.flush()
        deadline = time.monotonic() + 10
        while d._inflight and time.monotonic() < deadline:
            d._reclaim()
            await asyncio.sleep(0.01)
        report["not_returned"] = len(d._inflight)
        report["batches_sent"] = d.stats.batches
        report["connection_open"] = g.fe.sock is not None and g.fe.sock.fileno() >= 0
        await g.close()
        await asyncio.sleep(1.0)
        report["fdstore_after_close"] = (await sh("systemd-analyze", "fdstore", UNIT))[1]
    for ev in report["events"]:
        t0, t1 = ev.pop("t0"), ev.pop("t1")
        lo, hi = t0, t1 + 500_000_000
        gaps = [b - a for a, b in zip(done, done[1:]) if lo <= b <= hi]
        ev["gap_ms"] = round(max(gaps) / 1e6, 1) if gaps else None
        ev["down_ms"] = round((t1 - t0) / 1e6, 1)
        window = [s for s in samples if t0 - 200_000_000 <= s[0] <= hi]
        ev["util_min_seen"] = [sorted({s[1][v] for s in window}) for v in range(2)]
        ev["affinity_seen"] = [sorted({tuple(s[2][v]) for s in window}) for v in range(2)]
    rc, out = await sh("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}")
    report["verify"] = [line for line in out.splitlines() if "vhost-user-cpufreq" in line]
    report["journal"] = (await sh("journalctl", "-b", "-u", UNIT, "--no-pager", "-n", "60"))[1][-5000:]
    return report


async def main(kills: int) -> dict[str, Any]:
    try:
        return await run(kills)
    finally:
        await sh("systemctl", "stop", UNIT)
        await sh("systemctl", "clean", "--what=fdstore", UNIT)
        await sh("systemctl", "reset-failed")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
