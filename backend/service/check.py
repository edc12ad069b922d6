"""``vhost-user-cpufreq check``: what this host supports, and what serving would lack.

Each probe returns a :class:`Finding`: ``ok`` (works), ``degraded`` (the
service runs but without this), or ``info``.  The command exits non-zero when
any finding is degraded, so provisioning scripts can gate on it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from ..dataplane.cdrain import dataplane
from ..dataplane.guard import guard
from ..dataplane.lane import KickLane, LaneSched
from ..defaults import LANE_SLICE_US
from ..host import sched
from ..host.sysfs import read_host_model

__all__ = ["Finding", "run_checks"]

CAP_SYS_NICE = 23


@dataclass(frozen=True, slots=True)
class Finding:
    name: str
    state: str  # "ok" | "degraded" | "info"
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _cpufreq(sysfs_root: str, nominal_khz: int | None) -> Finding:
    try:
        m = read_host_model(sysfs_root, nominal_khz=nominal_khz)
    except OSError as exc:
        return Finding("cpufreq", "degraded", f"cannot read {sysfs_root}: {exc}")
    if m.degraded:
        return Finding("cpufreq", "degraded", m.degraded)
    doms = m.snapshot().domains
    return Finding("cpufreq", "ok", f"{len(doms)} frequency domains over {len(m.online_cpus())} online CPUs, "
                   f"driver {m.policies[0].driver}")


def _dataplane() -> Finding:
    """Which data plane runs: "C, prebuilt extension (...)", "C, built at run time in <dir> (...)"
    or "pure Python (why)".  A run-time build lands in the cache, so a read-only service finds it later."""
    try:
        dp = dataplane()
    except RuntimeError as exc:  # VUC_DATAPLANE=c and no C
        return Finding("dataplane", "degraded", str(exc))
    if dp.kind == "c":
        if not dp.lane:
            return Finding("dataplane", "ok", f"{dp.detail}: request queue drained in C, kicks served on the event "
                           "loop")
        lane = _lane_sched(dp.lib)
        state = "ok" if lane.applied else "degraded"
        return Finding("dataplane", state, f"{dp.detail}: request queue drained in C, kicks served by the C kick "
                       f"lane; {lane.describe()}")
    return Finding("dataplane", "degraded", f"{dp.detail}: request queue drained by the reference, kicks served on "
                   "the event loop")


def _guard() -> Finding:
    g = guard()
    if g is None:
        return Finding("isolation", "degraded", "no C guard for shared memory and eventfds (no prebuilt "
                       "extension, and no C compiler to build backend/dataplane/guard.c): a front-end that shrinks its guest RAM ends the service, and with it every "
                       "VM, and one that clears O_NONBLOCK on its call eventfd while keeping it full can stall it")
    detail = "guest memory faults cost only the faulting session (SIGBUS handler over every guest region)"
    if not g.timer_signal:
        return Finding("isolation", "degraded", detail + "; no free real-time signal to bound eventfd writes: a "
                       "front-end racing O_NONBLOCK on its call eventfd can still stall the service")
    return Finding("isolation", "ok", detail + f"; eventfd writes bounded by a timer (signal {g.timer_signal}), "
                   "reads never block")


def _lane_sched(lib: object) -> LaneSched:
    """Start a kick lane as the service would, for what the kernel made of its slice request."""
    loop = asyncio.new_event_loop()
    try:
        lane = KickLane(lib, loop, LANE_SLICE_US)
        lane.close()
        return lane.sched
    finally:
        loop.close()


def _uclamp() -> Finding:
    why = sched.probe_uclamp()
    if why:
        return Finding("uclamp", "degraded", why + "; clamps are recorded, not applied")
    return Finding("uclamp", "ok", "sched_setattr accepts util clamps")


def _cgroup(root: str = "/sys/fs/cgroup") -> Finding:
    ctl = os.path.join(root, "cgroup.controllers")
    if not os.path.exists(ctl):
        return Finding("cgroup", "info", f"no cgroup v2 hierarchy at {root} (hybrid or v1): cgroup clamps unavailable")
    with open(ctl) as f:
        controllers = f.read().split()
    if "cpu" not in controllers:
        return Finding("cgroup", "info", f"cgroup v2 without the cpu controller ({' '.join(controllers)})")
    has = os.path.exists(os.path.join(root, "cpu.uclamp.min")) or any(
        os.path.exists(os.path.join(root, d, "cpu.uclamp.min")) for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)))
    return Finding("cgroup", "ok" if has else "info",
                   "cpu.uclamp.min available" if has else "cpu controller without cpu.uclamp.min")


def _invariance(cpuinfo: str = "/proc/cpuinfo") -> Finding:
    """Whether schedutil maps a clamp to a frequency directly, which the per-VM ceiling assumes.

    Without frequency invariance schedutil asks for 1.25 x current frequency x
    util, so a clamp below 1024 / 1.25 cannot lift a CPU off its lowest
    frequency (docs/testhost.md, "The closed loop, measured").  x86 is
    invariant through APERF/MPERF; arm64 through AMU counters or the cpufreq
    driver's scale factor, which every arm64 cpufreq driver sets.
    """
    machine = os.uname().machine
    if machine not in ("x86_64", "i686", "i386"):
        return Finding("invariance", "info", f"{machine}: frequency invariance comes from the cpufreq driver "
                                             "or activity counters")
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as exc:
        return Finding("invariance", "info", f"cannot read {cpuinfo}: {exc.strerror}")
    if "aperfmperf" in flags:
        return Finding("invariance", "ok", "APERF/MPERF: schedutil turns a clamp into a frequency directly")
    return Finding("invariance", "degraded",
                   "no APERF/MPERF: schedutil is not frequency-invariant here, so a clamp below 820 "
                   "(and so a ceiling below 820) lifts no CPU off its lowest frequency")


def _capabilities() -> Finding:
    try:
        with open("/proc/self/status") as f:
            eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return Finding("permissions", "degraded", "cannot read capabilities from /proc/self/status")
    if eff & (1 << CAP_SYS_NICE):
        return Finding("permissions", "ok", f"CAP_SYS_NICE held (uid {os.geteuid()})")
    return Finding("permissions", "degraded",
                   f"no CAP_SYS_NICE (uid {os.geteuid()}): only threads of this user can be pinned or clamped")


def _qemu() -> Finding:
    # VUC_QEMU (a command prefix, e.g. "chroot /var/cache/... qemu-system-x86_64") wins over PATH,
    # as for the tests; the finding names which one it used, so a user can tell why.
    prefix = os.environ.get("VUC_QEMU")
    found = shutil.which("qemu-system-x86_64")
    if prefix:
        cmd, origin = prefix.split(), f"VUC_QEMU={prefix}"
    elif found:
        cmd, origin = [found], found
    else:
        return Finding("qemu", "info", "no qemu-system-x86_64 on PATH and VUC_QEMU is not set (QEMU 10.2+ is "
                       "needed for vhost-user-test-device-pci)")
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Finding("qemu", "info", f"{origin}: {exc}")
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    if not m:
        return Finding("qemu", "info", f"{origin}: unrecognised version output: {out.strip()[:80]!r}")
    ver = (int(m.group(1)), int(m.group(2)))
    state = "ok" if ver >= (10, 2) else "info"
    note = "" if state == "ok" else ", too old for vhost-user-test-device-pci: needs 10.2+"
    return Finding("qemu", state, f"QEMU {m.group(0).split()[1]} ({origin}{note})")


def _hotplug() -> Finding:
    try:
        import pyudev

        mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        mon.filter_by(subsystem="cpu")
        mon.start()
    except Exception as exc:  # noqa: BLE001 - any failure means no uevents
        return Finding("hotplug", "degraded", f"no uevent socket ({exc}): hotplug seen only by periodic rebuilds")
    return Finding("hotplug", "ok", "kernel uevents for CPU online/offline are received")


def run_checks(sysfs_root: str = "/sys", nominal_khz: int | None = None) -> list[Finding]:
    return [_cpufreq(sysfs_root, nominal_khz), _dataplane(), _guard(), _uclamp(), _cgroup(), _invariance(),
            _capabilities(), _hotplug(), _qemu()]
