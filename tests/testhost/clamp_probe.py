"""Run inside the test host: a guest's records set real util clamps on its vCPU threads.

``python -m tests.testhost.clamp_probe DIR`` starts the real service binary
(``serve --config``, clamp "thread") and connects a modelled guest whose
process has two threads named as QEMU names vCPU threads.  It sends a high
utilisation for vCPU 0, then a low one, then disconnects, and reads each
thread's ``sched_attr`` with ``sched_getattr`` at every step.  The VM has a
power cap (``uclamp_max = 600``): the threads' uclamp_max is read back, and a
SIGHUP with a lower cap (400) must lower it, and the clamp with it, while the
guest stays connected.  It prints one JSON line with what it read; the test on
the CI machine judges it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from vhost_user_cpufreq.backend.host import sched
from vhost_user_cpufreq.backend.service.daemon import query_status

from ..helpers import named_vcpu_threads, start_guest


def attrs(tids: list[int]) -> list[dict[str, int]]:
    out = []
    for t in tids:
        a = sched.sched_getattr(t)
        out.append({"util_min": a.util_min, "util_max": a.util_max, "flags": a.flags})
    return out


async def wait_for(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _write(cfg: Path, d: Path, cap: int) -> None:
    cfg.write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        "[vm.vm]", f'socket = "{d}/vm.sock"', "vcpus = 2", "pinning = [0, 1]", 'clamp = "thread"',
        "floor = 0", "ceiling = 1024", f"uclamp_max = {cap}", "socket_mode = 0o600"]) + "\n")


async def main(d: Path) -> dict:  # type: ignore[type-arg]
    cfg = d / "config.toml"
    _write(cfg, d, 600)
    svc = subprocess.Popen(["/opt/vuc/bin/vhost-user-cpufreq", "serve", "--config", str(cfg)],
                           stderr=open(d / "service.log", "wb"))
    report: dict = {}  # type: ignore[type-arg]
    try:
        ok = await wait_for(lambda: (d / "control.sock").exists() and "vms" in _status(d), 60)
        report["service_ready"] = ok
        with named_vcpu_threads(2) as tids:
            report["before"] = attrs(tids)
            g = await start_guest(str(d / "vm.sock"), util_threshold=1)
            g.driver.set_util(0, 900)
            g.driver.flush()
            report["raised"] = await wait_for(lambda: attrs(tids)[0]["util_min"] > 0)
            report["capped"] = await wait_for(lambda: [a["util_max"] for a in attrs(tids)] == [600, 600])
            report["high"] = attrs(tids)
            report["status_clamp"] = _status(d)["vms"]["vm"]["vcpus"][0]["uclamp_min"]
            report["status_cap"] = [c["uclamp_max"] for c in _status(d)["vms"]["vm"]["vcpus"]]
            _write(cfg, d, 400)  # a lower cap, applied in place by SIGHUP
            svc.send_signal(signal.SIGHUP)
            report["recapped"] = await wait_for(lambda: [a["util_max"] for a in attrs(tids)] == [400, 400])
            report["reloaded"] = attrs(tids)
            g.driver.set_util(0, 50)
            g.driver.flush()
            report["lowered"] = await wait_for(lambda: attrs(tids)[0]["util_min"] < report["reloaded"][0]["util_min"])
            report["low"] = attrs(tids)
            report["counters"] = _status(d)["counters"]  # the actuator's: service-wide
            await g.close()
            report["restored"] = await wait_for(lambda: attrs(tids) == report["before"])
            report["after"] = attrs(tids)
    finally:
        svc.terminate()
        report["service_rc"] = svc.wait(30)
        report["log"] = (d / "service.log").read_text(errors="replace")[-3000:]
    return report


def _status(d: Path) -> dict:  # type: ignore[type-arg]
    try:
        return query_status(str(d / "control.sock"), timeout=5)
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
