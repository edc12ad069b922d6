"""Run inside the test host: a VM's vCPU threads in threaded cgroups the service makes, clamped, moved back.

``python -m tests.testhost.cgroup_probe DIR`` is started by the test as a
systemd unit of its own (``systemd-run``), so that this process, which plays
QEMU, has a cgroup with the cpu controller as a QEMU under systemd or libvirt
has.  The service runs as another unit, configured with ``clamp = "cgroup"``
and ``cgroup = "{qemu}/vuc-domain{domain}"``.  The probe connects a modelled
guest from a process with two threads named as QEMU names vCPU threads
(vCPU 0 on the test host's CPU 0, domain 0; vCPU 1 on CPU 1, domain 1), and
reads what the kernel says at each step:

1. records of util 300 and 900: the service makes the two threaded cgroups,
   moves each thread into its domain's and writes the clamps; the ancestors'
   ``cpu.uclamp.min`` is 0, so the kernel's *effective* clamp
   (``/proc/PID/task/TID/sched``) stays 0 and the service says so (cap 0,
   ``clamps_capped``); the VM's power cap (``uclamp_max = 950``) is written
   to each directory's ``cpu.uclamp.max`` and is the threads' effective max;
2. the administrator's step: ``system.slice`` and the unit's cgroup raised to
   "max"; the effective clamps become the service's;
3. util 0: the effective clamp falls;
4. the guest disconnects: the threads are back in the unit's cgroup, the
   directories and the cpu controller the service enabled are gone;
5. it connects again, the service is killed with SIGKILL (the directories
   stay), and a new instance undoes them from its state file.

Prints one JSON line; the test on the CI machine judges it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vhost_user_cpufreq.backend.host.cgroups import cgroup_of
from vhost_user_cpufreq.backend.service.daemon import query_status

from ..helpers import named_vcpu_threads, start_guest

SLICE = Path("/sys/fs/cgroup/system.slice")
UNIT = "vuc-cgroup-svc"


def _effective(tid: int, which: str = "min") -> int:
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith(f"effective uclamp.{which}"):
            return int(line.split(":")[1])
    raise AssertionError(f"no 'effective uclamp.{which}' in sched: a kernel without CONFIG_UCLAMP_TASK")


def _cgroup(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/cgroup").read_text().strip()


def _status(d: Path) -> dict:  # type: ignore[type-arg]
    try:
        return query_status(str(d / "control.sock"), timeout=5)
    except (OSError, ValueError):
        return {}


async def _until(cond, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _start_service(cfg: Path, log: Path) -> None:
    subprocess.run(["systemctl", "reset-failed", UNIT], capture_output=True)
    subprocess.run(["systemd-run", f"--unit={UNIT}", "--collect", "-p", f"StandardError=file:{log}",
                    "/opt/vuc/bin/vhost-user-cpufreq", "serve", "--config", str(cfg)], check=True,
                   capture_output=True)


def _layout(home: Path, tids: list[int]) -> dict:  # type: ignore[type-arg]
    dirs = sorted(p.name for p in home.iterdir() if p.is_dir())
    return {"dirs": dirs,
            "types": {n: (home / n / "cgroup.type").read_text().strip() for n in dirs},
            "threads": {n: (home / n / "cgroup.threads").read_text().split() for n in dirs},
            "uclamp_min": {n: (home / n / "cpu.uclamp.min").read_text().strip() for n in dirs},
            "uclamp_max": {n: (home / n / "cpu.uclamp.max").read_text().strip() for n in dirs},
            "thread_cgroups": [_cgroup(t) for t in tids],
            "effective": [_effective(t) for t in tids],
            "effective_max": [_effective(t, "max") for t in tids],
            "home_subtree_control": (home / "cgroup.subtree_control").read_text().split()}


async def main(d: Path) -> dict:  # type: ignore[type-arg]
    cfg = d / "config.toml"
    cfg.write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        "[vm.vm]", f'socket = "{d}/vm.sock"', "vcpus = 2", "pinning = [0, 1]", 'clamp = "cgroup"',
        'cgroup = "{qemu}/vuc-domain{domain}"', "uclamp_max = 950"]) + "\n")
    home = cgroup_of(os.getpid())
    report: dict = {"home": str(home), "home_controllers": (home / "cgroup.controllers").read_text().split()}
    raised: list[Path] = []
    _start_service(cfg, d / "service.log")
    try:
        report["service_ready"] = await _until(lambda: "vms" in _status(d), 60)
        with named_vcpu_threads(2) as tids:
            report["tids"] = tids
            report["before"] = _layout(home, tids)
            g = await start_guest(str(d / "vm.sock"), util_threshold=1)
            g.driver.set_util(0, 300)
            g.driver.set_util(1, 900)
            g.driver.flush()

            def clamped(values: list[int | None]) -> bool:
                cgs = _status(d).get("vms", {}).get("vm", {}).get("cgroups", [])
                return [c["uclamp_min"] for c in cgs] == values

            report["made"] = await _until(lambda: clamped([300, 900]))
            report["capped"] = _layout(home, tids)
            st = _status(d)
            report["status_cgroups"] = st["vms"]["vm"]["cgroups"]
            report["counters"] = st["counters"]
            # The administrator's step: let cgroup clamps take effect below the unit's cgroup.
            for p in (SLICE, home):
                if (p / "cpu.uclamp.min").read_text().strip() != "max":
                    (p / "cpu.uclamp.min").write_text("max\n")
                    raised.append(p)
            report["effective_raised"] = await _until(lambda: [_effective(t) for t in tids] == [300, 900], 10)
            report["uncapped"] = _layout(home, tids)
            g.driver.set_util(0, 0)
            g.driver.set_util(1, 0)
            g.driver.flush()
            report["fell"] = await _until(lambda: [_effective(t) for t in tids] == [0, 0])
            await g.close()
            report["moved_back"] = await _until(lambda: not any(p.is_dir() for p in home.iterdir()))
            report["after_disconnect"] = _layout(home, tids)

            g = await start_guest(str(d / "vm.sock"), util_threshold=1)
            g.driver.set_util(1, 600)
            g.driver.flush()
            report["made_again"] = await _until(lambda: clamped([0, 600]))
            subprocess.run(["systemctl", "kill", "-s", "KILL", UNIT], check=True)
            report["killed"] = await _until(
                lambda: subprocess.run(["systemctl", "is-active", "-q", UNIT]).returncode != 0)
            report["after_kill"] = _layout(home, tids)
            await g.close()
            _start_service(cfg, d / "service2.log")
            report["recovered"] = await _until(lambda: not any(p.is_dir() for p in home.iterdir()))
            report["after_recovery"] = _layout(home, tids)
            report["recovery_counters"] = (await _status_when(d, "recovered_cgroups")).get("counters", {})
            report["state_file"] = json.loads((d / "state.json").read_text())
    finally:
        for p in raised:
            (p / "cpu.uclamp.min").write_text("0\n")
        subprocess.run(["systemctl", "stop", UNIT], capture_output=True)
        report["log"] = "".join((d / n).read_text(errors="replace")[-2000:]
                                for n in ("service.log", "service2.log") if (d / n).exists())
    return report


async def _status_when(d: Path, counter: str) -> dict:  # type: ignore[type-arg]
    await _until(lambda: counter in _status(d).get("counters", {}), 30)
    return _status(d)


if __name__ == "__main__":
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    text = json.dumps(asyncio.run(main(Path(sys.argv[1]))))
    if out is not None:
        out.write_text(text)
    print(text)
