"""Host side end to end: guest util to pinned, clamped vCPU threads; sysfs frequency to guest config.

The "QEMU" here is this test process: four threads named like QEMU's vCPU
threads ("CPU n/KVM"), found through /proc/self/task, checked against the
front-end's SO_PEERCRED pid, and pinned for real.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Iterator

import pytest

from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.service.config import VmSettings
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import EngineConfig, VmLimits
from vhost_user_cpufreq.backend.service.vm_host import HostSide
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.service.vms import Service
from vhost_user_cpufreq.backend.host.sysfs_source import SysfsSource

from .helpers import named_vcpu_threads, require_c_dataplane, start_guest, until
from .sysfs_tree import HostSpec, make_sysfs_tree, set_cpu_online, set_cur_freq

PHONE = HostSpec.big_little([(4, 300000, 1803000, 160), (3, 400000, 2253000, 498), (1, 500000, 2802000, 1024)])


@pytest.fixture
def vcpu_threads() -> Iterator[list[int]]:
    with named_vcpu_threads(4) as tids:
        yield tids


async def _host(tmp_path: Path, vcpus: int = 4, floor: int = 0, ceiling: int = 1024,  # type: ignore[no-untyped-def]
                lane: bool = True):
    root = make_sysfs_tree(tmp_path / "sys", PHONE)
    source = SysfsSource(str(root))
    counters = Counters()
    policy = HostPolicy(ThreadActuator(counters), config=EngineConfig(hysteresis=16, min_interval=0.0),
                        c_engine=None if lane else False)
    svc = Service(source, policy)
    host = HostSide(svc, source, policy)
    s = VmSettings("vm", str(tmp_path / "vm.sock"), vcpus, limits=VmLimits(floor, ceiling))
    slot = await host.add_vm(s, notify_interval=0.005, mirror_threshold=0.01)
    return root, source, policy, svc, host, slot, counters


@pytest.mark.parametrize("path", ["kick-lane", "event-loop"])
async def test_guest_util_rise_raises_the_clamp_of_that_vcpus_thread(tmp_path: Path, vcpu_threads: list[int],
                                                                     path: str) -> None:
    if path == "kick-lane":
        require_c_dataplane()
    root, source, policy, svc, host, slot, counters = await _host(tmp_path, lane=path == "kick-lane")
    plan = host.plans["vm"]
    # Automatic plan over a 4+3+1 host: little, little, mid, big.
    assert plan.pinning == (0, 1, 4, 7)
    g = await start_guest(slot.config.socket_path, util_threshold=1)
    await until(lambda: len(policy.vms["vm"].tids) == 4, what="vCPU threads attached")
    assert policy.vms["vm"].tids == dict(enumerate(vcpu_threads))
    if path == "kick-lane":
        await until(lambda: slot.device._lane_slot is not None, what="request queue on the kick lane")
    engine = policy.vms["vm"].engine
    # The big vCPU's util rises step by step: its thread's clamp follows.
    seen = []
    for util in (100, 300, 600, 1000):
        g.driver.set_util(3, util)
        g.driver.flush()
        await until(lambda: slot.device.vcpus[3].util == util and engine.vcpus[3] is not None)
        seen.append(engine.vcpus[3])
    assert seen == [100, 300, 600, 1000]  # a big vCPU on the big pCPU: clamp == util
    # A little vCPU saturating asks for no more than the little pCPU's capacity.
    g.driver.set_util(0, 1024)
    g.driver.flush()
    await until(lambda: engine.vcpus[0] is not None)
    assert engine.vcpus[0] == 160
    # Every change went to the vCPU's thread: applied, or recorded where this kernel has no clamps.
    done = "clamps_recorded" if policy.actuator.degraded else "clamps_applied"
    assert counters.get(done) == 5 and counters.get("clamp_failed") == 0
    await g.close()
    await until(lambda: slot.connection is None)
    assert policy.vms["vm"].tids == {} and policy.actuator.originals == {}
    await host.close()
    source.close()


async def test_threads_are_pinned_while_connected_and_restored_after(tmp_path: Path, vcpu_threads: list[int]) -> None:
    root, source, policy, svc, host, slot, counters = await _host(tmp_path, vcpus=2)
    before = {t: os.sched_getaffinity(t) for t in vcpu_threads}
    g = await start_guest(slot.config.socket_path)
    await until(lambda: len(policy.vms["vm"].tids) == 2)
    # This machine has CPUs 0 and 1; the fake host's plan for 2 vCPUs is (0, 4):
    # pinning to CPU 4 fails for real (EINVAL) and is counted; CPU 0 succeeds.
    assert host.plans["vm"].pinning == (0, 4)
    assert os.sched_getaffinity(vcpu_threads[0]) == {0}
    assert counters.get("pin_failed", "einval") == 1
    await g.close()
    await until(lambda: slot.connection is None)
    assert {t: os.sched_getaffinity(t) for t in vcpu_threads} == before
    await host.close()
    source.close()


async def test_sysfs_frequency_change_reaches_the_guest_config(tmp_path: Path, vcpu_threads: list[int]) -> None:
    root, source, policy, svc, host, slot, counters = await _host(tmp_path)
    g = await start_guest(slot.config.socket_path)
    assert [g.driver.cur_khz(v) for v in range(4)] == [300000, 300000, 400000, 500000]
    set_cur_freq(root, 7, 1500000)  # the big cluster (policy7) speeds up
    assert source.sample()
    await until(lambda: g.driver.cur_khz(3) == 1500000, what="guest sees the big cluster speed up")
    assert g.driver.cur_khz(0) == 300000
    # A move below the threshold (1% of max) is not worth a notification.
    n = g.fe.config_change_msgs
    set_cur_freq(root, 7, 1510000)
    source.sample()
    await asyncio.sleep(0.05)
    assert g.fe.config_change_msgs == n and slot.counters.get("mirror_below_threshold") >= 1
    await g.close()
    await host.close()
    source.close()


async def test_hotplug_re_pins_a_vcpu_whose_pcpu_went_away(tmp_path: Path, vcpu_threads: list[int]) -> None:
    root, source, policy, svc, host, slot, counters = await _host(tmp_path, vcpus=2)
    g = await start_guest(slot.config.socket_path)
    assert host.plans["vm"].pinning == (0, 4)
    gen = g.driver.config.generation  # type: ignore[union-attr]
    # The big cluster is not this VM's: its changes never reach this guest.
    set_cur_freq(root, 7, 2802000)
    assert source.sample()
    await asyncio.sleep(0.05)
    assert g.fe.config_change_msgs == 0 and g.driver.config.generation == gen  # type: ignore[union-attr]
    for cpu in (4, 5, 6):  # the whole mid cluster goes offline: its domain vanishes
        set_cpu_online(root, cpu, False)
    host.on_cpus_changed()
    new = host.plans["vm"].pinning
    assert not {4, 5, 6} & set(new) and len(set(new)) == 2
    await until(lambda: g.driver.config is not None and g.driver.config.generation > gen, what="new map reaches guest")
    assert 2253000 not in [d.max_khz for d in g.driver.config.domains]  # type: ignore[union-attr]
    await g.close()
    await host.close()
    source.close()
