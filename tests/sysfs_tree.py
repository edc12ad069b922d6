"""Fake sysfs trees for tests: ``<root>/devices/system/cpu`` as Linux shows it.

A :class:`HostSpec` describes a host (CPUs, capacities, cpufreq policies);
:func:`make_sysfs_tree` writes it with Linux's own formats:

* ``possible``/``present``/``online``/``offline``: range lists, ``"0-7\\n"``
  (``%*pbl``), ``"\\n"`` when empty;
* ``related_cpus``/``affected_cpus``: ids separated by spaces, ``"0 1 2 3\\n"``
  (cpufreq_show_cpus drops the last space);
* ``scaling_available_frequencies``: ``"300000 574000 \\n"`` (each value
  printed as ``"%d "``, then ``"\\n"``);
* numbers ``"%u\\n"`` in kHz, names ``"%s\\n"``;
* ``cpuN/cpufreq`` is a symlink to ``../cpufreq/policyM``; cpu0 has no
  ``online`` file unless ``cpu0_hotpluggable`` (x86 default).

Specs come from the shared fixtures (:meth:`HostSpec.from_fixture`), or
compactly from :meth:`HostSpec.big_little` and :meth:`HostSpec.server`.
:func:`set_cur_freq` and :func:`set_cpu_online` change a tree in place the
way the kernel would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "FIXTURES",
    "HostSpec",
    "PolicySpec",
    "fixture_path",
    "make_sysfs_tree",
    "set_cur_freq",
    "set_cpu_online",
    "write_cpuinfo",
    "cpu_list",
    "cpufreq_cpus",
]

#: Real host descriptions, copied from the project's shared fixtures (the repository stands alone).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hosts"


def fixture_path(name: str) -> Path:
    return FIXTURES / (name if name.endswith(".json") else name + ".json")


@dataclass
class PolicySpec:
    id: int
    related_cpus: tuple[int, ...]
    min_khz: int
    max_khz: int
    cur_khz: int
    available_khz: tuple[int, ...] | None  # None: no file (intel_pstate); order kept as given
    driver: str = "cpufreq-dt"
    governor: str = "schedutil"
    extra: dict[str, str] = field(default_factory=dict)  # other policy files, verbatim text


@dataclass
class HostSpec:
    name: str
    cpus: int
    policies: list[PolicySpec]
    capacities: dict[int, int] = field(default_factory=dict)  # cpu -> cpu_capacity; absent: no file
    offline: set[int] = field(default_factory=set)
    cpufreq: bool = True  # False: empty cpufreq directory (no driver)
    cpu0_hotpluggable: bool = False
    global_files: dict[str, str] = field(default_factory=dict)  # path under the sysfs root -> text

    # -- builders -------------------------------------------------------------------
    @classmethod
    def from_fixture(cls, path: str | Path) -> HostSpec:
        """From a shared fixture JSON. A null ``scaling_cur_freq_khz`` (no runtime
        dump exists for the arm hosts) becomes the policy's minimum."""
        data: dict[str, Any] = json.loads(Path(path).read_text())
        policies = []
        for p in data["policies"]:
            extra = {}
            for key, fname in (
                ("scaling_min_freq_khz", "scaling_min_freq"),
                ("scaling_max_freq_khz", "scaling_max_freq"),
                ("cpuinfo_transition_latency_ns", "cpuinfo_transition_latency"),
                ("base_frequency_khz", "base_frequency"),
                ("bios_limit", "bios_limit"),
            ):
                if p.get(key) is not None:
                    extra[fname] = f"{p[key]}\n"
            if p.get("freqdomain_cpus") is not None:
                extra["freqdomain_cpus"] = cpufreq_cpus(p["freqdomain_cpus"])
            avail = p.get("available_frequencies_khz")
            cur = p.get("scaling_cur_freq_khz")
            policies.append(
                PolicySpec(
                    id=p["policy"],
                    related_cpus=tuple(p["related_cpus"]),
                    min_khz=p["cpuinfo_min_freq_khz"],
                    max_khz=p["cpuinfo_max_freq_khz"],
                    cur_khz=cur if cur is not None else p["cpuinfo_min_freq_khz"],
                    available_khz=tuple(avail) if avail is not None else None,
                    driver=p.get("scaling_driver") or "cpufreq-dt",
                    governor=p.get("scaling_governor") or "schedutil",
                    extra=extra,
                )
            )
        capacities = {c["cpu"]: c["cpu_capacity"] for c in data["cpus"] if c.get("cpu_capacity") is not None}
        global_files = {k.removeprefix("/sys/"): v for k, v in data.get("global_files", {}).items()}
        return cls(data["name"], len(data["cpus"]), policies, capacities, global_files=global_files)

    @classmethod
    def big_little(cls, clusters: Sequence[tuple[int, int, int, int]], *, name: str = "big.LITTLE") -> HostSpec:
        """Clusters of (count, min_khz, max_khz, capacity), numbered from cpu0;
        one policy per cluster named after its first CPU; 8 OPPs each, evenly
        spaced and rounded to MHz, ascending as OPP-based drivers list them."""
        policies, capacities, first = [], {}, 0
        for count, lo, hi, cap in clusters:
            cpus = tuple(range(first, first + count))
            steps = 8
            opps = tuple(sorted({round((lo + (hi - lo) * i / (steps - 1)) / 1000) * 1000 for i in range(steps)}))
            policies.append(PolicySpec(first, cpus, lo, hi, lo, opps))
            capacities.update({c: cap for c in cpus})
            first += count
        return cls(name, first, policies, capacities)

    @classmethod
    def server(
        cls,
        sockets: int = 2,
        cores_per_socket: int = 4,
        *,
        threads_per_core: int = 1,
        per_cpu_policies: bool = True,
        min_khz: int = 1_000_000,
        max_khz: int = 3_900_000,
        driver: str = "intel_pstate",
        governor: str = "powersave",
    ) -> HostSpec:
        """An x86 server numbered as Linux does (socket 0's cores, socket 1's,
        then the SMT siblings); intel_pstate-like: no frequency table, no
        cpu_capacity.  ``per_cpu_policies=False`` gives one policy per socket."""
        n = sockets * cores_per_socket * threads_per_core
        policies: list[PolicySpec] = []
        if per_cpu_policies:
            policies = [PolicySpec(c, (c,), min_khz, max_khz, min_khz, None, driver, governor) for c in range(n)]
        else:
            for s in range(sockets):
                cpus = tuple(
                    sorted(
                        t * sockets * cores_per_socket + s * cores_per_socket + c
                        for t in range(threads_per_core)
                        for c in range(cores_per_socket)
                    )
                )
                policies.append(PolicySpec(cpus[0], cpus, min_khz, max_khz, min_khz, None, driver, governor))
        return cls(f"server-{sockets}x{cores_per_socket}x{threads_per_core}", n, policies)

    @classmethod
    def no_cpufreq(cls, cpus: int, *, capacities: dict[int, int] | None = None) -> HostSpec:
        """A host without a cpufreq driver (empty cpufreq directory), like many VMs."""
        return cls("no-cpufreq", cpus, [], dict(capacities or {}), cpufreq=False)


# -- formats -------------------------------------------------------------------------


def cpu_list(cpus: Iterable[int]) -> str:
    """Linux ``%*pbl``: "0-3,5\\n"; "\\n" when empty."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts) + "\n"


def cpufreq_cpus(cpus: Iterable[int]) -> str:
    """cpufreq_show_cpus: "0 1 2 3\\n"."""
    return " ".join(str(c) for c in sorted(cpus)) + "\n"


def _available(freqs: Iterable[int]) -> str:
    """show_available_freqs: every value "%d ", then "\\n"."""
    return "".join(f"{f} " for f in freqs) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cpu_dir(root: Path) -> Path:
    return root / "devices" / "system" / "cpu"


# -- tree ----------------------------------------------------------------------------


def make_sysfs_tree(root: Path, host: HostSpec) -> Path:
    """Write ``host`` under ``root`` (created if needed); returns ``root``, the
    path to pass as the sysfs root."""
    base = cpu_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    all_cpus = range(host.cpus)
    online = [c for c in all_cpus if c not in host.offline]
    _write(base / "possible", cpu_list(all_cpus))
    _write(base / "present", cpu_list(all_cpus))
    _write(base / "online", cpu_list(online))
    _write(base / "offline", cpu_list(host.offline))
    _write(base / "kernel_max", "8191\n")
    (base / "cpufreq").mkdir(exist_ok=True)
    for c in all_cpus:
        d = base / f"cpu{c}"
        d.mkdir(exist_ok=True)
        if c != 0 or host.cpu0_hotpluggable:
            _write(d / "online", "0\n" if c in host.offline else "1\n")
        if c in host.capacities:
            _write(d / "cpu_capacity", f"{host.capacities[c]}\n")
    if host.cpufreq:
        for p in host.policies:
            d = base / "cpufreq" / f"policy{p.id}"
            _write(d / "related_cpus", cpufreq_cpus(p.related_cpus))
            _write(d / "affected_cpus", cpufreq_cpus(c for c in p.related_cpus if c not in host.offline))
            _write(d / "cpuinfo_min_freq", f"{p.min_khz}\n")
            _write(d / "cpuinfo_max_freq", f"{p.max_khz}\n")
            _write(d / "scaling_cur_freq", f"{p.cur_khz}\n")
            _write(d / "scaling_driver", f"{p.driver}\n")
            _write(d / "scaling_governor", f"{p.governor}\n")
            if p.available_khz is not None:
                _write(d / "scaling_available_frequencies", _available(p.available_khz))
            for fname, text in p.extra.items():
                _write(d / fname, text)
            for c in p.related_cpus:
                link = base / f"cpu{c}" / "cpufreq"
                if not link.is_symlink():
                    link.symlink_to(Path("..") / "cpufreq" / f"policy{p.id}")
    for rel, text in host.global_files.items():
        _write(root / rel, text if text.endswith("\n") else text + "\n")
    return root


def set_cur_freq(root: Path, policy: int, khz: int) -> None:
    """What the governor does: a new scaling_cur_freq for policy<policy>."""
    path = cpu_dir(root) / "cpufreq" / f"policy{policy}" / "scaling_cur_freq"
    if not path.exists():
        raise FileNotFoundError(path)
    path.write_text(f"{khz}\n")


def _parse(text: str) -> set[int]:
    out: set[int] = set()
    for tok in text.replace(",", " ").split():
        lo, _, hi = tok.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def set_cpu_online(root: Path, cpu: int, online: bool) -> None:
    """Hotplug ``cpu`` as the kernel shows it: its ``online`` file, the global
    online/offline lists and ``affected_cpus`` of its policy."""
    base = cpu_dir(root)
    if not (base / f"cpu{cpu}").is_dir():
        raise FileNotFoundError(base / f"cpu{cpu}")
    _write(base / f"cpu{cpu}" / "online", "1\n" if online else "0\n")
    on = _parse((base / "online").read_text())
    (on.add if online else on.discard)(cpu)
    present = _parse((base / "present").read_text())
    _write(base / "online", cpu_list(on))
    _write(base / "offline", cpu_list(present - on))
    link = base / f"cpu{cpu}" / "cpufreq"
    if link.is_symlink():
        pdir = base / "cpufreq" / os.path.basename(os.readlink(link))
        related = _parse((pdir / "related_cpus").read_text())
        _write(pdir / "affected_cpus", cpufreq_cpus(related & on))


def write_cpuinfo(path: Path, mhz: Sequence[float | None]) -> Path:
    """A /proc/cpuinfo-format file, one processor block per entry (x86 layout);
    None leaves out the "cpu MHz" line (as arm64 does)."""
    blocks = []
    for i, f in enumerate(mhz):
        lines = [f"processor\t: {i}", "vendor_id\t: GenuineIntel", "model name\t: Fake CPU @ 2.00GHz"]
        if f is not None:
            lines.append(f"cpu MHz\t\t: {f:.3f}")
        lines.append("flags\t\t: fpu vme de pse")
        blocks.append("\n".join(lines) + "\n")
    path.write_text("\n".join(blocks) + "\n")
    return path
