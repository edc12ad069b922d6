"""The real service binary with 1,000 VMs of 8 vCPUs: every VM served, nothing errored.

A cheap stand-in for the scale benchmark (``bench/run.py --only scale
--scale-vms 1000``): ``vhost-user-cpufreq serve`` runs with a config of
``VMS`` (1,000) VMs, this test connects a modelled guest to every one of them and
sends records from all of them, on each data-plane path with a kick lane or
without: the C kick lane, and every kick on the event loop
(``VUC_KICK_LANE=0``).

The service is started with a soft open-file limit of 1024, as systemd
starts services, so that it must raise the limit itself (``daemon.py``), and
with enough VMs that its fds pass 1023: anything in it that still used
``select()`` or kept fds in a table of 1024 would fail here.  Each VM must
have been served every round, and the service must end with no session
closed, no record rejected, no interrupt dropped and nothing logged at
WARNING or above.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from vhost_user_cpufreq.backend.service.daemon import query_status
from vhost_user_cpufreq.guest.frontend import MemfdRam

from .sysfs_tree import HostSpec, make_sysfs_tree
from .helpers import Guest, require_c_dataplane, short_tmpdir, start_guest, stop_process, unavailable, until

VMS = 1000
VCPUS = 8
ROUNDS = 3
#: fds the service holds per connected VM: socket, connection, kick, call, err, back-end channel,
#: guest RAM; a VM never needs more than this many here
FDS_PER_VM = 8
#: counters that mean a VM was not served cleanly
BAD_COUNTERS = ("sessions_closed", "rejected", "lost_batches", "interrupts_dropped", "config_notify_failed")
PATHS = {"lane": {}, "event-loop": {"VUC_KICK_LANE": "0"}}


def _exe() -> str:
    return str(Path(sys.executable).with_name("vhost-user-cpufreq"))


def _systemd_like_fd_limit() -> None:
    """In the child before exec: a soft limit of 1024 under a higher hard one, as systemd sets it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


class Service:
    """``vhost-user-cpufreq serve`` with VMS VMs named vm0.. in a directory of its own."""

    def __init__(self, d: Path, env: dict[str, str]) -> None:
        self.d = d
        self.startup_log = 0
        # The daemon pins each VM's vCPUs 1:1 to pCPUs ("auto" refuses more vCPUs than free pCPUs), so
        # the service sees an 8-CPU host (a fake sysfs tree) and every VM lists the same 8 pCPUs.
        make_sysfs_tree(d / "sysfs", HostSpec.big_little([(4, 300000, 1803000, 160), (2, 400000, 2253000, 498),
                                                          (2, 500000, 2802000, 1024)]))
        lines = ["[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
                 f'sysfs_root = "{d}/sysfs"']
        for i in range(VMS):
            lines += [f"[vm.vm{i}]", f'socket = "{d}/vm{i}.sock"', f"vcpus = {VCPUS}",
                      f"pinning = {list(range(VCPUS))}", 'clamp = "none"']
        (d / "config.toml").write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([_exe(), "serve", "--config", str(d / "config.toml")],
                                     env={**os.environ, **env}, stderr=open(d / "service.log", "wb"),
                                     preexec_fn=_systemd_like_fd_limit)

    def status(self) -> dict[str, Any]:
        return query_status(str(self.d / "control.sock"), timeout=10)

    def fds(self) -> list[int]:
        return [int(fd) for fd in os.listdir(f"/proc/{self.proc.pid}/fd")]

    def log(self) -> str:
        return (self.d / "service.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)


def _answers(svc: Service) -> bool:
    try:
        return len(svc.status()["vms"]) == VMS
    except (OSError, ValueError):
        return False


@pytest.fixture(params=list(PATHS))
async def service(request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    require_c_dataplane()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * VMS * FDS_PER_VM  # the service's and this process's (every guest's), with room to spare
    try:
        # the service inherits the hard limit; root may raise it, anyone may raise the soft one to it
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, need), max(hard, need)))
    except (ValueError, OSError):
        unavailable("VUC_REQUIRE_TOOLS", f"the hard open-file limit {hard} is below the {need} fds this test needs")
    with short_tmpdir("vuc-scale-") as d:
        svc = Service(d, PATHS[request.param])
        try:
            await until(lambda: _answers(svc) or not svc.alive(), timeout=30, what="service ready")
            assert svc.alive(), svc.log()
            svc.startup_log = len(svc.log())  # what it said of the host before any VM came
            yield svc
        finally:
            svc.stop()


def _records(status: dict[str, Any]) -> dict[str, int]:
    return {name: vm["counters"].get("records", 0) for name, vm in status["vms"].items()}


async def test_a_thousand_vms_of_8_vcpus_are_all_served_with_fds_past_1023(service: Service,
                                                                   request: pytest.FixtureRequest) -> None:
    t0 = time.monotonic()
    guests: list[Guest] = []
    try:
        for i in range(VMS):
            # util_threshold 1: every changed vCPU is sent; a rise is kicked whenever the device wants kicks
            guests.append(await start_guest(str(service.d / f"vm{i}.sock"), ram=MemfdRam(1 << 20),
                                            util_threshold=1, timeout=10))
        connected = time.monotonic()
        st = service.status()
        assert all(vm["connected"] for vm in st["vms"].values())
        # The service's fds run past 1023 with every VM connected; it raised its own soft limit to get there.
        fds = service.fds()
        assert max(fds) > 1023, max(fds)
        lanes = sum(lane["queues"] for lane in st["kick_lanes"])
        assert lanes == (VMS if request.node.callspec.params["service"] == "lane" else 0), st["kick_lanes"]

        before = _records(st)
        for rnd in range(ROUNDS):
            for g in guests:
                for v in range(VCPUS):
                    g.driver.set_util(v, 100 + 300 * rnd + 7 * v)  # a rise for every vCPU, every round
                g.driver.flush()
            want = VCPUS * (rnd + 1)

            def behind() -> list[str]:
                now = _records(service.status())
                return [n for n, k in now.items() if k - before[n] < want]

            await until(lambda: not behind(), timeout=20,
                        what=lambda: f"round {rnd}: VMs not served: {behind()[:10]}\n{service.log()[-3000:]}")
        served = time.monotonic()
    finally:
        for g in guests:
            await g.close()

    st = service.status()
    assert service.alive(), service.log()
    for name, vm in st["vms"].items():
        bad = {k: n for k, n in vm["counters"].items() if k.split(":")[0] in BAD_COUNTERS and n}
        assert not bad, (name, bad)
        assert vm["sessions_served"] == 1, (name, vm["sessions_served"])
    log = service.log()[service.startup_log:]  # a host's degradations (no cpufreq, no uclamp) are said at start
    problems = [line for line in log.splitlines()
                if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception ignored", line)]
    assert not problems, log[-5000:]
    print(f"{VMS} VMs: connected in {connected - t0:.1f} s, {ROUNDS} rounds served in {served - connected:.1f} s, "
          f"{len(fds)} service fds, highest {max(fds)}")
