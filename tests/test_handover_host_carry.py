"""What the actuators wrote for a VM, carried to a successor process (backend/host/carry.py, cgroups.py
adopt_cgroups): the successor writes nothing that is in place already, and when the VM goes it puts back
what was there before the *first* process, not the predecessor's clamps.

A directory tree stands in for the cgroup hierarchy (as tests/test_power_cap.py does): what is tested is
which values are written where, and when.  Two HostPolicy objects play the two processes; the session
snapshot between them is encoded and decoded as a handover does.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest

from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.cpufreq.carry import clamps_of, restore_clamps, restore_host
from vhost_user_cpufreq.backend.host.actuators import CgroupClampActuator, Original, ThreadActuator
from vhost_user_cpufreq.backend.host.cgroups import ThreadedCgroups, adopt_cgroups
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.host.statefile import CgroupRecord, StateFile, thread_start_time
from vhost_user_cpufreq.backend.policy.engine import EngineConfig, VcpuPlacement, VmLimits
from vhost_user_cpufreq.protocol.host_snapshot import CgroupCarry, HostSnapshot, ThreadCarry
from vhost_user_cpufreq.protocol.session_snapshot import SnapshotError, decode, encode

from .test_power_cap import _Config
from .test_session_snapshot import _simple

PLACES = [VcpuPlacement(0, None, 1024, 1024, 2000000, 0), VcpuPlacement(1, None, 1024, 1024, 2000000, 0)]
LIMITS = VmLimits(0, 1024, 800)


def _tree(root: Path) -> list[Path]:
    out = []
    for v in range(2):
        cg = root / f"vcpu{v}"
        cg.mkdir()
        (cg / "cpu.uclamp.min").write_text("10.00\n")  # what the administrator had set
        (cg / "cpu.uclamp.max").write_text("max\n")
        out.append(cg)
    return out


def _policy(root: Path) -> tuple[HostPolicy, Counters]:
    c = Counters()
    pol = HostPolicy(ThreadActuator(c, dry_run=True), config=EngineConfig(min_interval=0.0),
                     cgroups=CgroupClampActuator(c, root=root), c_engine=False)
    pol.bind("v", PLACES, LIMITS, cgroup=str(root / "vcpu{vcpu}"))
    return pol, c


def _carry(old: HostPolicy) -> tuple[object, HostSnapshot | None]:
    """The engine's and the actuators' state as they reach the successor: through an encoded snapshot."""
    clamps = old.engine_state("v")
    host = old.host_state("v")
    assert clamps is not None
    snap = dataclasses.replace(_simple(), device=dataclasses.replace(_simple().device, clamps=clamps_of(old, "v"),
                                                                     host=host))
    d = decode(encode(snap), 4).device
    return d.clamps, d.host


async def test_cgroup_clamps_in_place_are_not_written_again_and_the_first_originals_come_back(tmp_path: Path) -> None:
    cgs = _tree(tmp_path)
    old, _ = _policy(tmp_path)
    old.attach_threads("v", {0: 10_000_001, 1: 10_000_002})
    old.on_records("v", [(0, 600, 0), (1, 300, 0)], _Config(), 1.0)
    clamped = [(cg / "cpu.uclamp.min").read_text() for cg in cgs]
    assert clamped != ["10.00\n", "10.00\n"] and [(cg / "cpu.uclamp.max").read_text() for cg in cgs] == ["78.12\n"] * 2
    clamps, host = _carry(old)
    assert host is not None and [c.original_min for c in host.cgroups] == ["10.00", "10.00"]

    new, counters = _policy(tmp_path)
    restore_clamps(new, "v", clamps)  # type: ignore[arg-type]
    restore_host(new, "v", host)
    for cg in cgs:  # anything the successor writes from now on shows
        (cg / "cpu.uclamp.min").write_text("sentinel\n")
        (cg / "cpu.uclamp.max").write_text("sentinel\n")
    new.attach_threads("v", {0: 10_000_001, 1: 10_000_002})
    new.on_records("v", [(0, 610, 0), (1, 300, 0)], _Config(), 2.0)  # within the hysteresis: no change
    assert [(cg / "cpu.uclamp.min").read_text() for cg in cgs] == ["sentinel\n"] * 2
    assert [(cg / "cpu.uclamp.max").read_text() for cg in cgs] == ["sentinel\n"] * 2
    assert counters.get("clamps_applied") == 0 and counters.get("caps_applied") == 0
    # A real change is written; and when the VM goes, what the administrator had comes back.
    new.on_records("v", [(0, 1000, 0)], _Config(), 3.0)
    assert (cgs[0] / "cpu.uclamp.min").read_text() == "78.12\n"
    new.detach("v")
    assert [(cg / "cpu.uclamp.min").read_text() for cg in cgs] == ["10.00\n"] * 2
    assert [(cg / "cpu.uclamp.max").read_text() for cg in cgs] == ["max\n"] * 2


async def test_without_the_carry_the_successor_would_leave_the_predecessors_clamp_behind(tmp_path: Path) -> None:
    """The failure the carry prevents, shown: the clamped value taken for the original."""
    cgs = _tree(tmp_path)
    old, _ = _policy(tmp_path)
    old.attach_threads("v", {0: 10_000_001, 1: 10_000_002})
    old.on_records("v", [(0, 600, 0), (1, 600, 0)], _Config(), 1.0)
    clamped = (cgs[0] / "cpu.uclamp.min").read_text()
    new, _ = _policy(tmp_path)
    new.attach_threads("v", {0: 10_000_001, 1: 10_000_002})
    new.on_records("v", [(0, 600, 0), (1, 600, 0)], _Config(), 2.0)
    new.detach("v")
    assert (cgs[0] / "cpu.uclamp.min").read_text() == clamped != "10.00\n"


def test_carried_entries_this_process_does_not_know_are_ignored_and_counted(tmp_path: Path) -> None:
    _tree(tmp_path)
    new, counters = _policy(tmp_path)
    me = os.getpid()
    new.actuator.originals[me] = Original(None, 0, 1024, False)  # adopted from the state file
    host = HostSnapshot((ThreadCarry(me, 300, 700), ThreadCarry(2_000_000_000, 1, 1)),
                        (CgroupCarry(str(tmp_path / "vcpu0"), "10.00", 300, "max", 700),
                         CgroupCarry("/sys/fs/cgroup/elsewhere", "0.00", 1024, None, None)))
    new.restore_host_state("v", host)
    assert new.actuator.clamps == {me: 300} and new.actuator.caps == {me: 700}
    assert new.cgroups.values == {tmp_path / "vcpu0": 300}
    assert counters.get("carry_ignored") == 2


def test_a_hostile_host_section_is_refused() -> None:
    snap = dataclasses.replace(_simple(), device=dataclasses.replace(_simple().device, host=HostSnapshot(
        (ThreadCarry(5, 1, None),), (CgroupCarry("/sys/fs/cgroup/a", "max", None, None, None),))))
    assert decode(encode(snap), 4).device.host == snap.device.host
    for bad in [
        HostSnapshot((), (CgroupCarry("/sys/fs/cgroup/a", "1; rm -rf", None, None, None),)),
        HostSnapshot((), (CgroupCarry("relative/path", None, None, None, None),)),
        HostSnapshot((), (CgroupCarry("/sys/fs/cgroup/../../etc", None, None, None, None),)),
        HostSnapshot((ThreadCarry(0, None, None),), ()),
        HostSnapshot((ThreadCarry(5, 2000, None),), ()),
        HostSnapshot((ThreadCarry(5, 1, None), ThreadCarry(5, 2, None)), ()),
    ]:
        raw = encode(dataclasses.replace(snap, device=dataclasses.replace(snap.device, host=bad)))
        with pytest.raises(SnapshotError) as err:
            decode(raw, 4)
        assert err.value.reason == "malformed", bad


def test_threaded_cgroups_a_predecessor_made_are_adopted_and_removed_with_their_vm(tmp_path: Path) -> None:
    state = StateFile(str(tmp_path / "state.json"))
    home = tmp_path / "qemu.scope"
    made = home / "vuc-vcpu0"
    made.mkdir(parents=True)
    me = threading.get_native_id()
    state.record_cgroup(CgroupRecord(str(made), str(home), [(me, thread_start_time(me) or 0)], True))
    state.record_cgroup(CgroupRecord(str(home / "gone"), str(home), [], False))
    threaded = ThreadedCgroups(Counters(), state=StateFile(str(tmp_path / "state.json")))
    assert adopt_cgroups(threaded.state, threaded) == 1  # type: ignore[arg-type]
    assert set(threaded.made) == {made} and threaded.made[made].home == home and home in threaded.enabled_cpu
    assert [r.path for r in StateFile(str(tmp_path / "state.json")).load_cgroups()] == [str(made)]
