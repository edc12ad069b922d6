"""The service's configuration file (TOML), validated on load.

Every error names the file, the key and the reason, e.g.
``/etc/vhost-user-cpufreq.toml: vm.web1.ceiling: must be an integer 0..1024, got 2000``,
and nothing half-loaded is ever used: :func:`load_config` either returns a
complete :class:`ServiceConfig` or raises :class:`ConfigError`.

Example::

    [service]
    sysfs_root = "/sys"
    sample_period = 0.05            # seconds between frequency samples
    mirror_threshold = 0.02         # notify when a domain moves by 2% of its max
    max_notifications_per_second = 20
    lane_slice_us = 100             # the kick lane's scheduler slice (0: the kernel's)
    nominal_khz = 2000000           # when the host has no cpufreq

    [vm.web1]
    socket = "/run/vhost-user-cpufreq/web1.sock"
    vcpus = 4
    qmp = "/run/qemu/web1.qmp"      # optional: vCPU threads from query-cpus-fast
    pinning = "auto"                # auto | keep | none | a list of pCPUs, one per vCPU (may be shared)
    floor = 0                       # util clamp bounds, 0..1024
    ceiling = 1024
    uclamp_max = 1024               # power cap (uclamp_max of the threads or cgroups); 1024: none
    max_khz = 2000000               # optional: slower vCPUs; a domain whose top is above is advertised at it
    clamp = "thread"                # thread | cgroup | none
    cgroup = "{qemu}/vuc-domain{domain}"  # with clamp = "cgroup": where the clamps are written
    shared_page = false             # host frequency in shared memory (QEMU >= 11.1; SPEC §8)

The one-socket model (every QEMU on one socket, identified from the peer;
``[class.NAME]`` tables say what each gets, see classes.py)::

    [service]
    shared_socket = "/run/vhost-user-cpufreq/vhost.sock"
    shared_socket_mode = 0o660
    shared_socket_group = 64055     # the gid QEMU runs as
    state_dir = "/var/lib/vhost-user-cpufreq"  # registrations (control API) survive restarts here
    admit = "any"                   # or "registered": only VMs a manager registered

    [class.default]
    pinning = "none"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_user_cpufreq.protocol.errors import CpufreqError

from ..defaults import KICK_BATCH_DELAY, LANE_SLICE_US
from ..policy.engine import EngineConfig, VmLimits
from ..policy.placement import PINNING_MODES
from .classes import VmClass, parse_classes

__all__ = ["ConfigError", "VmSettings", "ServiceConfig", "load_config", "parse_config"]


class ConfigError(CpufreqError):
    """The configuration file is unusable; the message says where and why."""


@dataclass(frozen=True, slots=True)
class VmSettings:
    name: str
    socket: str
    vcpus: int
    qmp: str | None = None
    #: "auto", "keep", "none", or one pCPU per vCPU (see policy/placement.py)
    pinning: str | tuple[int, ...] = "auto"
    limits: VmLimits = VmLimits()
    clamp: str = "thread"
    #: for clamp = "cgroup": a template with {vcpu} or {domain} (existing cgroups, e.g. libvirt's), or
    #: "{qemu}/NAME" (threaded cgroups the service makes under the QEMU process's cgroup, see cgroups.py)
    cgroup: str | None = None
    socket_mode: int = 0o600
    socket_owner: int | None = None  # uid to chown the socket to (root only)
    socket_group: int | None = None  # gid, e.g. the group QEMU runs in
    shared_page: bool = False  # offer the shared frequency page (vhost-user SHMEM; no CONFIGURE_MEM_SLOTS then)
    #: the vCPUs' top frequency where below the host's: advertised there, and the threads capped there
    max_khz: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    sysfs_root: str = "/sys"
    sample_period: float = 0.05
    mirror_threshold: float = 0.02
    max_notifications_per_second: float = 20.0
    kick_batch_delay: float = KICK_BATCH_DELAY
    lane_slice_us: int = LANE_SLICE_US  # the kick lane thread's EEVDF slice; 0: the kernel's default
    nominal_khz: int | None = None
    dry_run: bool = False
    engine: EngineConfig = EngineConfig()
    control_socket: str | None = None
    metrics_address: str | None = None
    state_file: str | None = None  # where thread changes are recorded for recovery after a crash
    allowed_uids: tuple[int, ...] | None = None  # peers (SO_PEERCRED) allowed to connect; None: any
    allowed_gids: tuple[int, ...] | None = None
    vms: dict[str, VmSettings] = field(default_factory=dict)
    source: str = "<defaults>"
    #: the one socket every QEMU may connect to (identify.py); None: per-VM sockets only
    shared_socket: str | None = None
    shared_socket_mode: int = 0o600
    shared_socket_group: int | None = None
    control_socket_group: int | None = None  # gid whose members may use the control socket (mode 0660)
    state_dir: str | None = None  # registrations made through the control API, kept across restarts
    admit: str = "any"  # "any" VM a class matches, or only "registered" ones
    #: what /proc/PID/exe of a shared-socket peer may be called (globs)
    qemu_binaries: tuple[str, ...] = ("qemu-system-*", "qemu-kvm")
    classes: dict[str, VmClass] = field(default_factory=dict)


_SERVICE_KEYS = {
    "sysfs_root", "sample_period", "mirror_threshold", "max_notifications_per_second", "nominal_khz", "dry_run",
    "hysteresis", "min_interval", "stale_after", "headroom", "control_socket", "metrics_address",
    "state_file", "allowed_uids", "allowed_gids", "kick_batch_delay", "lane_slice_us",
    "shared_socket", "shared_socket_mode", "shared_socket_group", "state_dir", "admit", "control_socket_group",
    "qemu_binaries",
}
_VM_KEYS = {"socket", "vcpus", "qmp", "pinning", "floor", "ceiling", "uclamp_max", "max_khz", "clamp", "cgroup",
            "socket_mode",
            "socket_owner", "socket_group", "shared_page"}


def _ids(r: "_Reader", table: dict[str, Any], key: str) -> tuple[int, ...] | None:
    if key not in table:
        return None
    v = table[key]
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        raise r.fail(f"service.{key}", f"must be a list of numeric ids, got {v!r}")
    return tuple(v)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {why}")

    def get(self, table: dict[str, Any], prefix: str, key: str, kind: type | tuple[type, ...], default: Any,
            check: Any = None, what: str = "") -> Any:
        if key not in table:
            return default
        v = table[key]
        ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
        if ok and check is not None:
            ok = check(v)
        if not ok:
            raise self.fail(f"{prefix}{key}", f"must be {what}, got {v!r}")
        return v


def parse_config(data: dict[str, Any], source: str = "<string>") -> ServiceConfig:
    r = _Reader(source)
    unknown = set(data) - {"service", "vm", "class"}
    if unknown:
        raise r.fail(sorted(unknown)[0], "unknown section (expected [service], [vm.NAME] and [class.NAME])")
    svc = data.get("service", {})
    if not isinstance(svc, dict):
        raise r.fail("service", "must be a table")
    for k in svc:
        if k not in _SERVICE_KEYS:
            raise r.fail(f"service.{k}", "unknown key")
    num = (int, float)
    p = "service."
    try:
        engine = EngineConfig(
            hysteresis=r.get(svc, p, "hysteresis", int, 32, lambda v: 0 <= v <= 1024, "an integer 0..1024"),
            min_interval=float(r.get(svc, p, "min_interval", num, 0.008, lambda v: 0 <= v <= 10, "seconds 0..10")),
            stale_after=float(r.get(svc, p, "stale_after", num, 0.5, lambda v: 0 < v <= 3600, "seconds (0, 3600]")),
            headroom=float(r.get(svc, p, "headroom", num, 0.8, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        )
    except ValueError as exc:
        raise r.fail("service", str(exc)) from None
    vms_t = data.get("vm", {})
    if not isinstance(vms_t, dict):
        raise r.fail("vm", "must be tables [vm.NAME]")
    vms: dict[str, VmSettings] = {}
    sockets: dict[str, str] = {}
    for name, t in vms_t.items():
        vp = f"vm.{name}."
        if not isinstance(t, dict):
            raise r.fail(f"vm.{name}", "must be a table")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise r.fail(f"vm.{name}", "VM names use letters, digits, '-' and '_' only")
        for k in t:
            if k not in _VM_KEYS:
                raise r.fail(vp + k, "unknown key")
        if "socket" not in t:
            raise r.fail(vp + "socket", "is required")
        sock = r.get(t, vp, "socket", str, None, lambda v: v.startswith("/"), "an absolute path")
        if sock in sockets:
            raise r.fail(vp + "socket", f"already used by vm.{sockets[sock]}")
        sockets[sock] = name
        vcpus = r.get(t, vp, "vcpus", int, 1, lambda v: 1 <= v <= 4096, "an integer 1..4096")
        pin = t.get("pinning", "auto")
        pinning: str | tuple[int, ...]
        if isinstance(pin, str) and pin in PINNING_MODES:
            pinning = pin
        elif isinstance(pin, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in pin):
            # One pCPU per vCPU; sharing a pCPU (between vCPUs, or with other VMs) is allowed:
            # clamps aggregate per CPU.  Whether the CPUs are online is checked where the host is known.
            if len(pin) != vcpus:
                raise r.fail(vp + "pinning", f"lists {len(pin)} pCPUs for {vcpus} vCPUs")
            pinning = tuple(pin)
        else:
            raise r.fail(vp + "pinning", f'must be "auto", "keep", "none" or a list of CPU numbers, got {pin!r}')
        floor = r.get(t, vp, "floor", int, 0, lambda v: 0 <= v <= 1024, "an integer 0..1024")
        ceiling = r.get(t, vp, "ceiling", int, 1024, lambda v: 0 <= v <= 1024, "an integer 0..1024")
        if floor > ceiling:
            raise r.fail(vp + "floor", f"{floor} is above ceiling {ceiling}")
        cap = r.get(t, vp, "uclamp_max", int, 1024, lambda v: 0 <= v <= 1024, "an integer 0..1024")
        if cap < floor:
            # The kernel refuses a uclamp_min above the task's uclamp_max: the floor could never hold.
            raise r.fail(vp + "uclamp_max", f"{cap} is below floor {floor} (a guaranteed minimum above the cap)")
        clamp = r.get(t, vp, "clamp", str, "thread", lambda v: v in ("thread", "cgroup", "none"),
                      '"thread", "cgroup" or "none"')
        cgroup = r.get(t, vp, "cgroup", str, None, _cgroup_template_ok,
                       'a path template containing {vcpu} (one cgroup per vCPU) or {domain} (one per domain), '
                       'or "{qemu}/NAME" for threaded cgroups the service makes under the QEMU process\'s own '
                       '(NAME with {vcpu}, {domain} or neither: one per VM)')
        if clamp == "cgroup" and cgroup is None:
            raise r.fail(vp + "cgroup", 'is required with clamp = "cgroup"')
        vms[name] = VmSettings(
            name, sock, vcpus, r.get(t, vp, "qmp", str, None, lambda v: v.startswith("/"), "an absolute path"),
            pinning, VmLimits(floor, ceiling, cap), clamp, cgroup,
            r.get(t, vp, "socket_mode", int, 0o600, lambda v: 0 <= v <= 0o777, "a file mode like 0o660"),
            r.get(t, vp, "socket_owner", int, None, lambda v: v >= 0, "a numeric uid"),
            r.get(t, vp, "socket_group", int, None, lambda v: v >= 0, "a numeric gid"),
            r.get(t, vp, "shared_page", bool, False, None, "true or false"),
            r.get(t, vp, "max_khz", int, None, lambda v: 1000 <= v <= 20_000_000, "kHz 1000..20000000"),
        )
    shared = r.get(svc, p, "shared_socket", str, None, lambda v: v.startswith("/"), "an absolute path")
    if shared is not None and shared in sockets:
        raise r.fail("service.shared_socket", f"already used by vm.{sockets[shared]}")
    classes = parse_classes(data.get("class", {}), r.fail, r.get, _cgroup_template_ok)
    return ServiceConfig(
        sysfs_root=r.get(svc, p, "sysfs_root", str, "/sys", None, "a path"),
        sample_period=float(r.get(svc, p, "sample_period", num, 0.05, lambda v: 0.001 <= v <= 60, "seconds 0.001..60")),
        mirror_threshold=float(r.get(svc, p, "mirror_threshold", num, 0.02, lambda v: 0 <= v < 1, "a fraction 0..1")),
        max_notifications_per_second=float(r.get(svc, p, "max_notifications_per_second", num, 20.0,
                                                 lambda v: 0 < v <= 1000, "a rate 0..1000")),
        kick_batch_delay=float(r.get(svc, p, "kick_batch_delay", num, KICK_BATCH_DELAY, lambda v: 0 <= v <= 0.1,
                                     "seconds 0..0.1")),
        lane_slice_us=r.get(svc, p, "lane_slice_us", int, LANE_SLICE_US, lambda v: v == 0 or 100 <= v <= 100_000,
                            "0 or microseconds 100..100000 (the kernel's range for a slice)"),
        nominal_khz=r.get(svc, p, "nominal_khz", int, None, lambda v: 1000 <= v <= 20_000_000, "kHz 1000..20000000"),
        dry_run=r.get(svc, p, "dry_run", bool, False, None, "true or false"),
        engine=engine,
        control_socket=r.get(svc, p, "control_socket", str, None, lambda v: v.startswith("/"), "an absolute path"),
        metrics_address=r.get(svc, p, "metrics_address", str, None, lambda v: ":" in v, "HOST:PORT"),
        state_file=r.get(svc, p, "state_file", str, None, lambda v: v.startswith("/"), "an absolute path"),
        allowed_uids=_ids(r, svc, "allowed_uids"),
        allowed_gids=_ids(r, svc, "allowed_gids"),
        vms=vms,
        source=source,
        shared_socket=shared,
        shared_socket_mode=r.get(svc, p, "shared_socket_mode", int, 0o600, lambda v: 0 <= v <= 0o777,
                                 "a file mode like 0o660"),
        shared_socket_group=r.get(svc, p, "shared_socket_group", int, None, lambda v: v >= 0, "a numeric gid"),
        control_socket_group=r.get(svc, p, "control_socket_group", int, None, lambda v: v >= 0, "a numeric gid"),
        state_dir=r.get(svc, p, "state_dir", str, None, lambda v: v.startswith("/"), "an absolute path"),
        admit=r.get(svc, p, "admit", str, "any", lambda v: v in ("any", "registered"), '"any" or "registered"'),
        classes=classes,
        qemu_binaries=tuple(r.get(svc, p, "qemu_binaries", list, ["qemu-system-*", "qemu-kvm"],
                                  lambda v: bool(v) and all(isinstance(x, str) and x for x in v),
                                  "a non-empty list of file name globs")),
    )


def load_config(path: str | Path) -> ServiceConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, str(p))


def _cgroup_template_ok(v: str) -> bool:
    per_vcpu, per_domain = "{vcpu}" in v, "{domain}" in v
    if v.startswith("{qemu}/"):
        name = v[len("{qemu}/"):]
        # One directory level: threads move only within their process's threaded subtree.
        return bool(name) and "/" not in name and "{qemu}" not in name and not (per_vcpu and per_domain)
    return "{qemu}" not in v and per_vcpu != per_domain
