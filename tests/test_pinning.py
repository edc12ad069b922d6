"""Pinning modes on hosts with fewer pCPUs than vCPUs, and affinity someone else owns (issue 22).

The pure rules (policy/placement.py) first; then the daemon in-process on a
generated sysfs tree shaped like this machine (CPUs 0 and 1), serving 4 VMs of
4 vCPUs at once, each VM a process of its own with QEMU-named vCPU threads
(tests/vcpu_guest.py), in every mode, with real affinity calls on real threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.policy.placement import home_cpu, plan_placement
from vhost_user_cpufreq.backend.service.config import ConfigError, load_config
from vhost_user_cpufreq.backend.service.daemon import Daemon

from .helpers import short_tmpdir, until
from .sysfs_tree import HostSpec, make_sysfs_tree

ROOT = Path(__file__).resolve().parent.parent
PHONE = [[0, 1, 2, 3], [4, 5, 6], [7]]
CAPACITY = {0: 160, 1: 160, 2: 160, 3: 160, 4: 498, 5: 498, 6: 498, 7: 1024}


# -- the rules ---------------------------------------------------------------------------------------


def test_auto_pins_one_to_one_when_it_fits_and_serves_unpinned_when_it_does_not() -> None:
    p = plan_placement(3, "auto", PHONE)
    assert (p.mode, p.pinned, p.note) == ("auto", (0, 4, 7), "")
    p = plan_placement(4, "auto", [[0, 1]])
    assert p.mode == "none" and p.pinned == (None,) * 4 and p.allowed == (frozenset({0, 1}),) * 4
    assert "does not fit" in p.note and "4 vCPUs but only 2 free pCPUs" in p.note
    # Another VM's pCPUs count as taken.
    assert plan_placement(2, "auto", [[0, 1, 2]], taken=[0, 1]).mode == "none"


def test_an_explicit_list_may_share_pcpus_but_not_name_offline_ones() -> None:
    p = plan_placement(4, (0, 1, 0, 1), [[0, 1]])
    assert p.mode == "explicit" and p.pinned == (0, 1, 0, 1) and p.allowed[2] == frozenset({0})
    with pytest.raises(ValueError, match=r"names offline or unknown pCPUs \[5\] \(online: 0-1\)"):
        plan_placement(2, (0, 5), [[0, 1]])
    with pytest.raises(ValueError, match="lists 1 pCPUs for 2 vCPUs"):
        plan_placement(2, (0,), [[0, 1]])


def test_keep_follows_each_threads_affinity_and_none_allows_every_cpu() -> None:
    p = plan_placement(3, "keep", PHONE, affinities={0: {4, 5}, 1: {0, 7}, 2: {99}})
    assert p.mode == "keep" and p.pinned == (None, None, None)
    # An affinity with no online CPU left is decided as if the vCPU could run anywhere.
    assert p.allowed == (frozenset({4, 5}), frozenset({0, 7}), frozenset(range(8)))
    assert plan_placement(2, "keep", PHONE).allowed == (frozenset(range(8)),) * 2  # threads not found yet
    assert plan_placement(2, "none", PHONE).allowed == (frozenset(range(8)),) * 2


def test_a_vcpu_that_may_run_on_several_clusters_is_decided_for_the_biggest() -> None:
    assert home_cpu({0, 4, 5}, CAPACITY) == 4
    assert home_cpu({1, 7}, CAPACITY) == 7
    assert home_cpu({3, 2}, CAPACITY) == 2
    with pytest.raises(ValueError):
        home_cpu(set(), CAPACITY)


@given(st.integers(1, 12), st.sampled_from(["auto", "keep", "none"]), st.sets(st.integers(0, 7)))
def test_every_plan_places_every_vcpu_on_online_cpus(n: int, mode: str, taken: set[int]) -> None:
    p = plan_placement(n, mode, PHONE, taken=taken)
    assert len(p.pinned) == len(p.allowed) == n
    assert all(a and a <= set(range(8)) for a in p.allowed)
    if p.pins:
        assert len(set(p.pinned)) == n and not set(p.pinned) & taken  # type: ignore[arg-type]
    else:
        assert p.pinned == (None,) * n


# -- the daemon on a 2-CPU host ------------------------------------------------------------------------

TWO_CPUS = HostSpec.big_little([(2, 400000, 2000000, 1024)], name="two CPUs")
MODES: dict[str, Any] = {"auto": "auto", "explicit": None, "keep": "keep", "none": "none"}


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir("vuc-pin-") as d:
        yield d


def _config(workdir: Path, pinning: dict[str, Any], vcpus: int = 4) -> Path:
    path = workdir / "config.toml"
    text = (f'[service]\nsysfs_root = "{workdir / "sys"}"\nsample_period = 0.02\n'
            f'control_socket = "{workdir / "control.sock"}"\n')
    for name, pin in pinning.items():
        text += (f'[vm.{name}]\nsocket = "{workdir / (name + ".sock")}"\nvcpus = {vcpus}\nclamp = "thread"\n'
                 f"pinning = {json.dumps(pin)}\n")
    path.write_text(text)
    return path


class _Vm:
    def __init__(self, sock: Path, vcpus: int, cpus: set[int] | None) -> None:
        cmd = [sys.executable, "-m", "tests.vcpu_guest", str(sock), str(vcpus)]
        if cpus is not None:
            cmd.append(",".join(map(str, sorted(cpus))))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def tids(self) -> list[int]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        return list(json.loads(line)["tids"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _require_two_cpus() -> None:
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1 (the generated host mirrors them, so real pins succeed)")


@asynccontextmanager
async def _serving(path: Path, workdir: Path) -> AsyncIterator[tuple[Daemon, list[int]]]:
    """The daemon on ``path`` and a 2-vCPU VM (vcpu_guest), its threads attached; yields their tids."""
    d = Daemon(load_config(path), config_path=str(path))
    await d.start()
    vm = _Vm(workdir / "v.sock", 2, None)
    try:
        tids = await vm.tids()
        await until(lambda: len(d.policy.vms["v"].tids) == 2, what="threads attached", timeout=30)
        yield d, tids
    finally:
        vm.stop()
        await d.stop()


@pytest.mark.parametrize("mode", list(MODES))
async def test_four_vms_of_four_vcpus_are_served_at_once_on_two_cpus(workdir: Path, mode: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _require_two_cpus()
    make_sysfs_tree(workdir / "sys", TWO_CPUS)
    names = ["w", "x", "y", "z"]
    pinning = {n: MODES[mode] if mode != "explicit" else [0, 1, 0, 1] for n in names}
    calls: list[tuple[int, frozenset[int]]] = []
    real = os.sched_setaffinity

    def spy(pid: int, cpus: Any) -> None:
        calls.append((pid, frozenset(cpus)))
        real(pid, cpus)

    monkeypatch.setattr(os, "sched_setaffinity", spy)
    d = Daemon(load_config(_config(workdir, pinning)), config_path=str(workdir / "config.toml"))
    await d.start()
    # keep: the "VMM" pinned every vCPU thread to CPU 1 before the service saw them, as libvirt does.
    libvirt = {1} if mode == "keep" else None
    vms = {n: _Vm(workdir / f"{n}.sock", 4, libvirt) for n in names}
    try:
        tids = {n: await vm.tids() for n, vm in vms.items()}
        for n in names:
            await until(lambda: len(d.policy.vms[n].tids) == 4, what=f"{n}'s vCPU threads attached", timeout=30)
            await until(lambda: all(c["util"] for c in d.status()["vms"][n]["vcpus"]), what=f"{n} served",
                        timeout=30)
        st = d.status()
        ours = {t for ts in tids.values() for t in ts}
        pinned_calls = [(t, c) for t, c in calls if t in ours]
        for n in names:
            vm = st["vms"][n]
            assert vm["connected"] and vm["counters"].get("records", 0) > 0, vm
            expect = {"auto": "none", "explicit": "explicit", "keep": "keep", "none": "none"}[mode]
            assert vm["pinning"]["mode"] == expect, vm["pinning"]
            assert ("does not fit" in vm["pinning"]["note"]) == (mode == "auto")
            for c, tid in zip(vm["vcpus"], tids[n]):
                have = os.sched_getaffinity(tid)
                if mode == "explicit":
                    assert c["pcpu"] == c["vcpu"] % 2 and have == {c["vcpu"] % 2}
                elif mode == "keep":
                    assert c["pcpu"] is None and c["cpus"] == [1] and have == {1}
                else:
                    assert c["pcpu"] is None and c["cpus"] == [0, 1] and have >= {0, 1}
                # Clamps are decided for every thread, in every mode (applied, or recorded without uclamp).
                assert c["uclamp_min"] is not None
        if mode == "explicit":
            assert len(pinned_calls) == 16
        else:
            assert pinned_calls == [], pinned_calls  # keep and none never touch affinity
    finally:
        for vm in vms.values():
            vm.stop()
        await d.stop()
    # Disconnecting and stopping give unpinned threads nothing back: their affinity was never ours.
    if mode != "explicit":
        assert [(t, c) for t, c in calls if t in ours] == []


async def test_a_reload_that_changes_the_mode_applies_in_place(workdir: Path) -> None:
    _require_two_cpus()
    make_sysfs_tree(workdir / "sys", TWO_CPUS)
    path = _config(workdir, {"v": [1, 1]}, vcpus=2)
    async with _serving(path, workdir) as (d, tids):
        assert [os.sched_getaffinity(t) for t in tids] == [{1}, {1}]
        conn = d.service.vms["v"].connection
        _config(workdir, {"v": "none"}, vcpus=2)
        assert await d.reload() == ["updated v"]
        # Unpinned while connected: each thread has its own affinity again; the front-end never noticed.
        assert all(os.sched_getaffinity(t) >= {0, 1} for t in tids)
        assert d.service.vms["v"].connection is conn and conn is not None and not conn.closed.done()
        assert d.status()["vms"]["v"]["pinning"]["mode"] == "none"
        _config(workdir, {"v": [0, 1]}, vcpus=2)
        assert await d.reload() == ["updated v"]
        assert [os.sched_getaffinity(t) for t in tids] == [{0}, {1}]


async def test_pinning_to_an_offline_cpu_is_refused_at_start_and_at_reload(workdir: Path) -> None:
    make_sysfs_tree(workdir / "sys", TWO_CPUS)
    path = _config(workdir, {"v": [0, 5]}, vcpus=2)
    d = Daemon(load_config(path), config_path=str(path))
    with pytest.raises(ConfigError, match=rf"^{path}: vm\.v\.pinning: names offline or unknown pCPUs \[5\]"):
        await d.start()
    await d.stop()
    _config(workdir, {"v": "auto"}, vcpus=2)
    d = Daemon(load_config(path), config_path=str(path))
    await d.start()
    try:
        before = d.config
        _config(workdir, {"v": [0, 5]}, vcpus=2)
        with pytest.raises(ConfigError, match=r"vm\.v\.pinning: names offline or unknown pCPUs \[5\]"):
            await d.reload()
        assert d.config is before and d.host.plans["v"].pins.mode == "auto"
    finally:
        await d.stop()


async def test_a_pin_the_kernel_refuses_is_said_in_status_counted_and_logged(
        workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plan pins vCPU 1 to a CPU the generated host has and this machine does not: the kernel
    refuses (EINVAL, as it does a CPU outside a cpuset someone else owns, libvirt's <vcpupin>).
    The service serves on, and does not claim the pin."""
    _require_two_cpus()
    beyond = os.cpu_count() or 2  # no CPU has this number here
    make_sysfs_tree(workdir / "sys", HostSpec.big_little([(beyond + 1, 400000, 2000000, 1024)]))
    async with _serving(_config(workdir, {"v": [0, beyond]}, vcpus=2), workdir) as (d, tids):
        cpus = d.status()["vms"]["v"]["vcpus"]
        assert [(c["pcpu"], c["pin_applied"]) for c in cpus] == [(0, True), (beyond, False)], cpus
        assert os.sched_getaffinity(tids[0]) == {0} and os.sched_getaffinity(tids[1]) >= {0, 1}  # as it was
        assert d.counters.get("pin_failed", "einval") == 1
        assert any(f"may not use CPU {beyond}" in r.getMessage() for r in caplog.records), caplog.text
        await until(lambda: d.status()["vms"]["v"]["vcpus"][1]["util"] > 0, what="vCPU 1 served", timeout=30)
        # The command line says so too (run beside this event loop, which serves the control socket).
        p = await asyncio.create_subprocess_exec(str(Path(sys.executable).with_name("vhost-user-cpufreq")), "status",
                                                 "--control-socket", str(workdir / "control.sock"),
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 30)
        assert f"vCPU 1: pCPU {beyond} (the kernel refused the pin" in out.decode(), (out, err)


async def test_keep_follows_a_pin_the_manager_makes_after_the_threads_were_found(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt applies <vcpupin> after QEMU connected, and `virsh vcpupin` at any time: keep reads the
    kept threads' affinity again (every KEEP_RECHECK) and decides for where each may run now."""
    _require_two_cpus()
    make_sysfs_tree(workdir / "sys", TWO_CPUS)
    calls: list[int] = []
    real = os.sched_setaffinity

    def spy(pid: int, cpus: Any) -> None:
        calls.append(pid)
        real(pid, cpus)

    async with _serving(_config(workdir, {"v": "keep"}, vcpus=2), workdir) as (d, tids):
        assert [c["cpus"] for c in d.status()["vms"]["v"]["vcpus"]] == [[0, 1], [0, 1]]
        real(tids[0], {1})  # the manager pins vCPU 0, as `virsh vcpupin v 0 1` does
        monkeypatch.setattr(os, "sched_setaffinity", spy)
        await until(lambda: [c["cpus"] for c in d.status()["vms"]["v"]["vcpus"]] == [[1], [0, 1]],
                    what=lambda: d.status()["vms"]["v"]["vcpus"], timeout=5)
        assert d.status()["vms"]["v"]["pinning"]["mode"] == "keep"
        assert os.sched_getaffinity(tids[0]) == {1} and calls == []  # read, never written
