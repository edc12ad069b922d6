"""The host CPU model read from sysfs, and a frequency source that samples it.

Theory of operation
-------------------
:func:`read_host_model` walks ``<root>/devices/system/cpu`` once and builds an
immutable :class:`HostCpuModel`: every CPU (``cpuN`` directories) with its
online state and ``cpu_capacity``, and every cpufreq policy
(``cpufreq/policyN``) with its frequency domain (``related_cpus``), the CPUs
of it that are online (``affected_cpus``), its limits, current frequency,
frequency table, driver and governor.  ``root`` is configurable so tests run
on generated trees (``tests/sysfs_tree.py``).

The model is what the rest of the service plans with: :meth:`HostCpuModel.snapshot`
gives one :class:`~.cpufreq.hostfreq.HostDomain` per policy that has an online CPU,
and :meth:`HostCpuModel.domain_of_cpu` / :meth:`HostCpuModel.capacity_classes`
answer pinning questions.

Nothing read from sysfs is trusted.  A file that is missing where it must
exist, empty, or holds garbage makes the reader skip that one policy or CPU,
log a warning (once per process per message, so a periodic rebuild does not
flood the log) and record the message in :attr:`HostCpuModel.problems`; it
never raises.  Only a ``root`` without ``devices/system/cpu`` raises, since
that is a configuration error rather than a malformed file.

Degraded mode: a host without cpufreq (no ``policyN`` directory; many VMs,
this project's CI) or whose policies are all unusable still needs a domain to
describe.  The model then has one synthetic policy (driver ``"nominal"``)
holding all online CPUs with min = max = cur = a nominal frequency: the
caller's ``nominal_khz``, else the highest ``cpu MHz`` in ``/proc/cpuinfo``,
else :data:`FALLBACK_NOMINAL_KHZ`.  :attr:`HostCpuModel.degraded` then holds
a one-line reason and the snapshot is marked ``nominal``.

The frequency source that samples the model's ``scaling_cur_freq`` files is
:class:`~.sysfs_source.SysfsSource` (``sysfs_source.py``).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..cpufreq.hostfreq import HostDomain, HostSnapshot

__all__ = [
    "Cpu",
    "Policy",
    "HostCpuModel",
    "read_host_model",
    "parse_cpu_list",
    "FALLBACK_NOMINAL_KHZ",
    "DEFAULT_CAPACITY",
]

log = logging.getLogger("vhost_user_cpufreq.sysfs")

#: Capacity of a CPU without ``cpu_capacity`` (x86, or arm64 without
#: capacity-dmips-mhz): the scheduler's SCHED_CAPACITY_SCALE, i.e. "biggest".
DEFAULT_CAPACITY = 1024
#: Nominal frequency in degraded mode when neither the caller nor
#: /proc/cpuinfo gives one (arm64's cpuinfo has no "cpu MHz"): 1 GHz, an
#: honest order of magnitude; the snapshot's ``nominal`` flag tells the guest
#: not to take it literally.
FALLBACK_NOMINAL_KHZ = 1_000_000
#: CPU ids at or above this are garbage, not hardware (NR_CPUS tops at 8192;
#: the margin keeps a corrupt "0-4000000000" from allocating a huge set).
MAX_CPU_ID = 1 << 16
_U32_MAX = 0xFFFFFFFF
#: sysfs attributes are at most one page; anything longer is not sysfs.
_MAX_FILE_BYTES = 1 << 16
#: Keys of warnings already logged; bounded so endless distinct garbage
#: cannot grow it without limit (past the bound, warnings just repeat).
_warned: set[str] = set()
_WARNED_MAX = 4096


def warn_once(key: str, message: str) -> None:
    """Log ``message`` once per process per ``key`` (the model reader and the sampler share it)."""
    if key in _warned:
        return
    if len(_warned) < _WARNED_MAX:
        _warned.add(key)
    log.warning("%s", message)


class _Malformed(ValueError):
    """A sysfs file that is missing, empty or does not parse."""


# -- parsing -----------------------------------------------------------------------


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse a Linux CPU list: ranges ("0-3,5\\n", as ``online`` prints them) or
    space-separated ids ("0 1 2 3\\n", as ``related_cpus`` prints them).

    Returns sorted unique ids; "" or "\\n" is the empty list.  Raises
    ValueError on anything else.
    """
    out: set[int] = set()
    for token in text.replace(",", " ").split():
        lo_s, sep, hi_s = token.partition("-")
        lo = parse_uint(lo_s, MAX_CPU_ID - 1)
        hi = parse_uint(hi_s, MAX_CPU_ID - 1) if sep else lo
        if hi < lo:
            raise ValueError(f"descending range {token!r}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def parse_uint(text: str, limit: int = _U32_MAX) -> int:
    """A sysfs unsigned value: ASCII digits only, at most ``limit``; ValueError otherwise."""
    s = text.strip()
    # isascii+isdigit: int() would also take "+5", "1_0" and non-ASCII digits.
    if not s or not s.isascii() or not s.isdigit() or len(s) > 10:
        raise ValueError(f"not an unsigned integer: {_short(text)}")
    v = int(s)
    if v > limit:
        raise ValueError(f"{v} out of range (max {limit})")
    return v


def _short(text: str | bytes) -> str:
    r = repr(text)
    return r if len(r) <= 40 else r[:37] + "..."


def _read_text(path: Path) -> str:
    """The file's text; _Malformed if absent, unreadable, not ASCII or oversized."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _Malformed(f"{path}: missing") from None
    except OSError as e:
        raise _Malformed(f"{path}: {os.strerror(e.errno or 0) or e}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise _Malformed(f"{path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed(f"{path}: not ASCII: {_short(data)}") from None


def _read_uint(path: Path, limit: int = _U32_MAX) -> int:
    text = _read_text(path)
    try:
        return parse_uint(text, limit)
    except ValueError as e:
        raise _Malformed(f"{path}: {e}") from None


def _read_cpus(path: Path) -> tuple[int, ...]:
    text = _read_text(path)
    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise _Malformed(f"{path}: {e}") from None


def _read_word(path: Path) -> str:
    """A one-word attribute (driver, governor); "" when absent."""
    if not path.exists():
        return ""
    text = _read_text(path).strip()
    if not text or len(text) > 64 or not text.isprintable() or " " in text:
        raise _Malformed(f"{path}: not a name: {_short(text)}")
    return text


def _index_of(name: str, prefix: str) -> int | None:
    """N for "<prefix>N" directory names, None for anything else."""
    rest = name[len(prefix):]
    if not name.startswith(prefix) or not rest.isascii() or not rest.isdigit() or len(rest) > 5:
        return None
    return int(rest)


def _numbered_dirs(parent: Path, prefix: str) -> list[tuple[int, Path]]:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    out = []
    for e in entries:
        n = _index_of(e.name, prefix)
        if n is not None and n < MAX_CPU_ID and e.is_dir():
            out.append((n, Path(e.path)))
    return sorted(out)


def _cpuinfo_max_mhz(path: str) -> float | None:
    """Highest "cpu MHz" in a /proc/cpuinfo-format file, None if none."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 22)
    except OSError:
        return None
    best: float | None = None
    for raw in data.decode("ascii", "replace").splitlines():
        key, sep, value = raw.partition(":")
        if not sep or key.strip() != "cpu MHz":
            continue
        try:
            mhz = float(value.strip())
        except ValueError:
            continue
        # float() accepts "nan"/"inf"; a frequency must fit the ABI's u32 kHz.
        if 0 < mhz < _U32_MAX / 1000 and (best is None or mhz > best):
            best = mhz
    return best


# -- model -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cpu:
    id: int
    online: bool
    capacity: int  # 0..1024, DEFAULT_CAPACITY where sysfs has no cpu_capacity
    policy: int | None  # id of the cpufreq policy it belongs to, None if none


@dataclass(frozen=True, slots=True)
class Policy:
    id: int  # N of policyN
    related_cpus: tuple[int, ...]  # the frequency domain, offline CPUs included
    online_cpus: tuple[int, ...]  # affected_cpus: its online (and usable) CPUs
    min_khz: int
    max_khz: int
    cur_khz: int
    available_khz: tuple[int, ...]  # ascending; () without a table (intel_pstate)
    driver: str
    governor: str


@dataclass(frozen=True)
class HostCpuModel:
    """The host's CPUs and cpufreq policies at one point in time."""

    cpus: tuple[Cpu, ...]
    policies: tuple[Policy, ...]
    degraded: str | None = None  # why frequencies are nominal, None when real
    problems: tuple[str, ...] = ()  # malformed files: what was skipped and why
    possible: tuple[int, ...] = ()
    present: tuple[int, ...] = ()
    inactive_policies: tuple[int, ...] = ()  # policies whose CPUs are all offline (EBUSY)
    _snapshot: HostSnapshot = field(init=False, repr=False, compare=False)
    _domain_of_cpu: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: the model is immutable and snapshot() is on hot paths.
        capacity = {c.id: c.capacity for c in self.cpus}
        domains: list[HostDomain] = []
        where: dict[int, int] = {}
        for p in self.policies:
            if not p.online_cpus:
                continue
            for cpu in p.online_cpus:
                where[cpu] = len(domains)
            cap = max(capacity.get(cpu, DEFAULT_CAPACITY) for cpu in p.online_cpus)
            domains.append(HostDomain(p.online_cpus, p.min_khz, p.max_khz, p.cur_khz, cap, p.id))
        object.__setattr__(self, "_snapshot", HostSnapshot(tuple(domains), nominal=self.degraded is not None))
        object.__setattr__(self, "_domain_of_cpu", where)

    def snapshot(self) -> HostSnapshot:
        """One domain per policy with an online CPU, in policy order."""
        return self._snapshot

    def domain_of_cpu(self, cpu: int) -> int | None:
        """Index into ``snapshot().domains`` of the domain running ``cpu``; None if offline/unknown."""
        return self._domain_of_cpu.get(cpu)

    def online_cpus(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus if c.online)

    def capacity_classes(self) -> dict[int, tuple[int, ...]]:
        """Online CPUs grouped by capacity, smallest capacity first."""
        classes: dict[int, list[int]] = {}
        for c in self.cpus:
            if c.online:
                classes.setdefault(c.capacity, []).append(c.id)
        return {cap: tuple(classes[cap]) for cap in sorted(classes)}


class _Reader:
    """One pass over a sysfs tree; collects problems instead of raising."""

    def __init__(self, root: str, nominal_khz: int | None, proc_cpuinfo: str) -> None:
        self.root = root
        self.cpu_dir = Path(root) / "devices" / "system" / "cpu"
        self.nominal_khz = nominal_khz
        self.proc_cpuinfo = proc_cpuinfo
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.problems.append(message)
        warn_once(message, f"sysfs: {message}")

    def optional_list(self, name: str) -> tuple[int, ...] | None:
        path = self.cpu_dir / name
        if not path.exists():
            return None
        try:
            return _read_cpus(path)
        except _Malformed as e:
            self.problem(f"{e}; ignored")
            return None

    def read(self) -> HostCpuModel:
        if not self.cpu_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no CPU directory under the sysfs root", str(self.cpu_dir))
        possible = self.optional_list("possible") or ()
        present = self.optional_list("present") or ()
        online_list = self.optional_list("online")
        cpus = self.read_cpus(online_list)
        policies, inactive = self.read_policies(cpus)
        degraded: str | None = None
        if not policies:
            degraded, policies = self.nominal_policy(cpus, inactive)
        owner = {cpu: p.id for p in policies for cpu in p.related_cpus}
        cpus_out = tuple(
            Cpu(c.id, c.online, c.capacity, owner[c.id] if c.id in owner else self.symlinked_policy(c.id))
            for c in cpus.values()
        )
        return HostCpuModel(
            cpus_out, tuple(policies), degraded, tuple(self.problems), possible, present, tuple(inactive)
        )

    def read_cpus(self, online_list: tuple[int, ...] | None) -> dict[int, Cpu]:
        dirs = _numbered_dirs(self.cpu_dir, "cpu")
        online_set = set(online_list) if online_list is not None else None
        cpus: dict[int, Cpu] = {}
        for n, d in dirs:
            try:
                if (d / "online").exists():
                    online = _read_uint(d / "online", 1) == 1
                else:
                    # No per-CPU file: cpu0 on most x86 (not hotpluggable) is
                    # online; otherwise trust the global list if there is one.
                    online = online_set is None or n in online_set
                cap_path = d / "cpu_capacity"
                capacity = _read_uint(cap_path, DEFAULT_CAPACITY) if cap_path.exists() else DEFAULT_CAPACITY
            except _Malformed as e:
                self.problem(f"{e}; cpu{n} skipped")
                continue
            cpus[n] = Cpu(n, online, capacity, None)
        return cpus

    def read_policies(self, cpus: dict[int, Cpu]) -> tuple[list[Policy], list[int]]:
        policies: list[Policy] = []
        inactive: list[int] = []
        usable_online = {c.id for c in cpus.values() if c.online}
        for n, d in _numbered_dirs(self.cpu_dir / "cpufreq", "policy"):
            try:
                related = _read_cpus(d / "related_cpus")
            except _Malformed as e:
                if self._is_ebusy(d / "related_cpus"):
                    # Linux answers EBUSY for every attribute of a policy whose
                    # CPUs are all offline: a normal state, not a problem.
                    inactive.append(n)
                    continue
                self.problem(f"{e}; policy{n} skipped")
                continue
            try:
                policies.append(self.read_policy(n, d, related, usable_online))
            except _Malformed as e:
                self.problem(f"{e}; policy{n} skipped")
        return policies, inactive

    @staticmethod
    def _is_ebusy(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            return e.errno == errno.EBUSY
        return False

    def read_policy(self, n: int, d: Path, related: tuple[int, ...], usable_online: set[int]) -> Policy:
        if not related:
            raise _Malformed(f"{d / 'related_cpus'}: empty")
        min_khz = _read_uint(d / "cpuinfo_min_freq")
        max_khz = _read_uint(d / "cpuinfo_max_freq")
        if min_khz > max_khz:
            raise _Malformed(f"{d}: cpuinfo_min_freq {min_khz} > cpuinfo_max_freq {max_khz}")
        cur_khz = _read_uint(d / "scaling_cur_freq")
        related_set = set(related)
        affected_path = d / "affected_cpus"
        if affected_path.exists():
            try:
                affected = set(_read_cpus(affected_path)) & related_set
            except _Malformed as e:
                self.problem(f"{e}; policy{n} uses related_cpus and CPU online state instead")
                affected = related_set
        else:
            affected = related_set
        # affected_cpus and the CPUs' online files can disagree for an instant
        # during hotplug, and skipped CPUs must not be planned on: intersect.
        online = tuple(sorted(affected & usable_online))
        available: tuple[int, ...] = ()
        avail_path = d / "scaling_available_frequencies"
        if avail_path.exists():  # absent with intel_pstate and other table-less drivers
            try:
                # acpi-cpufreq lists highest first, OPP-based drivers lowest first.
                available = tuple(sorted({parse_uint(t) for t in _read_text(avail_path).split()}))
            except (ValueError, _Malformed) as e:
                self.problem(f"{avail_path}: {e}; policy{n} kept without a frequency table")
        try:
            driver = _read_word(d / "scaling_driver")
            governor = _read_word(d / "scaling_governor")
        except _Malformed as e:
            self.problem(f"{e}; policy{n} kept without it")
            driver = governor = ""
        return Policy(n, related, online, min_khz, max_khz, cur_khz, available, driver, governor)

    def symlinked_policy(self, cpu: int) -> int | None:
        """Policy of a CPU no active policy claims, from its cpuN/cpufreq symlink."""
        try:
            target = os.readlink(self.cpu_dir / f"cpu{cpu}" / "cpufreq")
        except OSError:
            return None
        return _index_of(os.path.basename(target.rstrip("/")), "policy")

    def nominal_policy(self, cpus: dict[int, Cpu], inactive: list[int]) -> tuple[str, list[Policy]]:
        freq_dir = self.cpu_dir / "cpufreq"
        if self.problems and _numbered_dirs(freq_dir, "policy"):
            why = f"no usable cpufreq policy in {freq_dir} ({len(self.problems)} problems)"
        elif inactive:
            why = f"no active cpufreq policy in {freq_dir}"
        else:
            why = f"no cpufreq in {freq_dir}"
        if self.nominal_khz is not None:
            khz, origin, kind = self.nominal_khz, "given by the caller", "caller"
        else:
            mhz = _cpuinfo_max_mhz(self.proc_cpuinfo)
            if mhz is not None:
                khz, origin, kind = round(mhz * 1000), f"from {self.proc_cpuinfo}", "cpuinfo"
            else:
                khz, origin = FALLBACK_NOMINAL_KHZ, f"fallback: no 'cpu MHz' in {self.proc_cpuinfo}"
                kind = "fallback"
        reason = f"{why}: frequencies are nominal ({khz} kHz {origin})"
        # Keyed without the frequency: a cpuinfo value that wobbles between
        # rebuilds is the same reason, logged once.
        warn_once(f"degraded|{why}|{kind}", reason)
        online = tuple(c.id for c in cpus.values() if c.online)
        related = tuple(cpus)
        return reason, [Policy(0, related, online, khz, khz, khz, (khz,), "nominal", "none")]


def read_host_model(
    root: str = "/sys", *, nominal_khz: int | None = None, proc_cpuinfo: str = "/proc/cpuinfo"
) -> HostCpuModel:
    """Read the host CPU model from the sysfs tree at ``root`` (never raises on
    malformed files; FileNotFoundError if ``root`` has no devices/system/cpu)."""
    if nominal_khz is not None and not 0 < nominal_khz <= _U32_MAX:
        raise ValueError(f"nominal_khz={nominal_khz} outside 1..{_U32_MAX}")
    return _Reader(root, nominal_khz, proc_cpuinfo).read()
