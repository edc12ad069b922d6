"""Real QEMUs on the one shared socket: each identified by its -name and -smp, served, clamped on its own.

The daemon runs in-process on this host's real /sys, pinning for real; util
clamps are applied where the kernel has them and recorded otherwise (the
actuator's ``clamps`` holds either).  The guests are the driver model over
qtest (tests/qemu/fixture.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator

import pytest

from vhost_user_cpufreq.backend.service.config import load_config
from vhost_user_cpufreq.backend.service.daemon import Daemon, query_status
from vhost_user_cpufreq.guest.driver import CpufreqDriver

from .helpers import until
from .qemu.fixture import QemuInstall, QemuVm

pytestmark = pytest.mark.qemu

CONFIG = """
[service]
nominal_khz = 2000000
sample_period = 0.05
min_interval = 0.0
shared_socket = "{dir}/vhost.sock"
shared_socket_mode = 0o600
control_socket = "{dir}/control.sock"
state_dir = "{dir}/state"
state_file = "{dir}/state.json"

[class.big]
match_name = "big-*"
pinning = "none"
ceiling = 900

[class.pinned]
match_name = "pin-*"
pinning = "auto"
ceiling = 600

[class.default]
pinning = "none"
floor = 100
ceiling = 500
"""


@pytest.fixture
async def daemon(qemu_install: QemuInstall) -> AsyncIterator[Daemon]:
    d = Path(tempfile.mkdtemp(prefix="vuc-sh-", dir=qemu_install.tmpdir()))
    (d / "config.toml").write_text(CONFIG.format(dir=d))
    daemon = Daemon(load_config(d / "config.toml"))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


class Vms:
    def __init__(self, install: QemuInstall, sock: str) -> None:
        self.install, self.sock = install, sock
        self.vms: list[QemuVm] = []

    async def start(self, smp: int, *extra: str) -> QemuVm:
        vm = QemuVm(self.install, self.sock, smp=smp, extra_args=extra)
        self.vms.append(vm)
        await vm.start()
        return vm

    async def close(self) -> None:
        for vm in self.vms:
            await vm.close()


@pytest.fixture
async def vms(qemu_install: QemuInstall, daemon: Daemon) -> AsyncIterator[Vms]:
    assert daemon.config.shared_socket is not None
    v = Vms(qemu_install, daemon.config.shared_socket)
    try:
        yield v
    finally:
        await v.close()


async def _driver(vm: QemuVm) -> CpufreqDriver:
    driver = CpufreqDriver(await vm.open_transport(), lazy_records=0)
    await driver.probe()
    return driver


def _tasks(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


async def test_three_qemus_on_one_socket_are_served_each_with_its_own_clamps(daemon: Daemon, vms: Vms) -> None:
    big = await vms.start(4, "-name", "big-1")
    web = await vms.start(2, "-name", "guest=web-1,debug-threads=on")
    pin = await vms.start(1, "-name", "pin-1", "-smp", "1")  # the last -smp wins, as in QEMU
    by_name = {"big-1": big, "web-1": web, "pin-1": pin}
    policy, actuator = daemon.policy, daemon.actuator
    for name, vm in by_name.items():
        slot = daemon.service.vms[name]
        assert slot.connection is not None and slot.connection.peer_pid == vm.pid
        await until(lambda: len(policy.vms[name].tids) == vm.smp, timeout=30, what=f"{name}'s vCPU threads")
        # Its threads are its own QEMU's, never another's.
        assert set(policy.vms[name].tids.values()) <= _tasks(vm.pid)
    drivers = {name: await _driver(vm) for name, vm in by_name.items()}
    assert {n: d.config.num_vcpus for n, d in drivers.items()} == {"big-1": 4, "web-1": 2, "pin-1": 1}
    # Every vCPU asks for everything: each VM's threads get its own class's ceiling.
    for d in drivers.values():
        for v in range(d.config.num_vcpus):
            d.set_util(v, 1024)
        d.flush()
    # (The engine's applied clamps: written to the threads by the C kick lane, or recorded where this
    # kernel has no util clamps.)
    ceilings = {"big-1": 900, "web-1": 500, "pin-1": 600}
    for name, ceiling in ceilings.items():
        engine = policy.vms[name].engine
        await until(lambda: set(engine.vcpus.values()) == {ceiling},
                    what=lambda: f"{name}: clamps {dict(engine.vcpus)}, want {ceiling}")
    # pin-1's one vCPU is pinned (auto: a free pCPU); the others' affinity is left alone.
    (pin_tid,) = policy.vms["pin-1"].tids.values()
    assert len(os.sched_getaffinity(pin_tid)) == 1
    listed = await asyncio.to_thread(query_status, str(daemon.config.control_socket), "vm-list")
    assert {vm["name"]: (vm["connected"]["vcpus"], vm["connected"]["class"]) for vm in listed["vms"]} == {
        "big-1": (4, "big"), "web-1": (2, "default"), "pin-1": (1, "pinned")}

    # big-1 is killed: its VM goes, its threads are forgotten; the other two are untouched.
    others = {n: (dict(policy.vms[n].engine.vcpus), dict(policy.vms[n].tids)) for n in ("web-1", "pin-1")}
    big_tids = set(policy.vms["big-1"].tids.values())
    pin_affinity = os.sched_getaffinity(pin_tid)
    await big.kill()
    await until(lambda: "big-1" not in daemon.service.vms, what="big-1 removed")
    assert "big-1" not in policy.vms
    assert not big_tids & (set(actuator.clamps) | set(actuator.originals) | set(actuator.pinned))
    assert daemon.state is not None and not big_tids & set(daemon.state.entries)
    assert {n: (dict(policy.vms[n].engine.vcpus), dict(policy.vms[n].tids)) for n in others} == others
    assert os.sched_getaffinity(pin_tid) == pin_affinity
    assert all(daemon.service.vms[n].connection is not None for n in ("web-1", "pin-1"))

    # A manager moves pin-1 to the big class: unpinned (its thread's own affinity back), new ceiling, still
    # connected; then its QEMU quits and every thread it had is restored.
    original = os.sched_getaffinity(0)
    r = await asyncio.to_thread(query_status, str(daemon.config.control_socket),
                                'vm-register {"name": "pin-1", "class": "big"}')
    assert r["ok"] and r["applied"].startswith("applied (class big")
    assert os.sched_getaffinity(pin_tid) == original
    # The guest's next records are bounded by the new class.
    pin_slot = daemon.service.vms["pin-1"]
    for util in (100, 1024):
        drivers["pin-1"].set_util(0, util)
        drivers["pin-1"].flush()
        await until(lambda: pin_slot.device.vcpus[0].util == util, what=f"pin-1's record of util {util}")
    await until(lambda: set(policy.vms["pin-1"].engine.vcpus.values()) == {900},
                what=lambda: f"pin-1's new ceiling: {dict(policy.vms['pin-1'].engine.vcpus)}")
    assert daemon.service.vms["pin-1"].connection is not None
    await web.quit()
    await until(lambda: "web-1" not in daemon.service.vms)
    assert daemon.service.vms["pin-1"].connection is not None
    assert set(policy.vms["pin-1"].engine.vcpus.values()) == {900}


async def test_qemus_whose_identity_cannot_be_established_are_refused_with_the_reason(daemon: Daemon,
                                                                                      vms: Vms) -> None:
    await vms.start(2, "-name", "web-7")
    # No -name (which VM is it?), then a second QEMU claiming a connected VM's name: the service closes
    # the connection, and QEMU, whose device cannot be realized without its back-end, exits with an error.
    for extra in ((), ("-name", "web-7")):
        with pytest.raises(Exception):  # noqa: B017 - RuntimeError or QMP's ConnectError, by timing
            await vms.start(1, *extra)
        assert await vms.vms[-1].wait() != 0
    assert daemon.counters.get("shared_refused", "no-name") == 1
    assert daemon.counters.get("shared_refused", "name-in-use") == 1
    assert list(daemon.shared.peers) == ["web-7"]  # type: ignore[union-attr]
    assert daemon.service.vms["web-7"].connection is not None
