"""cgroups.py: the pure parts (uclamp text, the ancestors' cap, templates); the kernel side runs in the test host.

The CI machine has no cgroup v2 cpu controller: moving threads into threaded
cgroups and the kernel's effective clamps are tested for real inside the test
host (tests/test_testhost.py).  Here a directory tree stands in for the
hierarchy only where the code just reads files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_user_cpufreq.backend.host.actuators import CgroupClampActuator
from vhost_user_cpufreq.backend.host.cgroups import parse_uclamp, uclamp_cap
from vhost_user_cpufreq.backend.service.config import ConfigError, parse_config
from vhost_user_cpufreq.backend.counters import Counters


@pytest.mark.parametrize(("text", "value"), [("max", 1024), ("0.00", 0), ("50.00", 512), ("87.89", 900),
                                             ("29.30\n", 300), ("100.00", 1024)])
def test_uclamp_text_in_capacity_units(text: str, value: int) -> None:
    assert parse_uclamp(text) == value


def _tree(root: Path, levels: dict[str, str | None]) -> Path:
    p = root
    for name, value in levels.items():
        p = p / name
        p.mkdir()
        if value is not None:
            (p / "cpu.uclamp.min").write_text(value + "\n")
    return p


def test_the_cap_is_the_smallest_ancestor_value_and_the_root_caps_nothing(tmp_path: Path) -> None:
    leaf = _tree(tmp_path, {"machine.slice": "max", "vm.scope": "60.00", "vuc-domain0": "10.00"})
    assert uclamp_cap(leaf, root=tmp_path) == round(60 * 1024 / 100)  # its own value is not a cap
    assert uclamp_cap(tmp_path / "machine.slice", root=tmp_path) == 1024
    # An ancestor without the cpu controller (no cpu.uclamp.min) lets nothing below be clamped.
    bare = _tree(tmp_path, {"system.slice": None, "qemu.service": "max", "vuc": "0.00"})
    assert uclamp_cap(bare, root=tmp_path) == 0


def test_a_clamp_above_the_cap_is_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    leaf = _tree(tmp_path, {"system.slice": "0.00", "qemu.service": "max", "vuc-domain0": "0.00"})
    c = Counters()
    act = CgroupClampActuator(c, root=tmp_path)
    assert act.clamp(leaf, 700) and act.clamp(leaf, 710)
    assert (leaf / "cpu.uclamp.min").read_text() == "69.34\n"  # still written: raising the ancestors applies it
    assert act.caps[leaf] == 0
    assert c.snapshot()[("clamps_capped", "cgroup-ancestor")] == 2
    assert sum("capped at 0" in r.message for r in caplog.records) == 1  # once per rise above the cap
    act.restore(leaf)
    assert (leaf / "cpu.uclamp.min").read_text() == "0.00\n" and leaf not in act.caps


def _vm(cgroup: str) -> dict:  # type: ignore[type-arg]
    return {"vm": {"web": {"socket": "/run/web.sock", "vcpus": 2, "clamp": "cgroup", "cgroup": cgroup}}}


@pytest.mark.parametrize("template", ["{qemu}/vuc-domain{domain}", "{qemu}/vuc-vcpu{vcpu}", "{qemu}/vuc",
                                      "/sys/fs/cgroup/machine.slice/vm/libvirt/vcpu{vcpu}",
                                      "/sys/fs/cgroup/vuc/domain{domain}"])
def test_cgroup_templates_accepted(template: str) -> None:
    assert parse_config(_vm(template)).vms["web"].cgroup == template


@pytest.mark.parametrize("template", [
    "{qemu}/a/b{vcpu}",  # deeper than one level: threads move only within their process's threaded subtree
    "{qemu}/{vcpu}-{domain}",  # both: which one?
    "{qemu}/",  # no name
    "/sys/fs/cgroup/{qemu}/x{vcpu}",  # {qemu} only as the prefix
    "/sys/fs/cgroup/vm",  # an existing cgroup for all vCPUs: its own threads would be clamped too
])
def test_cgroup_templates_refused(template: str) -> None:
    with pytest.raises(ConfigError, match="cgroup"):
        parse_config(_vm(template))
