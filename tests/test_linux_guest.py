"""A real Linux guest with the real driver: guest-driver-model/linux/virtio_cpufreq.ko.

QEMU boots the trixie-backports kernel with an initramfs made by
``guest-driver-model/linux/build.sh`` (busybox, the module, an /init that
prints what it sees, lines starting with ``VUC:``), with the cpufreq device
attached to an in-process back-end (:class:`QemuLab`: ``Service``,
``StaticSource(PIXEL6)``, ``RecordingPolicy``).  The test reads the guest's
serial console and, when the guest says ``wait-host-change`` (while its
CPU-bound loop still runs), changes the host frequencies from the back-end.

The kernel, headers and toolchain live in the QEMU chroot
(``.ci/provision-guest.sh``).  Under ``VUC_REQUIRE_QEMU=1`` the test
provisions and builds them (the first time takes a minute or two);
otherwise it is skipped when they are not provisioned.

The test runs twice, with an x86_64 and an arm64 guest, from the same module
source (``VUC_GUEST_ARCH`` for build.sh; ``.ci/provision-guest.sh arm64``).

The x86_64 guest runs a ``qemu64`` CPU with an Intel family 6 signature: Linux
then sets ``constant_tsc``.  Without it, x86 Linux registers a cpufreq
transition notifier for the TSC, which disables fast frequency switching
for every cpufreq driver (and marks the TSC unstable on the first change).
The arm64 guest is ``qemu-system-aarch64 -M virt -cpu max`` under TCG, booted
straight into the kernel (no firmware) with the same device on its PCIe bus.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sys
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost_user_cpufreq.protocol.cpufreq import UTIL_SCALE, DeviceConfig

from .qemu.fixture import QemuInstall, QemuLab, _child_setup, qemu_command

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "guest-driver-model" / "linux" / "build.sh"

#: vCPUs 0 and 1 on host domain 0 (little cores), vCPU 2 on host domain 2 (big cores):
#: two guest domains, one of them shared by two vCPUs.
VMAP = (0, 0, 2)
BUSY_CPU = 2
#: New current frequencies of PIXEL6's three host domains, set while the guest is busy.
HOST_CHANGE = (1401000, 1999000, 2401000)
CPU_MODEL = "qemu64,vendor=GenuineIntel,family=6,model=15"
BOOT_TIMEOUT = 150.0

POLICY_RE = re.compile(
    r"VUC: policy policy(?P<n>\d+) driver=(?P<driver>\S+) governor=(?P<gov>\S+) related=(?P<related>\S+) "
    r"min=(?P<min>\d+) max=(?P<max>\d+) cur=(?P<cur>\d+) hw_cur=(?P<hw_cur>\d*) (?P<phase>\w+)"
)
BAD_KERNEL_LOG = re.compile(r"WARNING:|BUG:|Oops|Call Trace|general protection|kernel panic|refcount_t|"
                            r"list_(add|del) corruption|sleeping function called", re.IGNORECASE)


ARCHES = ("x86_64", "arm64")


@dataclass(frozen=True)
class GuestImage:
    kver: str
    kernel: str  # paths as QEMU (in the chroot) sees them
    initrd: str
    arch: str = "x86_64"

    def qemu(self, install: QemuInstall) -> tuple[str, ...]:
        """The command prefix that runs this architecture's QEMU."""
        if self.arch == "x86_64":
            return install.prefix
        # The chroot's qemu-system-aarch64 in place of qemu-system-x86_64, same prefix.
        return (*install.prefix[:-1], os.path.join(os.path.dirname(install.prefix[-1]), "qemu-system-aarch64"))

    def command(self, install: QemuInstall, vu_socket: str, smp: int, append: str,
                extra: tuple[str, ...] = ()) -> list[str]:
        """QEMU booting this image with the cpufreq device (``append``: the /init's knobs)."""
        if self.arch == "x86_64":
            cmd = qemu_command(install.prefix, vu_socket=vu_socket, smp=smp)
            cmd += ["-cpu", CPU_MODEL]
            console = "ttyS0"
        else:
            cmd = qemu_command(self.qemu(install), vu_socket=vu_socket, smp=smp, machine="virt")
            cmd += ["-cpu", "max", "-accel", "tcg"]
            console = "ttyAMA0"
        return cmd + [*extra, "-serial", "stdio", "-kernel", self.kernel, "-initrd", self.initrd,
                      "-append", f"console={console} quiet panic=-1 {append}", "-no-reboot"]


@dataclass
class Policy:
    n: int
    driver: str
    governor: str
    related: tuple[int, ...]
    min: int
    max: int
    cur: int
    hw_cur: int | None


@functools.lru_cache(maxsize=None)
def _build(root: Path, arch: str, require: bool) -> tuple[int, str, str]:
    env = dict(os.environ, VUC_QEMU_CHROOT=str(root), VUC_GUEST_ARCH=arch)
    if not require:
        env["VUC_GUEST_NO_PROVISION"] = "1"
    r = subprocess.run(["bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=1800)
    return r.returncode, r.stdout, r.stderr


def build_guest_image(qemu_install: QemuInstall, arch: str) -> GuestImage:
    """Build the module and the initramfs for ``arch`` (provisioning it first under VUC_REQUIRE_QEMU=1)."""
    require = os.environ.get("VUC_REQUIRE_QEMU") == "1"

    def unavailable(reason: str) -> None:
        if require:
            pytest.fail(f"VUC_REQUIRE_QEMU=1 but {reason}", pytrace=False)
        pytest.skip(reason)

    if qemu_install.root == Path("/"):
        unavailable("the Linux guest is built in the QEMU chroot (.ci/provision-qemu.sh); this QEMU has none")
    if os.geteuid() != 0:
        unavailable("building the Linux guest in the QEMU chroot needs root")
    rc, stdout, stderr = _build(qemu_install.root, arch, require)
    if rc == 3 and not require:
        pytest.skip(f"no {arch} guest kernel in {qemu_install.root}: run .ci/provision-guest.sh {arch} "
                    "(or set VUC_REQUIRE_QEMU=1 to provision it here)")
    if rc != 0:
        pytest.fail(f"{BUILD} ({arch}) exited {rc}:\n{stderr[-3000:]}", pytrace=False)
    out = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    return GuestImage(out["KVER"], out["KERNEL"], out["INITRD"], arch)


@pytest.fixture(scope="module")
def guest_image(qemu_install: QemuInstall) -> GuestImage:
    """The x86_64 guest."""
    return build_guest_image(qemu_install, "x86_64")


@pytest.fixture(scope="module", params=ARCHES)
def any_guest_image(request: pytest.FixtureRequest, qemu_install: QemuInstall) -> GuestImage:
    """The guest of each architecture in turn."""
    return build_guest_image(qemu_install, request.param)


def parse_policies(lines: list[str], phase: str) -> dict[int, Policy]:
    out: dict[int, Policy] = {}
    for line in lines:
        m = POLICY_RE.search(line)
        if m and m["phase"] == phase:
            out[int(m["n"])] = Policy(
                int(m["n"]), m["driver"], m["gov"], tuple(int(c) for c in m["related"].split(",")),
                int(m["min"]), int(m["max"]), int(m["cur"]), int(m["hw_cur"]) if m["hw_cur"] else None,
            )
    return out


def parse_stats(lines: list[str], phase: str) -> dict[str, int]:
    for line in lines:
        if line.startswith("VUC: stats ") and line.endswith(f" {phase}"):
            return {k: int(v) for k, v in (w.split("=") for w in line.split()[2:-1])}
    raise AssertionError(f"no '{phase}' statistics in the guest output")


def expected_policies(cfg: DeviceConfig) -> dict[int, tuple[tuple[int, ...], int, int, int]]:
    """policy number (its first CPU) -> (cpus, min, max, cur), from the device config."""
    out = {}
    for d, dom in enumerate(cfg.domains):
        cpus = tuple(v for v, dd in enumerate(cfg.vcpu_domain) if dd == d)
        out[cpus[0]] = (cpus, dom.min_khz, dom.max_khz, dom.cur_khz)
    return out


def ramp_into(utils: list[int], start: int, top: int) -> list[int]:
    """The strictly increasing run of consecutive values that ends at the first
    ``top`` value at or after index ``start`` (empty if there is none).

    The run may begin before ``start``: the busy window opens when the host reads
    the guest's "busy-start" console line, and on a loaded machine that line can
    arrive late (the guest waits 2 s after it before the load begins, build.sh;
    this covers what is left)."""
    end = next((i for i in range(start, len(utils)) if utils[i] == top), None)
    if end is None:
        return []
    first = end
    while first > 0 and utils[first - 1] < utils[first]:
        first -= 1
    return utils[first:end + 1]


async def test_linux_guest_binds_and_drives_the_device(qemu_lab: QemuLab, any_guest_image: GuestImage) -> None:
    lab = qemu_lab
    install = lab.install
    slot = await lab.add_vm("linux", VMAP)
    cfg_at_boot = slot.device.config
    cmd = any_guest_image.command(install, install.guest_path(lab.socket_path("linux")), len(VMAP),
                                  f"vuc.busy_cpu={BUSY_CPU} vuc.busy_secs=3 vuc.wait_secs=20")
    records = lab.policy.records["linux"]
    lines: list[str] = []
    mark: dict[str, int] = {}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(BOOT_TIMEOUT):
            while line_b := await proc.stdout.readline():
                line = line_b.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if line.startswith("VUC: busy-start"):
                    mark["busy_records"] = len(records)
                    mark["busy_reads"] = slot.counters.get("config_reads")
                elif line.startswith("VUC: wait-host-change"):
                    mark["busy_end_records"] = len(records)
                    mark["busy_end_reads"] = slot.counters.get("config_reads")
                    lab.source.set_frequencies(HOST_CHANGE)
            rc = await proc.wait()
    except TimeoutError:
        pytest.fail(f"guest did not finish within {BOOT_TIMEOUT}s:\n" + "\n".join(lines[-60:]), pytrace=False)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    wall = time.monotonic() - t0
    output = "\n".join(lines)
    ctx = f"\n--- guest output ({wall:.1f}s) ---\n{output}"
    assert rc == 0, f"QEMU exited {rc}{ctx}"
    assert "VUC: done" in output, ctx

    # The module bound the device.
    assert "VUC: insmod rc=0" in output, ctx
    assert re.search(r"VUC: bound virtio\d+ driver=virtio_cpufreq", output), ctx

    # One policy per domain, our driver, the back-end's frequencies.
    want = expected_policies(cfg_at_boot)
    probe = parse_policies(lines, "probe")
    assert sorted(probe) == sorted(want), ctx
    for n, (cpus, fmin, fmax, cur) in want.items():
        p = probe[n]
        assert (p.driver, p.related, p.min, p.max, p.hw_cur) == ("virtio-cpufreq", cpus, fmin, fmax, cur), ctx
        assert p.governor == "schedutil", ctx

    # Records for the busy vCPU, rising to the top of its domain.
    assert "busy_records" in mark and "busy_end_records" in mark, ctx
    busy = [r for r in records[mark["busy_records"]:mark["busy_end_records"]] if r.vcpu == BUSY_CPU]
    utils = [r.util for r in busy]
    assert busy, f"no records for vCPU {BUSY_CPU} while it was busy{ctx}"
    assert max(utils) == UTIL_SCALE, f"util never reached {UTIL_SCALE}: {utils}{ctx}"
    # The climb to the top: the first full-scale record inside the window, with
    # the rise that led to it (which may begin just before the window, see ramp_into).
    upto = [r.util for r in records[:mark["busy_end_records"]] if r.vcpu == BUSY_CPU]
    before = len(upto) - len(utils)
    ramp = ramp_into(upto, before, UTIL_SCALE)
    assert len(ramp) >= 3, \
        f"no rising util: {upto[max(0, before - 8):before]} | {utils}"
    dom = cfg_at_boot.domain_of(BUSY_CPU)
    for r in busy:  # F_PERF_REQUEST was negotiated: the request itself comes along
        assert dom.min_khz <= r.perf_khz <= dom.max_khz, r
        assert abs(r.util - r.perf_khz * UTIL_SCALE // dom.max_khz) <= 1, r

    # The host change reached the guest's mirror (cpuinfo_cur_freq: the frequency
    # the "hardware" runs at; scaling_cur_freq is the governor's last request).
    assert re.search(r"VUC: host-change-seen", output), ctx
    cfg_after = slot.device.config
    changed = parse_policies(lines, "changed")
    for n, (cpus, _, _, _) in expected_policies(cfg_after).items():
        assert changed[n].hw_cur == cfg_after.domain_of(cpus[0]).cur_khz, ctx
        assert changed[n].hw_cur != want[n][3], ctx

    # Config space: read at probe and once per change notification, never per tick.
    probe_stats = parse_stats(lines, "probe")
    reads = slot.counters.get("config_reads")
    assert mark["busy_end_reads"] == mark["busy_reads"] == probe_stats["config_reads"], (mark, probe_stats)
    probes = len(re.findall(r"virtio_cpufreq virtio\d+: \d+ vCPUs in \d+ domains", output))
    notifications = slot.counters.get("config_notifications")
    assert probes == 2 and notifications >= 1 and parse_stats(lines, "end")["config_changes"] >= 1, ctx
    assert reads <= probe_stats["config_reads"] * (probes + notifications), (reads, probes, notifications)

    # Every batch both driver instances made available reached the back-end, in
    # sequence (the second instance starts over with RESYNC).
    removed = re.findall(r"removed after (\d+) batches, (\d+) records, (\d+) notifications, (\d+) config reads",
                         output)
    assert len(removed) == 2, ctx
    assert sum(int(b) for b, _, _, _ in removed) == slot.counters.get("batches"), (removed, slot.counters.snapshot())
    assert sum(int(r) for _, r, _, _ in removed) == slot.counters.get("records"), (removed, slot.counters.snapshot())
    assert sum(int(c) for _, _, _, c in removed) == reads, (removed, reads)
    assert slot.counters.total("rejected") == 0 and slot.counters.get("lost_batches") == 0, slot.counters.snapshot()
    # Notification policy (SPEC 6.4): requests that were not urgent waited, and went out together.
    end = parse_stats(lines, "end")
    print(f"\nlinux guest notification policy: {end}", file=sys.stderr)
    assert end["deferred"] > 0 and end["batches"] <= end["requests"], end
    # At most one notification per batch, from the driver's own totals at removal: the "end"
    # line reads its sysfs files one by one while the driver runs (batches before notifies).
    assert all(int(n) <= int(b) for b, _, n, _ in removed), removed
    assert parse_stats(lines, "rebound")["batches"] > 0, ctx
    assert parse_stats(lines, "end")["add_errors"] == parse_stats(lines, "rebound")["add_errors"] == 0, ctx
    assert lab.policy.resets["linux"] >= 1  # the unbind stopped the ring: no boost outlives the driver

    # Rebinding: a new probe of the same device, with the host's current frequencies.
    assert re.search(r"VUC: unbind rc=0 policies_left=0", output) and re.search(r"VUC: bind rc=0 policies=2", output), ctx
    rebound = parse_policies(lines, "rebound")
    assert {n: p.hw_cur for n, p in rebound.items()} == {n: p.hw_cur for n, p in changed.items()}, ctx

    # Clean removal: rmmod succeeded, no policy left, nothing bad in the kernel log.
    assert re.search(r"VUC: rmmod rc=0 policies_left=0", output), ctx
    bad = [line for line in lines if BAD_KERNEL_LOG.search(line)]
    assert not bad, "\n".join(bad) + ctx
    assert wall < 120, f"boot test took {wall:.0f}s"
