"""The arm64 guest's scheduler on a heterogeneous host (issue 25): capacities, frequency invariance, placement.

Same image and /init as tests/test_linux_guest.py (guest-driver-model/linux/build.sh, arm64),
with ``vuc.topo=1`` (guest-driver-model/linux/topo.sh).  The host is the GS101 phone (PIXEL6:
little, mid and big domains of capacity 160, 498 and 1024); the VM's four vCPUs map onto all
three, with the shared frequency page (SPEC 8).  The guest must show:

* each vCPU's ``cpu_capacity`` is its domain's capacity, and the scheduler domains carry
  ``SD_ASYM_CPUCAPACITY``.  The VMM's part (:func:`capacity_dtb`): the vCPUs'
  ``capacity-dmips-mhz`` in the device tree, the host CPUs' own; Linux derives the capacity
  from it and each policy's top frequency, and the driver checks it against the device's;
* the module's frequency-scale source: the busy big vCPU's ``arch_freq_scale`` equals the page's
  scale for its domain, and follows a host change within two ticks, with no config read or
  config change notification after probe;
* placement: a CPU-bound task spends more of its samples on the big vCPU than chance (1 in 4);
* a topology change the device announces (the VM re-pinned: vCPU 2 moves from the mid domain to
  the big one, so the VM spans two domains instead of three): the driver makes its policies
  anew without a rebind, cpu_capacity follows, the domains keep their asymmetry and the
  CPU-bound task runs on a big vCPU.
* the energy model (SPEC 9.4): the device gives each domain's power per OPP (GS101's, from its
  device tree) in the page, the module registers one perf domain per device domain before the
  governors start, and the kernel runs EAS (``sched_energy_aware`` 1, the perf domains in
  debugfs ``energy_model``).  Where light tasks ran, with the CPU-bound task and alone, is
  measured and printed; after the re-pinning the kernel's model is stale (``em_stale``: 7.3
  lets a module neither update nor remove a CPU perf domain).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.protocol.cpufreq import UTIL_SCALE
from vhost_user_cpufreq.protocol.energy import F_ENERGY_MODEL

from .qemu.fixture import QemuInstall, QemuLab, _child_setup
from .test_linux_guest import (
    BAD_KERNEL_LOG,
    BOOT_TIMEOUT,
    HOST_CHANGE,
    GuestImage,
    build_guest_image,
    parse_policies,
    parse_stats,
)

pytestmark = pytest.mark.qemu

#: vCPUs 0-1 on the little domain, 2 on the mid one, 3 on the big one.
VMAP = (0, 0, 1, 2)
BIG = 3
LITTLE = (0, 1)
PLACEMENT_SECS = 6
#: During the placement check every host domain runs at its top: the host a busy VM would
#: have (the lab's host source is static; a real host's governor raises the frequency for
#: busy vCPU threads, and frequency-invariant load tracking then sees the little vCPU full).
HOST_BUSY = tuple(d.max_khz for d in PIXEL6.domains)
#: The topology change the device announces: vCPU 2 re-pinned from the mid domain to the big one,
#: beside vCPU 3; the VM now spans two domains, not three (the driver follows without a rebind).
REMAP = (0, 0, 2, 2)
NEW_BIG = (2, 3)


FIXTURE = Path(__file__).parent / "fixtures" / "hosts" / "google-gs101-pixel6.json"


def dmips_of_host_domains() -> list[int]:
    """Each PIXEL6 host domain's capacity-dmips-mhz, from the GS101 device tree (the fixture)."""
    cpus = {c["cpu"]: c["capacity_dmips_mhz"] for c in json.loads(FIXTURE.read_text())["cpus"]}
    return [cpus[d.cpus[0]] for d in PIXEL6.domains]


def capacity_dtb(image: GuestImage, install: QemuInstall, workdir: Path, dmips: list[int]) -> str:
    """The virt machine's own device tree with ``capacity-dmips-mhz`` on each vCPU, as QEMU's path.

    This is the VMM's part, as for upstream virtual-cpufreq: Linux's arch topology code reads
    capacity-dmips-mhz at boot and, when the cpufreq driver creates the policies, sets each
    CPU's capacity from it and the policy's top frequency and rebuilds the scheduler domains
    with their asymmetry (the only path that rescans it after boot; a module cannot).
    """
    raw = workdir / "virt.dtb"
    subprocess.run([*image.qemu(install), "-machine", f"virt,dumpdtb={install.guest_path(raw)}", "-cpu", "max",
                    "-accel", "tcg", "-smp", str(len(dmips)), "-m", "256M", "-nodefaults", "-display", "none"],
                   check=True, capture_output=True, timeout=60)
    dts = subprocess.run([*install.prefix[:-1], "dtc", "-q", "-I", "dtb", "-O", "dts", install.guest_path(raw)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    for cpu, d in enumerate(dmips):
        dts, n = re.subn(rf"(\n(\t+)cpu@{cpu:x} {{\n)", rf"\1\2\tcapacity-dmips-mhz = <{d}>;\n", dts)
        assert n == 1, f"no cpu@{cpu:x} node in the virt device tree"
    (workdir / "virt-cap.dts").write_text(dts)
    out = workdir / "virt-cap.dtb"
    subprocess.run([*install.prefix[:-1], "dtc", "-q", "-I", "dts", "-O", "dtb", "-o", install.guest_path(out),
                    install.guest_path(workdir / "virt-cap.dts")], check=True, capture_output=True, timeout=60)
    return install.guest_path(out)


@pytest.fixture(scope="module")
def arm64_guest_image(qemu_install: QemuInstall) -> GuestImage:
    return build_guest_image(qemu_install, "arm64")


def field(lines: list[str], prefix: str) -> dict[str, str]:
    """The key=value words of the first line starting with ``prefix``."""
    for line in lines:
        if line.startswith(prefix):
            return dict(w.split("=", 1) for w in line[len(prefix):].split() if "=" in w)
    raise AssertionError(f"no line starting with {prefix!r}")


async def test_arm64_guest_scheduler_sees_capacities_and_host_frequency(
        qemu_lab: QemuLab, arm64_guest_image: GuestImage) -> None:
    lab = qemu_lab
    install = lab.install
    slot = await lab.add_vm("gs101", VMAP, shared_page=True)
    cfg = slot.device.config
    model = slot.device.energy_model  # as booted (the re-pinning below rebuilds it)
    host_dmips = dmips_of_host_domains()
    dtb = capacity_dtb(arm64_guest_image, install, lab.dir, [host_dmips[d] for d in VMAP])
    cmd = arm64_guest_image.command(
        install, install.guest_path(lab.socket_path("gs101")), len(VMAP),
        f"vuc.busy_cpu={BIG} vuc.busy_secs=2 vuc.wait_secs=20 vuc.topo=1 vuc.placement_secs={PLACEMENT_SECS} "
        "sched_verbose",  # the scheduler domains in debugfs
        ("-dtb", dtb))
    lines: list[str] = []
    notes_before_remap = -1
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(BOOT_TIMEOUT):
            while line_b := await proc.stdout.readline():
                line = line_b.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if line.startswith("VUC: wait-host-change"):
                    lab.source.set_frequencies(HOST_CHANGE)
                elif line.startswith("VUC: placement-start"):
                    lab.source.set_frequencies(HOST_BUSY)
                elif line.startswith("VUC: wait-topology-change"):
                    notes_before_remap = slot.counters.get("config_notifications")
                    slot.device.remap(REMAP)
            rc = await proc.wait()
    except TimeoutError:
        pytest.fail(f"guest did not finish within {BOOT_TIMEOUT}s:\n" + "\n".join(lines[-60:]), pytrace=False)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    wall = time.monotonic() - t0
    output = "\n".join(lines)
    if os.environ.get("VUC_GUEST_LOG"):  # keep the guest's output for a report
        Path(os.environ["VUC_GUEST_LOG"]).write_text(output + "\n")
    ctx = f"\n--- guest output ({wall:.1f}s) ---\n{output}"
    assert rc == 0 and "VUC: done" in output, f"QEMU exited {rc}{ctx}"
    assert re.search(r"virtio_cpufreq virtio\d+: .*frequency page, frequency-scale source, firmware capacities, "
                     r"energy model\n", output + "\n"), ctx

    # Capacities: each vCPU has its domain's, the scheduler sees the asymmetry.
    want = {f"cpu{v}": str(cfg.domain_of(v).capacity) for v in range(len(VMAP))}
    assert len(set(want.values())) == 3, want
    assert field(lines, "VUC: capacity") == want, ctx
    sd_flags = [line for line in lines if line.startswith("VUC: sd ") and line.endswith(" probe")]
    assert sd_flags, f"no scheduler domains shown{ctx}"
    assert any("SD_ASYM_CPUCAPACITY" in line for line in sd_flags), "\n".join(sd_flags)
    # The energy model: one perf domain per device domain, the device's tables, and EAS on.
    assert model is not None and slot.device.shmem_features & (1 << F_ENERGY_MODEL)
    eas = field(lines, "VUC: eas")
    assert eas["sched_energy_aware"] == "1", f"{eas}{ctx}"  # the default: on only with perf domains
    # The scheduler built the root domain's perf domains (printed under sched_verbose): EAS runs.
    assert re.search(r"root_domain 0-3: pd\d+:\{ cpus=", output), ctx
    pds = {w["cpus"]: w for w in (dict(x.split("=", 1) for x in line.split()[3:-1]) for line in lines
                                  if line.startswith("VUC: em-pd ") and line.endswith(" probe"))}
    want_pds = {"0-1": model.domains[0], "2": model.domains[1], "3": model.domains[2]}
    assert set(pds) == set(want_pds), f"{pds}{ctx}"
    for cpus, dom in want_pds.items():
        top = dom.states[-1]
        assert pds[cpus]["states"] == str(len(dom.states)) and pds[cpus]["top"] == f"{top.khz}:{top.power_uw}", (
            cpus, pds[cpus], top)
    # After rmmod cpu_scale holds the firmware's capacities again (arch_topology's, from
    # capacity-dmips-mhz and the policies' top frequencies): the driver puts back what it replaced.
    removed = [line for line in lines if line.startswith("VUC: capacity") and line.endswith(" removed")]
    assert removed and field(removed, "VUC: capacity") == want, ctx

    # Frequency invariance from the page: the busy big vCPU's scale is the page's, before and after.
    start = field(lines, "VUC: fie-start")
    big = cfg.domain_of(BIG)
    assert start["scale"] == start["page"] == str(UTIL_SCALE * big.cur_khz // big.max_khz), (start, big)
    follow = field(lines, "VUC: fie-follow")
    scale_after = UTIL_SCALE * HOST_CHANGE[VMAP[BIG]] // big.max_khz
    assert follow["after"] == f"{scale_after}/{scale_after}", (follow, scale_after)
    # The source took the new value at most one of the busy vCPU's own ticks after the guest could
    # first see it (lag_ticks_max bounds it from the poll before; its host thread may run late under
    # TCG on a loaded machine while another vCPU moves jiffies on: those are reported).
    assert int(follow["lag_ticks"]) <= 1, f"{follow}{ctx}"
    probe, end = parse_stats(lines, "probe"), parse_stats(lines, "end")
    assert probe["fie"] == 1 and end["fie_ticks"] > 0, (probe, end)
    assert probe["capacity_source"] == 2 and probe["capacity_mismatch"] == 0, probe  # firmware, agreeing
    assert (probe["em"], probe["em_domains"], probe["em_rejected"], probe["em_errors"]) == (1, 3, 0, 0), probe
    assert end["config_reads"] == probe["config_reads"] and end["config_changes"] == 0, (probe, end)
    # Frequencies came through the page alone; the topology change is announced in config space.
    assert notes_before_remap == 0 and slot.counters.get("config_notifications") >= 1, slot.counters.snapshot()

    # Placement: where the heavy and the light tasks ran, before and after the re-pinning.
    placements = [dict(w.split("=", 1) for w in line.split()[2:]) for line in lines
                  if line.startswith("VUC: placement ")]
    assert len(placements) == 2, ctx
    alone = [c for line in lines if line.startswith("VUC: placement-light ")
             for c in map(int, line.split("=", 1)[1].split(","))]
    assert alone, ctx
    light_alone = sum(c in LITTLE for c in alone) / len(alone)
    shares = []
    for placed, big_cpus in zip(placements, ((BIG,), NEW_BIG)):
        heavy = [int(c) for c in placed["heavy"].split(",")]
        light = [int(c) for c in placed["light"].split(",")]
        shares.append((sum(c in big_cpus for c in heavy) / len(heavy), len(big_cpus) / len(VMAP), len(heavy),
                       sum(c in LITTLE for c in light) / len(light), len(light)))
    print(f"\narm64 guest on GS101: capacities {want}, eas {eas}, fie {follow}, " + "; ".join(
        f"{what}: heavy on a big vCPU {h:.0%} of {nh} samples (chance {c:.0%}), light on little "
        f"{li:.0%} of {nl} (chance 50%)" for what, (h, c, nh, li, nl) in zip(("as booted", "re-pinned"), shares))
        + f"; light tasks alone on little {light_alone:.0%} of {len(alone)} samples (chance 50%)"
        + f"; {wall:.0f}s", file=sys.stderr)
    for h, chance, _, _, _ in shares:
        assert h > (1 + chance) / 2, f"heavy task on a big vCPU only {h:.0%} of the time: {placements}"

    # The re-pinning: new policies, capacities and the device's capacities in cpu_scale.
    new = slot.device.config
    remapped = [line for line in lines if line.startswith("VUC: capacity") and line.endswith(" remapped")]
    want_new = {f"cpu{v}": str(new.domain_of(v).capacity) for v in range(len(VMAP))}
    assert want_new != want and remapped and field(remapped, "VUC: capacity") == want_new, ctx
    policies = parse_policies(lines, "remapped")
    firsts = [new.vcpu_domain.index(d) for d in range(len(new.domains))]
    assert len(new.domains) == 2 and {n: p.max for n, p in policies.items()} == {
        v: new.domain_of(v).max_khz for v in firsts}, ctx
    st = parse_stats(lines, "remapped")
    assert st["topology_changes"] == 1 and st["capacity_source"] == 1 and st["capacity_mismatch"] == 0, st
    # The device rewrote the model for the new map; the kernel's perf domains cannot follow.
    assert st["em"] == 1 and st["em_stale"] == 1 and st["em_rejected"] == 0, st
    assert any("SD_ASYM_CPUCAPACITY" in line for line in lines
               if line.startswith("VUC: sd ") and line.endswith(" remapped")), ctx
    # Rebound after the re-pinning: the firmware's capacities are stale, the device's win.
    assert parse_stats(lines, "rebound")["capacity_source"] == 1, ctx
    assert parse_stats(lines, "rebound")["capacity_mismatch"] == 0, ctx
    # The kernel kept the perf domains of the first bind (CPU perf domains are never unregistered).
    rebound = parse_stats(lines, "rebound")
    assert (rebound["em"], rebound["em_domains"], rebound["em_exists"]) == (1, 0, len(new.domains)), rebound

    assert re.search(r"VUC: rmmod rc=0 policies_left=0", output), ctx
    bad = [line for line in lines if BAD_KERNEL_LOG.search(line)]
    assert not bad, "\n".join(bad) + ctx
    assert wall < 120, f"arm64 boot test took {wall:.0f}s"
