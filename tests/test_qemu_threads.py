"""vCPU threads of a real QEMU (-smp 4): discovery, the ownership check, pinning and clamps."""

from __future__ import annotations

import os
import threading

import pytest

from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import EngineConfig, VcpuPlacement, VmLimits
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.host.vcpu_threads import (
    ThreadOwnershipError,
    discover_threads,
    threads_from_proc,
    threads_from_qmp_client,
    verify_threads,
)

from .helpers import until
from .qemu.fixture import QemuLab

pytestmark = pytest.mark.qemu


async def _vm(qemu_lab: QemuLab):  # type: ignore[no-untyped-def]
    slot = await qemu_lab.add_vm("vm", (0, 0, 1, 2))
    g = await qemu_lab.start_guest("vm", qemu={"smp": 4})
    await until(lambda: slot.connection is not None)
    return slot, g


async def test_qmp_and_proc_find_the_same_four_vcpu_threads_of_the_connected_qemu(qemu_lab: QemuLab) -> None:
    slot, g = await _vm(qemu_lab)
    peer = slot.connection.peer_pid  # type: ignore[union-attr]
    assert peer == g.vm.pid  # SO_PEERCRED names the very QEMU process
    by_qmp = await threads_from_qmp_client(g.vm.qmp)
    by_proc = threads_from_proc(peer)
    assert sorted(by_qmp) == [0, 1, 2, 3]
    assert by_qmp == by_proc
    assert verify_threads(peer, by_qmp) == by_qmp
    # Without a QMP socket the service falls back to /proc and gets the same answer.
    assert await discover_threads(peer, None) == by_proc


async def test_threads_of_another_process_are_refused(qemu_lab: QemuLab) -> None:
    slot, g = await _vm(qemu_lab)
    peer = slot.connection.peer_pid  # type: ignore[union-attr]
    threads = threads_from_proc(peer)
    # A QMP socket (or a config) that lies: vCPU 1 claimed to be one of our own threads.
    forged = dict(threads) | {1: threading.get_native_id()}
    with pytest.raises(ThreadOwnershipError) as ei:
        verify_threads(peer, forged)
    assert ei.value.reason == "foreign-thread"
    # And threads of QEMU are refused when checked against another pid.
    with pytest.raises(ThreadOwnershipError):
        verify_threads(os.getpid(), threads)


async def test_real_qemu_vcpus_are_pinned_clamped_and_restored(qemu_lab: QemuLab) -> None:
    slot, g = await _vm(qemu_lab)
    peer = slot.connection.peer_pid  # type: ignore[union-attr]
    tids = await discover_threads(peer, None)
    before = {t: os.sched_getaffinity(t) for t in tids.values()}
    counters = Counters()
    policy = HostPolicy(ThreadActuator(counters), config=EngineConfig(min_interval=0.0))
    ncpu = len(os.sched_getaffinity(0))
    places = [VcpuPlacement(v, v % ncpu, 1024, 1024, 2_000_000) for v in range(4)]
    policy.bind("vm", places, VmLimits(ceiling=900))
    policy.attach_threads("vm", tids)
    for v, tid in tids.items():
        assert os.sched_getaffinity(tid) == {v % ncpu}
    # Records from the guest model, through qtest and QEMU, become clamps on the right threads.
    slot.device.policy = policy
    g.driver.set_util(2, 1000)
    g.driver.flush()
    await until(lambda: tids[2] in policy.actuator.clamps, what="clamp for vCPU 2's thread")
    assert policy.actuator.clamps[tids[2]] == 900  # the VM's ceiling
    policy.detach("vm")
    assert {t: os.sched_getaffinity(t) for t in tids.values()} == before
    assert counters.get("restored") == 4
